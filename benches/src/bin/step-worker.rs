//! lamb-std's side of the interleaved comparison (`benches/peers/interleaved.py`): one
//! workload at one thread count, stepped on request, so that a driver can alternate lamb-std
//! with other optimizers round by round in the same minutes of the same machine.
//!
//! ```text
//! step-worker --workload bert_base|uniform_1000x1024|single_16M --threads N
//! ```
//!
//! Registers the workload's tensors (params and grads in `AlignedBuf`s, as in
//! `benches/model.rs`), prints `READY {json}` and then answers lines on stdin:
//!
//! - `run none K` / `run clip K`: K steps with global clipping off / at max norm 1.0
//!   (`set_max_grad_norm(Some(1.0))`), each timed alone; prints `RESULT {"times_ns": [...]}`.
//! - `quit` (or end of input): exits.
//!
//! The configuration is `LambConfig::paper()` (lr 1e-3, weight decay 0.01), as the peers use
//! their defaults at lr 1e-3: the step size is a runtime value, so the work per step does not
//! depend on it. Every step must be applied; a skipped or failed step prints `ERROR ...` and
//! exits with status 1, so a driver never averages a refused step.

use std::io::{BufRead, Write};
use std::time::Instant;

use lamb_benches::{model_tensors, model_workloads};
use lamb_core::LambConfig;
use lamb_std::Lamb;

fn main() {
    if let Err(e) = run() {
        println!("ERROR {e}");
        std::process::exit(1);
    }
}

fn arg(args: &[String], name: &str) -> Result<String, String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .ok_or_else(|| format!("missing {name} VALUE"))
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let workload = arg(&args, "--workload")?;
    let threads: usize = arg(&args, "--threads")?
        .parse()
        .map_err(|e| format!("--threads: {e}"))?;
    let shapes = model_workloads()
        .into_iter()
        .find(|(label, _)| *label == workload)
        .map(|(_, s)| s)
        .ok_or_else(|| format!("unknown workload {workload}"))?;

    let mut opt = Lamb::new(LambConfig::paper()).map_err(|e| e.to_string())?;
    opt.set_threads(threads).map_err(|e| e.to_string())?;
    let (mut params, grads) = model_tensors(&mut opt, &shapes).map_err(|e| e.to_string())?;
    let total: usize = shapes.iter().map(|(_, n)| n).sum();
    let backend = opt.backend().map_err(|e| e.to_string())?;
    println!(
        "READY {{\"impl\": \"lamb-std\", \"workload\": \"{workload}\", \"threads\": {threads}, \
         \"params\": {total}, \"tensors\": {}, \"backend\": \"{backend}\"}}",
        shapes.len()
    );
    std::io::stdout().flush().map_err(|e| e.to_string())?;

    let mut p: Vec<&mut [f32]> = params.iter_mut().map(|b| &mut b[..]).collect();
    let g: Vec<&[f32]> = grads.iter().map(|b| &b[..]).collect();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["run", setting, k] => {
                let clip = match *setting {
                    "none" => None,
                    "clip" => Some(1.0),
                    other => return Err(format!("unknown setting {other}")),
                };
                let k: usize = k.parse().map_err(|e| format!("step count: {e}"))?;
                opt.set_max_grad_norm(clip).map_err(|e| e.to_string())?;
                let mut times = Vec::with_capacity(k);
                for _ in 0..k {
                    let t0 = Instant::now();
                    let report = opt.step(&mut p, &g).map_err(|e| e.to_string())?;
                    times.push(t0.elapsed().as_nanos());
                    if !report.applied {
                        return Err(format!("step skipped: {:?}", report.skipped));
                    }
                }
                let list: Vec<String> = times.iter().map(u128::to_string).collect();
                println!("RESULT {{\"times_ns\": [{}]}}", list.join(", "));
                std::io::stdout().flush().map_err(|e| e.to_string())?;
            }
            ["quit"] => break,
            [] => {}
            _ => return Err(format!("unknown command {line:?}")),
        }
    }
    Ok(())
}
