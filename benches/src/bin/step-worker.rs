//! lamb-std's side of the interleaved comparison (`benches/peers/interleaved.py`): one
//! workload at one thread count, stepped on request, so that a driver can alternate lamb-std
//! with other optimizers round by round in the same minutes of the same machine. It also
//! serves the run's two roofline models (`lamb_benches::roof_model`), whose ratio is the
//! same-run floor of lamb-std ÷ torch.
//!
//! ```text
//! step-worker [--impl lamb|roof44|roof28] --workload bert_base|uniform_1000x1024|single_16M --threads N
//! ```
//!
//! `lamb` (the default) registers the workload's tensors (params and grads in `AlignedBuf`s,
//! as in `benches/model.rs`); `roof44` / `roof28` allocate the same params and grads plus m
//! and v, stepped by the roofline loops. Then it prints `READY {json}` (with `"impl"`) and
//! answers lines on stdin:
//!
//! - `run none K` / `run clip K`: K steps with global clipping off / at max norm 1.0
//!   (`set_max_grad_norm(Some(1.0))`; the roofline models add their clipping passes), each
//!   timed alone; prints `RESULT {"times_ns": [...]}`.
//! - `quit` (or end of input): exits.
//!
//! The configuration is `LambConfig::paper()` (lr 1e-3, weight decay 0.01), as the peers use
//! their defaults at lr 1e-3: the step size is a runtime value, so the work per step does not
//! depend on it. Every step must be applied; a skipped or failed step, like a bad argument,
//! prints `ERROR ...` and exits with status 1, so a driver never averages a refused step.

use std::hint::black_box;
use std::io::{BufRead, Write};
use std::time::Instant;

use lamb_benches::roof_model::{RoofKind, RoofModel};
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

/// What the command loop steps: the setting is chosen before a run, outside its timing.
trait Stepper {
    fn set_clip(&mut self, clip: bool) -> Result<(), String>;
    fn step(&mut self) -> Result<(), String>;
}

struct LambStepper<'a> {
    opt: Lamb,
    p: Vec<&'a mut [f32]>,
    g: Vec<&'a [f32]>,
}

impl Stepper for LambStepper<'_> {
    fn set_clip(&mut self, clip: bool) -> Result<(), String> {
        let norm = clip.then_some(1.0);
        self.opt.set_max_grad_norm(norm).map_err(|e| e.to_string())
    }
    fn step(&mut self) -> Result<(), String> {
        let report = self
            .opt
            .step(&mut self.p, &self.g)
            .map_err(|e| e.to_string())?;
        match report.applied {
            true => Ok(()),
            false => Err(format!("step skipped: {:?}", report.skipped)),
        }
    }
}

struct RoofStepper(RoofModel, bool);

impl Stepper for RoofStepper {
    fn set_clip(&mut self, clip: bool) -> Result<(), String> {
        self.1 = clip;
        Ok(())
    }
    fn step(&mut self) -> Result<(), String> {
        black_box(self.0.step(self.1));
        Ok(())
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let imp = arg(&args, "--impl").unwrap_or_else(|_| "lamb".into());
    let roof = match imp.as_str() {
        "lamb" => None,
        other => Some(RoofKind::parse(other).ok_or_else(|| {
            format!("unknown --impl {other:?} (expected lamb, roof44 or roof28)")
        })?),
    };
    let workload = arg(&args, "--workload")?;
    let threads: usize = arg(&args, "--threads")?
        .parse()
        .map_err(|e| format!("--threads: {e}"))?;
    let shapes = model_workloads()
        .into_iter()
        .find(|(label, _)| *label == workload)
        .map(|(_, s)| s)
        .ok_or_else(|| format!("unknown workload {workload}"))?;
    let ready = |name: &str, backend: &str| {
        let total: usize = shapes.iter().map(|(_, n)| n).sum();
        println!(
            "READY {{\"impl\": \"{name}\", \"workload\": \"{workload}\", \"threads\": {threads}, \
             \"params\": {total}, \"tensors\": {}, \"backend\": \"{backend}\"}}",
            shapes.len()
        );
    };

    if let Some(kind) = roof {
        let lens: Vec<usize> = shapes.iter().map(|(_, n)| *n).collect();
        let model = RoofModel::new(kind, &lens, threads)?;
        ready(kind.name(), model.isa());
        return serve(&mut RoofStepper(model, false));
    }
    let mut opt = Lamb::new(LambConfig::paper()).map_err(|e| e.to_string())?;
    opt.set_threads(threads).map_err(|e| e.to_string())?;
    let (mut params, grads) = model_tensors(&mut opt, &shapes).map_err(|e| e.to_string())?;
    ready(
        "lamb-std",
        &opt.backend().map_err(|e| e.to_string())?.to_string(),
    );
    let p = params.iter_mut().map(|b| &mut b[..]).collect();
    let g = grads.iter().map(|b| &b[..]).collect();
    serve(&mut LambStepper { opt, p, g })
}

/// Answers `run none|clip K` and `quit` on stdin until `quit` or end of input.
fn serve(stepper: &mut dyn Stepper) -> Result<(), String> {
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["run", setting, k] => {
                let clip = match *setting {
                    "none" => false,
                    "clip" => true,
                    other => return Err(format!("unknown setting {other}")),
                };
                let k: usize = k.parse().map_err(|e| format!("step count: {e}"))?;
                stepper.set_clip(clip)?;
                let mut times = Vec::with_capacity(k);
                for _ in 0..k {
                    let t0 = Instant::now();
                    stepper.step()?;
                    times.push(t0.elapsed().as_nanos());
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
