//! The digits MLP of lamb-std's `train_digits` example, trained data-parallel over MPI with
//! [`DistLamb`]: the global batch split across the ranks, each rank computing the gradients
//! of its micro-batch, the optimizer state sharded. Rank 0 also trains the same model in
//! one process with lamb-std at the same global batch, and prints both in the table of
//! `train_digits` with the largest difference between the two loss curves.
//!
//! ```text
//! cargo build --release -p lamb-mpi --example train_digits_mpi
//! mpirun -np 2 target/release/examples/train_digits_mpi
//! ```
//!
//! (as root, add `--allow-run-as-root`; more ranks than cores, `--oversubscribe`).
//!
//! LAMB (`LambConfig::paper()`, the decay split) at base lr 1e-2 (the base lr
//! `train_digits` tunes at batch 16), the square-root rule, 10% warmup then linear decay,
//! 30 epochs, global batches 64, 256, 1024 and the full training set. The two runs differ
//! only in how the gradients of a batch are summed: per micro-batch then averaged across
//! ranks, or over the whole batch at once. Floating-point addition is not associative, so
//! the curves differ by rounding, which training then amplifies a little; the optimizer
//! itself is bit-identical to lamb-std given the same gradients (the tests of `lamb-mpi`).
//!
//! The distributed run's "in the optimizer step" includes the time a rank waits at the
//! step's collectives for the others (rank 0 also evaluates the loss after every epoch).

#[allow(dead_code)]
#[path = "../../lamb-std/examples/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Dataset, Mlp, RunResult};
use lamb_mpi::{DistLamb, Gradients, Model};
use lamb_std::Lamb;
use lamb_std::lamb_core::{LambConfig, Schedule};
use mpi::traits::Communicator;

const BASE_LR: f64 = 1e-2;
const BASE_BATCH: usize = 16;
const EPOCHS: usize = 30;
const WARMUP: f64 = 0.1;

fn main() {
    let universe = mpi::initialize().expect("MPI initializes once");
    lamb_mpi::abort_on_panic();
    let world = universe.world();
    let (rank, n) = (world.rank() as usize, world.size() as usize);
    let all = common::load_digits();
    let (train, test) = common::split(&all);
    if rank == 0 {
        println!(
            "UCI digits: {} training / {} test images; MLP 64-128-128-10; LAMB, base lr {BASE_LR}; \
             {EPOCHS} epochs; {n} ranks",
            train.len(),
            test.len()
        );
    }
    let mut rows = String::from(
        "| batch | optimizer | lr | steps | peak train loss | final train loss | test loss | test accuracy | wall time | in the optimizer step |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut diffs = Vec::new();
    for batch in [64, 256, 1024, train.len()] {
        let lr = BASE_LR * (batch as f64 / BASE_BATCH as f64).sqrt();
        let dist = train_distributed(&world, &train, &test, batch, lr);
        if rank != 0 {
            continue;
        }
        let single = train_single(&train, &test, batch, lr);
        let label = if batch == train.len() {
            format!("{batch} (full)")
        } else {
            batch.to_string()
        };
        for (name, r) in [
            (format!("LAMB, {n} ranks"), &dist),
            ("LAMB, 1 process".into(), &single),
        ] {
            let peak = r.curve[1..].iter().fold(r.curve[0], |a, &b| a.max(b));
            rows += &format!(
                "| {label} | {name} | {lr:.2e} | {} | {peak:.3} | {:.2e} | {:.4} | {:.2}% | {} | {} |\n",
                r.steps,
                r.train_loss,
                r.test_loss,
                100.0 * r.test_acc,
                secs(r.wall),
                secs(r.opt_time)
            );
        }
        let diff = dist
            .curve
            .iter()
            .zip(&single.curve)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        diffs.push((label, diff, single.train_loss));
    }
    if rank == 0 {
        println!("\n{rows}");
        println!(
            "Largest difference of the loss curve (train loss after every epoch) from the single-process run:"
        );
        for (label, diff, loss) in diffs {
            println!("  batch {label}: {diff:.2e} (final single-process loss {loss:.2e})");
        }
    }
}

/// The optimizer's model: the MLP's tensors in the decay split, the schedule of `batch`.
fn model(train: &Dataset, batch: usize, lr: f64) -> (Model, Schedule) {
    let mut m = Model::with_decay_split(LambConfig {
        lr,
        ..LambConfig::paper()
    });
    for (name, shape) in common::param_specs() {
        m.add_param(name, &shape);
    }
    let total = common::total_steps(train.len(), batch, EPOCHS);
    let schedule = Schedule::WarmupPoly {
        warmup: (total as f64 * WARMUP).ceil() as u64,
        total,
        power: 1.0,
        end: 0.0,
    };
    m.set_schedule(schedule);
    (m, schedule)
}

/// Data-parallel training: the batches of `common::train`'s shuffles, each cut into one
/// contiguous micro-batch per rank. Each rank's gradients (the mean over its micro-batch)
/// are weighted by its share of the batch, so that their average over the ranks is the
/// mean over the whole batch.
fn train_distributed(
    world: &impl Communicator,
    train: &Dataset,
    test: &Dataset,
    batch: usize,
    lr: f64,
) -> RunResult {
    let (rank, n) = (world.rank() as usize, world.size() as usize);
    let mut opt = DistLamb::new(world, model(train, batch, lr).0).expect("set-up");
    let settings = common::TrainSettings {
        batch,
        epochs: EPOCHS,
        seed: common::SEED,
    };
    let batch_step = |mlp: &mut Mlp,
                      chunk: &[usize],
                      grads: &mut Vec<Vec<f32>>,
                      scratch: &mut common::Scratch| {
        let (a, b) = (chunk.len() * rank / n, chunk.len() * (rank + 1) / n);
        let mine = &chunk[a..b];
        if mine.is_empty() {
            grads.iter_mut().for_each(|g| g.fill(0.0));
        } else {
            mlp.loss_and_grad(train, mine, grads, scratch);
            let weight = (mine.len() * n) as f32 / chunk.len() as f32;
            grads.iter_mut().flatten().for_each(|g| *g *= weight);
        }
        let t = Instant::now();
        let mut ps: Vec<&mut [f32]> = mlp.params.iter_mut().map(|p| &mut p[..]).collect();
        let gs: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
        let report = opt
            .step_f32(&mut ps, &gs, Gradients::Local)
            .expect("a valid step");
        (report.applied, t.elapsed())
    };
    let mlp = Mlp::new(common::SEED);
    common::train_loop(mlp, train, test, settings, rank == 0, &|| {}, batch_step)
}

/// The single-process run of `train_digits` at this batch.
fn train_single(train: &Dataset, test: &Dataset, batch: usize, lr: f64) -> RunResult {
    let mut opt = Lamb::with_decay_split(LambConfig {
        lr,
        ..LambConfig::paper()
    })
    .expect("a valid configuration");
    common::register(&mut opt);
    opt.set_schedule(model(train, batch, lr).1)
        .expect("a valid schedule");
    common::train(
        opt,
        Mlp::new(common::SEED),
        train,
        test,
        common::TrainSettings {
            batch,
            epochs: EPOCHS,
            seed: common::SEED,
        },
        &|| (),
    )
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
