//! Real MPI jobs, launched from `cargo test`: each test runs `mpirun -np N` on this test
//! binary, whose `mpi_worker` entry (a no-op outside a job) runs a scenario on every rank;
//! the test then compares what the ranks printed and wrote with single-process lamb-std.
//! Without `mpirun` each test prints SKIPPED and passes (README, "Tests", installs it).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use lamb_mpi::{DistLamb, Gradients, Model};
use lamb_std::Lamb;

const LIMIT: Duration = Duration::from_secs(120);

/// The entry point of every rank of a job; does nothing in an ordinary `cargo test`.
#[test]
fn mpi_worker() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR).expect("the job's directory"));
    let universe = mpi::initialize().expect("MPI initializes once");
    lamb_mpi::abort_on_panic();
    let world = universe.world();
    let mut args = scenario.split(':');
    match args.next() {
        Some("steps") => steps(&world, &dir, args.next() == Some("compact")),
        Some("resume-a") => resume(&world, &dir, None),
        Some("resume-b") => resume(&world, &dir, Some(args.next().unwrap_or("a.safetensors"))),
        Some("panic") => {
            // Rank 1 panics before the first collective; the others wait in it.
            if mpi::traits::Communicator::rank(&world) == 1 {
                panic!("injected panic on rank 1");
            }
            let _ = DistLamb::new(&world, model(false));
            unreachable!("rank 1 never joins the set-up");
        }
        Some("bad") => bad_input(&world, args.next().unwrap_or("")),
        other => panic!("unknown scenario {other:?}"),
    }
}

/// Rank output: `R{rank} {key} {value}`.
fn say(opt_rank: usize, key: &str, value: impl std::fmt::Display) {
    println!("R{opt_rank} {key} {value}");
}

/// Steps 1..=5 (step 3 with a NaN on the last rank, step 4 pre-reduced), then the
/// parameters and a checkpoint written, and the state bytes printed.
fn steps(world: &mpi::topology::SimpleCommunicator, dir: &Path, compact: bool) {
    let mut opt = DistLamb::new(world, model(compact)).expect("set-up");
    // Threads per rank differ between ranks: the bits do not depend on them.
    opt.set_threads(1 + opt.rank() % 2).expect("threads");
    let mut params = init_params(compact);
    for step in 1..=5 {
        run_step(&mut opt, &mut params, compact, step);
    }
    finish(&opt, &params, dir, "ckpt.safetensors", "params");
}

/// One step of the scenario: gradients of this rank (pre-reduced at step 4).
fn run_step(opt: &mut DistLamb, params: &mut [Tensor], compact: bool, step: u64) {
    let (rank, n) = (opt.rank(), opt.world());
    let (grads, mode) = if step == 4 {
        (averaged_grads(compact, step), Gradients::Averaged)
    } else {
        (rank_grads(compact, step, rank, n), Gradients::Local)
    };
    let g: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
    let before = param_bytes(params);
    let report = opt.step(&mut views(params), &g, mode).expect("step");
    say(
        rank,
        "report",
        format!(
            "{step} {} {:?}",
            report.applied,
            report.grad_norm.map(f64::to_bits)
        ),
    );
    if !report.applied {
        assert_eq!(
            param_bytes(params),
            before,
            "a skipped step wrote parameters"
        );
    }
}

/// Writes this rank's parameters and the checkpoint, prints the state bytes.
fn finish(opt: &DistLamb, params: &[Tensor], dir: &Path, ckpt: &str, params_file: &str) {
    let rank = opt.rank();
    std::fs::write(
        dir.join(format!("{params_file}.{rank}")),
        param_bytes(params),
    )
    .expect("write");
    opt.save(dir.join(ckpt)).expect("save");
    say(rank, "state_bytes", opt.state_bytes());
    say(rank, "done", "");
}

/// Steps 1..=2 from scratch (`resume: None`), or a load of `resume` and the parameters
/// of rank 0 of the first job, then steps 3..=5.
fn resume(world: &mpi::topology::SimpleCommunicator, dir: &Path, resume: Option<&str>) {
    let compact = true;
    let mut opt = DistLamb::new(world, model(compact)).expect("set-up");
    let (mut params, steps, (out, params_file)) = match resume {
        None => (init_params(compact), 1..=2, ("a.safetensors", "params")),
        Some(file) => {
            opt.load(dir.join(file)).expect("load");
            assert_eq!(opt.steps(), 2);
            let bytes = std::fs::read(dir.join("params.0")).expect("params");
            (
                params_from_bytes(compact, &bytes),
                3..=5,
                ("b.safetensors", "params.b"),
            )
        }
    };
    for step in steps {
        run_step(&mut opt, &mut params, compact, step);
    }
    finish(&opt, &params, dir, out, params_file);
}

