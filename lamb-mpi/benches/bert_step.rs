//! BERT-base (199 tensors, 109.5M f32 parameters) stepped by `DistLamb` at N = 1, 2 and 4
//! ranks on this machine: the time per step and the bytes each rank sends per step,
//! counted, against the model `2·(N−1)/N · 4 B` per parameter plus the norms' partials.
//!
//! ```text
//! cargo bench -p lamb-mpi --bench bert_step            # N = 1, 2, 4; mpirun must be installed
//! cargo bench -p lamb-mpi --bench bert_step -- --test  # a 1/1000-size model, one step: it runs
//! ```
//!
//! The bench launches itself under `mpirun` once per N (with `--oversubscribe` where N
//! exceeds the cores, which the table says). Each rank steps with one thread; the
//! gradients are each rank's own (`Gradients::Local`: reduce-scatter, then all-gather of
//! the parameters), clipping on. Time per step: the slowest rank's mean over the timed
//! steps, after one untimed step; "outside the collectives": the largest over the ranks of
//! a rank's step time less its time in the bulk collectives (`DistLamb::comm_seconds`),
//! i.e. its computation and copies.

#[allow(dead_code)]
#[path = "../../benches/src/shapes.rs"]
mod shapes;

use std::process::Command;
use std::time::Instant;

use lamb_mpi::{DistLamb, Gradients, Model};
use lamb_std::lamb_core::{BLOCK, LambConfig};
use mpi::collective::SystemOperation;
use mpi::traits::CommunicatorCollectives;

const WORKER: &str = "LAMB_MPI_BENCH_WORKER";

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    match std::env::var(WORKER) {
        Ok(_) => worker(quick),
        Err(_) => launch(quick),
    }
}

/// The model: BERT-base's tensors (1/1000 of each with `--test`).
fn shapes(quick: bool) -> Vec<(String, usize)> {
    let bert = shapes::bert_base();
    if quick {
        shapes::scaled(&bert, 1000)
    } else {
        bert
    }
}

/// Runs the worker under `mpirun` for each N and prints the table.
fn launch(quick: bool) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let params: usize = shapes(quick).iter().map(|s| s.1).sum();
    println!(
        "BERT-base{}: {:.1}M parameters, f32; {cores} cores; one thread per rank",
        if quick { " / 1000" } else { "" },
        params as f64 / 1e6
    );
    println!(
        "| N | ranks on cores | step time | of which outside the collectives | bytes sent per rank per step | model: 2(N-1)/N*4 B*P + 48 B*blocks*(N-1)/N | counted / model |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let worlds: &[usize] = if quick { &[1, 2] } else { &[1, 2, 4] };
    let exe = std::env::current_exe().expect("the bench binary");
    for &n in worlds {
        let out = Command::new("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "-np",
                &n.to_string(),
                "-x",
                WORKER,
            ])
            .arg(&exe)
            .args(if quick { &["--test"][..] } else { &[][..] })
            .env(WORKER, "1")
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            // Ranks that wait yield the core: on a machine with fewer free cores than ranks,
            // a spinning rank would otherwise slow the one it waits for.
            .env("OMPI_MCA_mpi_yield_when_idle", "1")
            .output();
        let out = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => panic!(
                "the job at N = {n} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => {
                println!("SKIPPED: mpirun cannot be run ({e})");
                return;
            }
        };
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .expect("the job's result");
        let v: Vec<f64> = line
            .split(' ')
            .map(|x| x.parse().expect("a number"))
            .collect();
        let (secs, bytes, compute) = (v[0], v[1], v[2]);
        let blocks: usize = shapes(quick).iter().map(|s| s.1.div_ceil(BLOCK)).sum();
        let nf = n as f64;
        let model =
            2.0 * (nf - 1.0) / nf * 4.0 * params as f64 + 48.0 * blocks as f64 / nf * (nf - 1.0);
        let load = if n > cores {
            format!("{n} on {cores} (oversubscribed)")
        } else {
            format!("{n} on {cores}")
        };
        let ratio = if model > 0.0 {
            format!("{:.4}", bytes / model)
        } else {
            "-".into()
        };
        println!(
            "| {n} | {load} | {:.1} ms | {:.1} ms | {:.2} MB | {:.2} MB | {ratio} |",
            secs * 1e3,
            compute * 1e3,
            bytes / 1e6,
            model / 1e6
        );
    }
}

/// One rank: set-up, one untimed step, timed steps; rank 0 prints `RESULT secs bytes`.
fn worker(quick: bool) {
    let universe = mpi::initialize().expect("MPI initializes once");
    lamb_mpi::abort_on_panic();
    let world = universe.world();
    let shapes = shapes(quick);
    let mut model = Model::with_decay_split(LambConfig::nvlamb());
    for (name, len) in &shapes {
        let matrix = !(name.ends_with(".bias") || name.contains("LayerNorm"));
        let shape = if matrix { vec![1, *len] } else { vec![*len] };
        model.add_param(name.clone(), &shape);
    }
    model.set_max_grad_norm(Some(1.0));
    let mut opt = DistLamb::new(&world, model).expect("set-up");
    let rank = opt.rank();
    let mut params: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, n)| (0..*n).map(|i| (i % 101) as f32 * 1e-3 - 0.05).collect())
        .collect();
    let grads: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, n)| {
            (0..*n)
                .map(|i| ((i * 13 + rank) % 97) as f32 * 1e-4 - 0.005)
                .collect()
        })
        .collect();
    let g: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
    let mut step = |opt: &mut DistLamb| {
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
        let r = opt.step_f32(&mut p, &g, Gradients::Local).expect("step");
        assert!(r.applied);
    };
    step(&mut opt);
    let timed = if quick { 1 } else { 5 };
    let (before, comm_before) = (opt.bytes_sent(), opt.comm_seconds());
    world.barrier();
    let t = Instant::now();
    for _ in 0..timed {
        step(&mut opt);
    }
    let mine = t.elapsed().as_secs_f64() / timed as f64;
    let mut slowest = 0.0f64;
    world.all_reduce_into(&mine, &mut slowest, SystemOperation::max());
    let bytes = (opt.bytes_sent() - before) as f64 / timed as f64;
    // The computation and copies of the slowest rank: its step less its collectives.
    let compute = mine - (opt.comm_seconds() - comm_before) / timed as f64;
    let mut compute_max = 0.0f64;
    world.all_reduce_into(&compute, &mut compute_max, SystemOperation::max());
    if rank == 0 {
        println!("RESULT {slowest} {bytes} {compute_max}");
    }
}
