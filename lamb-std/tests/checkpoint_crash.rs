//! Never losing a checkpoint: a child process trains and saves in a loop, resuming
//! from the checkpoint on disk each time it starts, and is killed with SIGKILL after a random
//! delay, hundreds of times. After every kill the checkpoint on disk must load, equal the
//! state of an uninterrupted run at its step (so it is one of the saved states, complete),
//! and never go back in steps; and the temporary files of killed saves never pile up: at
//! most one is ever left beside the checkpoint (each save removes those whose writer died).
//!
//! The child is this test binary itself, running [`crash_child`] with
//! `LAMB_CHECKPOINT_CRASH_CHILD` set to the directory to work in.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lamb_std::lamb_core::{LambConfig, Schedule};
use lamb_std::{Lamb, LayerId};
use rand::distr::Uniform;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "LAMB_CHECKPOINT_CRASH_CHILD";
const FILE: &str = "ckpt.safetensors";
const READY: &str = "crash-child-ready";
const SAVED: &str = "crash-child-saved";
/// How many times the saving child is killed.
const KILLS: usize = 200;
/// The random delay between the child's "ready" and the kill.
const MAX_DELAY_US: u64 = 8_000;

/// `n` values uniform in [−scale, scale).
fn uniform(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    let dist = Uniform::new(-scale, scale).unwrap();
    (0..n).map(|_| rng.sample(dist)).collect()
}

const LAYERS: [(&str, usize); 4] = [("w1", 1536), ("b1", 48), ("w2", 480), ("b2", 10)];

fn model() -> (Lamb, Vec<Vec<f32>>) {
    let mut opt = Lamb::with_decay_split(LambConfig::timm()).unwrap();
    let mut rng = SmallRng::seed_from_u64(3);
    let mut params = Vec::new();
    for (name, len) in LAYERS {
        let shape: &[usize] = if name.starts_with('w') {
            &[len / 16, 16]
        } else {
            &[len]
        };
        opt.add_param(name, shape).unwrap();
        params.push(uniform(&mut rng, len, 0.1));
    }
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    opt.set_schedule(Schedule::WarmupPoly {
        warmup: 5,
        total: 100_000,
        power: 1.0,
        end: 0.0,
    })
    .unwrap();
    (opt, params)
}

/// Step `t + 1` with its own gradients.
fn step(opt: &mut Lamb, params: &mut [Vec<f32>]) {
    let mut rng = SmallRng::seed_from_u64(opt.steps() + 1);
    let g: Vec<Vec<f32>> = LAYERS
        .iter()
        .map(|(_, n)| uniform(&mut rng, *n, 0.01))
        .collect();
    let mut pp: Vec<&mut [f32]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
    let gg: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
    assert!(opt.step(&mut pp, &gg).unwrap().applied);
}

fn bits(opt: &Lamb, params: &[Vec<f32>]) -> Vec<u32> {
    let mut out = vec![opt.steps() as u32];
    for (i, p) in params.iter().enumerate() {
        let l = opt.layer(LayerId(i)).unwrap();
        out.extend(p.iter().chain(l.m).chain(l.v).map(|x| x.to_bits()));
    }
    out
}

fn load(path: &Path) -> Result<(Lamb, Vec<Vec<f32>>), lamb_std::Error> {
    let (mut opt, mut params) = model();
    let mut pp: Vec<&mut [f32]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
    opt.load_with_params(path, &mut pp)?;
    Ok((opt, params))
}

/// The child: resume from the checkpoint if there is one, say "ready", then step and save
/// until killed. Does nothing in a normal test run.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let path = PathBuf::from(dir).join(FILE);
    let (mut opt, mut params) = if path.exists() {
        load(&path).expect("the checkpoint left by the killed child loads")
    } else {
        model()
    };
    // (libtest prints "test crash_child ... " before it on the same line.)
    println!("{READY} {}", opt.steps());
    loop {
        step(&mut opt, &mut params);
        let pp: Vec<&[f32]> = params.iter().map(|x| x.as_slice()).collect();
        opt.save_with_params(&path, &pp).unwrap();
        println!("{SAVED} {}", opt.steps());
    }
}

/// Starts a child that resumes from the checkpoint in `dir` and saves step after step,
/// waits until it has loaded it and then for 0 or 1 save, and kills it (SIGKILL) after a
/// random delay.
fn kill_a_saving_child(
    exe: &std::path::Path,
    dir: &std::path::Path,
    rng: &mut SmallRng,
    kill: usize,
) {
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the child has loaded the checkpoint, and then for 0 or 1 save (so
    // that the run progresses however slow the disk), then kill it after a random delay.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut saves = rng.random_range(0..2);
    let ready = loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break false;
        }
        if line.contains(READY) && saves == 0 {
            break true;
        }
        if line.contains(SAVED) {
            saves -= 1;
            if saves == 0 {
                break true;
            }
        }
    };
    if !ready {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        panic!("kill #{kill}: the child did not start:\n{err}");
    }
    std::thread::sleep(Duration::from_micros(rng.random_range(0..MAX_DELAY_US)));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// The temporary files a kill left behind in `dir`: at most one.
fn temporary_files_left(dir: &std::path::Path, kill: usize) -> usize {
    // A temporary file left behind means the kill landed inside a save, after its
    // temporary file got a name. They are left for the next save to remove: however
    // many kills, never more than the one of the last kill.
    let temps: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != FILE)
        .collect();
    assert!(
        temps.len() <= 1,
        "kill #{kill}: {} temporary files left behind: {temps:?}",
        temps.len()
    );
    temps.len()
}

#[test]
fn killed_while_saving_the_checkpoint_on_disk_always_loads() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("checkpoint-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(FILE);
    let exe = std::env::current_exe().unwrap();

    let (mut reference, mut reference_params) = model();
    let mut rng = SmallRng::seed_from_u64(0xC0FFEE);
    let (mut last_step, mut with_temp, mut resumed_at_same) = (0u64, 0usize, 0usize);
    let mut max_temps = 0usize;
    let start = Instant::now();
    for kill in 0..KILLS {
        kill_a_saving_child(&exe, &dir, &mut rng, kill);
        let temps = temporary_files_left(&dir, kill);
        with_temp += usize::from(temps > 0);
        max_temps = max_temps.max(temps);

        if !path.exists() {
            assert_eq!(last_step, 0, "kill #{kill}: the checkpoint disappeared");
            continue;
        }
        let (opt, params) = load(&path)
            .unwrap_or_else(|e| panic!("kill #{kill}: the checkpoint on disk does not load: {e}"));
        let k = opt.steps();
        assert!(
            k >= last_step,
            "kill #{kill}: went back from step {last_step} to {k}"
        );
        resumed_at_same += usize::from(k == last_step);
        last_step = k;
        while reference.steps() < k {
            step(&mut reference, &mut reference_params);
        }
        assert!(
            bits(&opt, &params) == bits(&reference, &reference_params),
            "kill #{kill}: the checkpoint of step {k} is not the state of step {k}"
        );
    }
    let elapsed = start.elapsed();
    println!(
        "{KILLS} SIGKILLs of a saving process in {elapsed:.2?}: the checkpoint always loaded and \
         equalled the saved state of its step; {with_temp} kills left a temporary file behind \
         (at most {max_temps} at a time); reached step {last_step}; {resumed_at_same} kills \
         left the step where it was"
    );
    assert!(last_step > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