/// Rank 1 (or 2) makes one mistake; every rank prints the error it got, then takes a
/// correct step (no rank is stuck in a collective, and nothing was changed).
fn bad_input(world: &mpi::topology::SimpleCommunicator, kind: &str) {
    use mpi::traits::Communicator;
    let rank = world.rank() as usize;
    let mut m = model(false);
    if kind == "nan-config" && rank == 1 {
        m = Model::with_decay_split(lamb_std::lamb_core::LambConfig {
            lr: f64::NAN,
            ..lamb_std::lamb_core::LambConfig::nvlamb()
        });
    }
    if kind == "table" && rank == 2 {
        m.add_layer("extra.weight", 10);
    }
    let mut opt = match DistLamb::new(world, m) {
        Ok(opt) => opt,
        Err(e) => {
            say(rank, "err", &e);
            return;
        }
    };
    let mut params = init_params(false);
    let mut grads = rank_grads(false, 1, rank, opt.world());
    if kind == "length" && rank == 1 {
        grads[3].pop();
    }
    let mut g: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
    if kind == "count" && rank == 1 {
        g.pop();
    }
    let mut p = views(&mut params);
    if kind == "storage" && rank == 2 {
        let mut half = vec![lamb_std::lamb_core::half::bf16::ZERO; 11100];
        p[0] = lamb_std::ParamsIn::Bf16(&mut half);
        let r = opt.step(&mut p, &g, Gradients::Local);
        say(rank, "err", r.expect_err("refused"));
        drop(p);
    } else {
        match opt.step(&mut p, &g, Gradients::Local) {
            Err(e) => say(rank, "err", e),
            Ok(r) => say(rank, "ok", r.applied),
        }
        drop(p);
    }
    // Afterwards a correct step runs on every rank, from the unchanged state.
    let grads = rank_grads(false, 1, rank, opt.world());
    let g: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
    let r = opt
        .step(&mut views(&mut params), &g, Gradients::Local)
        .expect("a good step");
    say(rank, "after", format!("{} {}", r.applied, r.step));
}

/// The single-process run of steps `steps` from `opt`'s state and `params`; the reports.
fn reference_steps(
    opt: &mut Lamb,
    params: &mut [Tensor],
    compact: bool,
    steps: std::ops::RangeInclusive<u64>,
) -> Vec<String> {
    let mut reports = Vec::new();
    for step in steps {
        let g = averaged_grads(compact, step);
        let grads: Vec<lamb_std::lamb_core::layer::Grads<'_>> = g
            .iter()
            .map(|x| lamb_std::lamb_core::layer::Grads::F32(x))
            .collect();
        let r = opt
            .step_mixed(&mut views(params), &grads)
            .expect("reference step");
        reports.push(format!(
            "{step} {} {:?}",
            r.applied,
            r.grad_norm.map(f64::to_bits)
        ));
    }
    reports
}

