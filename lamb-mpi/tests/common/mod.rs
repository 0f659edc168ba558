//! What the MPI jobs and their single-process references share: the test model, its
//! parameters and gradients, and the launcher of `mpirun` jobs.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lamb_mpi::Model;
use lamb_std::lamb_core::LambConfig;
use lamb_std::lamb_core::half::bf16;
use lamb_std::lamb_core::layer::Rounding;
use lamb_std::{GroupId, ParamsIn, Precision, StateFormat};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The environment variable that makes the test binary's `mpi_worker` run a scenario.
pub const SCENARIO: &str = "LAMB_MPI_SCENARIO";
/// The job's directory (files the ranks write for the test to read).
pub const DIR: &str = "LAMB_MPI_DIR";

/// The test model: five layers, a layer spanning ranks, groups with every state format in
/// the compact variant (8-bit, bf16 with a master copy, bf16 parameters updated in place
/// with stochastic rounding), clipping on.
pub fn model(compact: bool) -> Model {
    let mut m = Model::with_decay_split(LambConfig::nvlamb());
    let emb = m.add_group("emb", LambConfig::nvlamb(), 0.5);
    let half = m.add_group("half", LambConfig::nvlamb(), 1.0);
    if compact {
        let q8 = Precision {
            moments: StateFormat::Q8,
            ..Precision::default()
        };
        m.set_precision(GroupId(0), q8);
        let bf = Precision {
            moments: StateFormat::Bf16,
            ..Precision::default()
        };
        m.set_precision(emb, bf);
        let in_place = Precision {
            moments: StateFormat::Bf16,
            master: false,
            rounding: Rounding::Stochastic { seed: 7 },
            ..Precision::default()
        };
        m.set_precision(half, in_place);
    }
    m.add_param("enc.weight", &[37, 300]);
    m.add_param("enc.bias", &[37]);
    m.add_layer_to(emb, "emb.weight", 9000);
    m.add_layer_to(half, "head.weight", 5000);
    m.add_param("head.bias", &[3]);
    m.set_max_grad_norm(Some(1.0));
    m
}

/// The layers' lengths.
pub fn lens(compact: bool) -> Vec<usize> {
    model(compact).layers().iter().map(|l| l.1).collect()
}

/// Whether layer `i` is stored in bf16 (the compact variant's emb and head weights).
pub fn is_bf16(compact: bool, i: usize) -> bool {
    compact && (i == 2 || i == 3)
}

/// Parameters of one model, in each layer's storage.
pub enum Tensor {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// The initial parameters (the same on every rank: seeded).
pub fn init_params(compact: bool) -> Vec<Tensor> {
    let mut rng = SmallRng::seed_from_u64(42);
    lens(compact)
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            // Layer 0's blocks span 2^60 in p², so that the f64 sum of its blocks rounds
            // (its bits depend on the order of the blocks).
            let scale = |k: usize| {
                if i == 0 {
                    (2.0f32).powi(10 * (k / 1024 % 4) as i32 - 15)
                } else {
                    1.0
                }
            };
            let x: Vec<f32> = (0..n)
                .map(|k| rng.random_range(-0.5f32..0.5) * scale(k))
                .collect();
            if is_bf16(compact, i) {
                Tensor::Bf16(x.iter().map(|&v| bf16::from_f32(v)).collect())
            } else {
                Tensor::F32(x)
            }
        })
        .collect()
}

/// The views a step takes.
pub fn views(p: &mut [Tensor]) -> Vec<ParamsIn<'_>> {
    p.iter_mut()
        .map(|t| match t {
            Tensor::F32(x) => ParamsIn::F32(x),
            Tensor::Bf16(x) => ParamsIn::Bf16(x),
        })
        .collect()
}

/// The parameters as bytes (to compare bit for bit).
pub fn param_bytes(p: &[Tensor]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in p {
        match t {
            Tensor::F32(x) => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::Bf16(x) => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        }
    }
    out
}