/// Runs the `steps` job at N and compares everything with single-process lamb-std.
fn bit_identical_at(world: usize, compact: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let scenario = format!("steps:{}", if compact { "compact" } else { "f32" });
    let Some((ok, out)) = mpirun(world, &scenario, dir.path(), LIMIT) else {
        return;
    };
    assert!(ok, "the job failed:\n{out}");
    let mut lamb = model(compact).to_lamb().expect("reference");
    let mut params = init_params(compact);
    let reports = reference_steps(&mut lamb, &mut params, compact, 1..=5);
    assert!(
        reports[2].starts_with("3 false"),
        "the reference skips the NaN step: {reports:?}"
    );
    let mut total = 0;
    for rank in 0..world {
        assert_eq!(
            lines_of(&out, rank, "report"),
            reports,
            "rank {rank} reports"
        );
        let p = std::fs::read(dir.path().join(format!("params.{rank}"))).expect("params");
        assert!(
            p == param_bytes(&params),
            "N = {world}: rank {rank}'s parameters differ"
        );
        let bytes: usize = lines_of(&out, rank, "state_bytes")[0]
            .parse()
            .expect("a number");
        total += bytes;
    }
    let expected = lamb.to_checkpoint_bytes().expect("reference checkpoint");
    let file = std::fs::read(dir.path().join("ckpt.safetensors")).expect("checkpoint");
    if let Err(e) = same_checkpoint(&file, &expected) {
        let mut theirs = model(compact).to_lamb().expect("lamb");
        theirs
            .load_checkpoint_bytes(&file)
            .expect("the job's checkpoint loads");
        first_state_difference(&lamb, &theirs);
        panic!("N = {world}: the checkpoint differs from lamb-std's: {e}");
    }
    // The state is split, not copied: together the ranks hold lamb-std's state. The shards
    // are balanced by elements: with f32 state each rank holds 1/N of it (within the
    // blocks of 1024 elements at 8 B of each shard's two ends); with formats of different
    // sizes (compact), the bytes follow the formats of the layers each rank got.
    let n_params: usize = lens(compact).iter().sum();
    let whole = (lamb.bytes_per_param() * n_params as f64).round() as usize;
    assert_eq!(
        total, whole,
        "N = {world}: the ranks' state bytes add up to lamb-std's"
    );
    for rank in 0..world {
        let bytes: usize = lines_of(&out, rank, "state_bytes")[0]
            .parse()
            .expect("a number");
        if !compact {
            let slack = 2 * 1024 * 8;
            assert!(
                bytes.abs_diff(whole / world) <= slack,
                "N = {world}: rank {rank} holds {bytes} of {whole} B"
            );
        }
        println!("N = {world}: rank {rank} holds {bytes} B of state, lamb-std {whole} B");
    }
}

#[test]
fn f32_state_is_bit_identical_to_lamb_std_at_1_to_4_ranks() {
    for n in 1..=4 {
        bit_identical_at(n, false);
    }
}

#[test]
fn compact_state_is_bit_identical_to_lamb_std_at_1_to_4_ranks() {
    for n in 1..=4 {
        bit_identical_at(n, true);
    }
}

/// A checkpoint of 3 ranks resumes at 2 ranks and in single-process lamb-std, and one of
/// lamb-std resumes at 2 ranks, all bit-identical to a run that never stopped.
#[test]
fn a_checkpoint_saved_at_3_ranks_resumes_at_2_and_in_lamb_std() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((ok, out)) = mpirun(3, "resume-a", dir.path(), LIMIT) else {
        return;
    };
    assert!(ok, "job a failed:\n{out}");
    let compact = true;
    // lamb-std's own checkpoint after the same two steps.
    let mut two = model(compact).to_lamb().expect("reference");
    let mut p2 = init_params(compact);
    reference_steps(&mut two, &mut p2, compact, 1..=2);
    two.save(dir.path().join("lamb.safetensors"))
        .expect("lamb-std saves");
    let a = std::fs::read(dir.path().join("a.safetensors")).expect("a");
    let lamb_file = std::fs::read(dir.path().join("lamb.safetensors")).expect("lamb");
    same_checkpoint(&a, &lamb_file).expect("the 3-rank checkpoint is lamb-std's");
    // Never stopped: steps 1..=5 in one process.
    let mut straight = model(compact).to_lamb().expect("reference");
    let mut params = init_params(compact);
    reference_steps(&mut straight, &mut params, compact, 1..=5);
    let expected = straight.to_checkpoint_bytes().expect("checkpoint");
    for file in ["a.safetensors", "lamb.safetensors"] {
        let scenario = format!("resume-b:{file}");
        let (ok, out) = mpirun(2, &scenario, dir.path(), LIMIT).expect("mpirun");
        assert!(ok, "job b from {file} failed:\n{out}");
        let b = std::fs::read(dir.path().join("b.safetensors")).expect("b");
        same_checkpoint(&b, &expected).expect("resumed at N = 2: the checkpoint");
        for rank in 0..2 {
            let p = std::fs::read(dir.path().join(format!("params.b.{rank}"))).expect("params");
            assert!(
                p == param_bytes(&params),
                "{file} resumed at N = 2: rank {rank}'s parameters differ"
            );
        }
    }
    // Resumed in lamb-std from the 3-rank file.
    let mut resumed = model(compact).to_lamb().expect("lamb");
    resumed
        .load(dir.path().join("a.safetensors"))
        .expect("lamb-std loads the 3-rank file");
    let mut p = params_from_bytes(
        compact,
        &std::fs::read(dir.path().join("params.0")).expect("params"),
    );
    reference_steps(&mut resumed, &mut p, compact, 3..=5);
    let bytes = resumed.to_checkpoint_bytes().expect("checkpoint");
    same_checkpoint(&bytes, &expected).expect("resumed in lamb-std: the checkpoint");
    assert!(param_bytes(&p) == param_bytes(&params));
}

/// Each bad input on one rank: every rank returns the same error, naming that rank and
/// the layer, within the time limit; then a correct step runs everywhere.
#[test]
fn a_bad_input_on_one_rank_is_the_same_error_on_every_rank() {
    let cases = [
        ("count", "refused on rank 1", "4 gradient tensors"),
        ("length", "refused on rank 1", "head.weight"),
        ("storage", "refused on rank 2", "storage"),
        ("nan-config", "refused on rank 1", "lr"),
        ("table", "rank 2 registered another model", "extra.weight"),
    ];
    for (kind, who, what) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((ok, out)) = mpirun(
            3,
            &format!("bad:{kind}"),
            dir.path(),
            Duration::from_secs(60),
        ) else {
            return;
        };
        assert!(ok, "{kind}: the job failed:\n{out}");
        let errors: Vec<Vec<String>> = (0..3).map(|r| lines_of(&out, r, "err")).collect();
        assert_eq!(errors[0].len(), 1, "{kind}: rank 0 got no error:\n{out}");
        assert!(
            errors.iter().all(|e| *e == errors[0]),
            "{kind}: the ranks disagree: {errors:?}"
        );
        let e = &errors[0][0];
        assert!(e.contains(who) && e.contains(what), "{kind}: {e}");
        println!("{kind}: every rank: {e}");
        if !matches!(kind, "nan-config" | "table") {
            for r in 0..3 {
                assert_eq!(lines_of(&out, r, "after"), ["true 1"], "{kind}: rank {r}");
            }
        }
    }
}

/// Panics naming the first layer whose state differs between `a` and `b`.
fn first_state_difference(a: &Lamb, b: &Lamb) {
    assert_eq!(a.steps(), b.steps(), "step counters");
    for i in 0..a.layer_count() {
        let (x, y) = (
            a.layer(lamb_std::LayerId(i)).unwrap(),
            b.layer(lamb_std::LayerId(i)).unwrap(),
        );
        assert_eq!(
            format!("{:?}", x.state),
            format!("{:?}", y.state),
            "layer {i} moments"
        );
        assert_eq!(x.master, y.master, "layer {i} master");
    }
}

/// Whether two checkpoint files hold the same thing: the same metadata (but the checksum,
/// which covers the bytes) and the same tensors, byte for byte. The files' bytes may differ
/// only in the order of the metadata's keys, which the safetensors writer takes from a
/// hash map.
fn same_checkpoint(a: &[u8], b: &[u8]) -> Result<(), String> {
    use safetensors::SafeTensors;
    let (ha, hb) = (SafeTensors::read_metadata(a), SafeTensors::read_metadata(b));
    let (ha, hb) = (
        ha.map_err(|e| e.to_string())?.1,
        hb.map_err(|e| e.to_string())?.1,
    );
    let meta = |m: &safetensors::tensor::Metadata| {
        let mut m = m.metadata().clone().unwrap_or_default();
        m.remove("lamb.checksum");
        m
    };
    if meta(&ha) != meta(&hb) {
        return Err(format!("metadata: {:?} vs {:?}", meta(&ha), meta(&hb)));
    }
    let (ta, tb) = (SafeTensors::deserialize(a), SafeTensors::deserialize(b));
    let (ta, tb) = (
        ta.map_err(|e| e.to_string())?,
        tb.map_err(|e| e.to_string())?,
    );
    let (mut na, mut nb) = (ta.names(), tb.names());
    na.sort();
    nb.sort();
    if na != nb {
        return Err(format!("tensors {na:?} vs {nb:?}"));
    }
    for name in na {
        let (x, y) = (ta.tensor(name), tb.tensor(name));
        let (x, y) = (x.map_err(|e| e.to_string())?, y.map_err(|e| e.to_string())?);
        if x.dtype() != y.dtype() || x.shape() != y.shape() || x.data() != y.data() {
            return Err(format!("tensor {name} differs"));
        }
    }
    Ok(())
}

/// A rank that panics takes the job down (`abort_on_panic`: MPI_Abort) instead of leaving
/// the others waiting in a collective: mpirun fails, within the time limit.
#[test]
fn a_panic_on_one_rank_ends_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((ok, out)) = mpirun(3, "panic", dir.path(), Duration::from_secs(60)) else {
        return;
    };
    assert!(!ok, "the job should have failed:\n{out}");
}