/// [`param_bytes`]' inverse.
pub fn params_from_bytes(compact: bool, bytes: &[u8]) -> Vec<Tensor> {
    let mut at = 0;
    let mut out = Vec::new();
    for (i, n) in lens(compact).into_iter().enumerate() {
        if is_bf16(compact, i) {
            let b = &bytes[at..at + 2 * n];
            at += 2 * n;
            out.push(Tensor::Bf16(
                b.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ));
        } else {
            let b = &bytes[at..at + 4 * n];
            at += 4 * n;
            out.push(Tensor::F32(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ));
        }
    }
    out
}

/// The averaged gradients of step `step`: multiples of 2^-12 below 0.25, so that the
/// ranks' gradients of [`rank_grads`] sum exactly; step 3 has a NaN in layer 2.
pub fn averaged_grads(compact: bool, step: u64) -> Vec<Vec<f32>> {
    let mut rng = SmallRng::seed_from_u64(1000 + step);
    let mut g: Vec<Vec<f32>> = lens(compact)
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .map(|k| rng.random_range(-1000i32..1000) as f32 / 4096.0 * grad_scale(i, k))
                .collect()
        })
        .collect();
    if step == NAN_STEP {
        g[2][5] = f32::NAN;
    }
    g
}

/// The scale of gradient element `k` of layer `i`: layer 0's blocks span 2^-30..1, so
/// that the f64 sum of their Σg² rounds (its bits depend on the order of the blocks).
fn grad_scale(i: usize, k: usize) -> f32 {
    if i == 0 {
        (2.0f32).powi(-10 * (k / 1024 % 4) as i32)
    } else {
        1.0
    }
}

/// The step whose gradients hold a NaN (on one rank only, in the MPI jobs).
pub const NAN_STEP: u64 = 3;

/// Rank `rank`'s gradients of step `step` among `world` ranks: the average plus
/// `(2·rank − (world − 1))·2^-13`, which sums to zero over the ranks; the NaN of
/// [`NAN_STEP`] only on the last rank.
pub fn rank_grads(compact: bool, step: u64, rank: usize, world: usize) -> Vec<Vec<f32>> {
    let d = (2 * rank as i32 - (world as i32 - 1)) as f32 / 8192.0;
    let mut g = averaged_grads(compact, step);
    for (i, layer) in g.iter_mut().enumerate() {
        for (k, x) in layer.iter_mut().enumerate() {
            if step == NAN_STEP && i == 2 && k == 5 {
                *x = if rank + 1 == world { f32::NAN } else { 0.25 };
            } else {
                *x += d * grad_scale(i, k);
            }
        }
    }
    g
}

/// Runs `mpirun -np world` on this test binary's `mpi_worker` with `scenario`, killing it
/// after `limit`; the job's stdout, or `None` (after printing SKIPPED) without `mpirun`.
pub fn mpirun(world: usize, scenario: &str, dir: &Path, limit: Duration) -> Option<(bool, String)> {
    if Command::new("mpirun").arg("--version").output().is_err() {
        println!("SKIPPED: mpirun is not installed (README, \"Tests\")");
        return None;
    }
    // One job at a time: the tests of this binary run in parallel threads.
    static ONE_JOB: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_JOB.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("the test binary");
    let mut child = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &world.to_string(),
        ])
        .args(["-x", SCENARIO, "-x", DIR])
        .arg(exe)
        .args([
            "--exact",
            "mpi_worker",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(SCENARIO, scenario)
        .env(DIR, dir)
        // Containers often forbid the cross-memory attach of OpenMPI's shared-memory
        // transport; copying through shared memory works everywhere.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("mpirun starts");
    // Read on a thread, so that a full pipe cannot stall the job.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let out = reader.join().unwrap_or_default();
                return Some((status.success(), out));
            }
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the MPI job `{scenario}` at N = {world} ran past {limit:?}: a hang");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for mpirun: {e}"),
        }
    }
}

/// The lines rank `rank` printed with prefix `key` (`R{rank} {key} ...`), without the prefix.
pub fn lines_of(out: &str, rank: usize, key: &str) -> Vec<String> {
    let prefix = format!("R{rank} {key} ");
    out.lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .collect()
}
