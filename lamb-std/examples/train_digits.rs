//! LAMB against AdamW from small to full batch, on real data, in well under two minutes on
//! two cores.
//!
//! ```text
//! cargo run --release --example train_digits
//! ```
//!
//! Trains a small MLP (64 → 128 → 128 → 10, ReLU, softmax cross-entropy; forward and
//! backward written out in `common/mod.rs`, no ML framework) on the UCI handwritten digits
//! (1797 8×8 images, shipped in `examples/data`, split 75/25 with a fixed seed) with
//! LAMB (`LambConfig::paper()`, `Lamb::with_decay_split`) and with AdamW (the same
//! configuration and kernels with the trust ratio off, `.adamw()`), at batch sizes from 16 to
//! the whole training set.
//!
//! The protocol, the same for both optimizers:
//! - a fixed budget of epochs (so every run sees the same samples the same number of times:
//!   a large batch gets proportionally fewer steps, which is the point of large-batch
//!   training and what the LAMB paper measures);
//! - the learning rate scaled by the square-root rule, `lr = base_lr · √(batch / 16)`;
//! - linear warmup over the first 10% of the steps, then linear decay to 0
//!   (`Schedule::WarmupPoly`, as in the LAMB paper);
//! - `base_lr` chosen for each optimizer from the same grid, as the one with the lowest final
//!   training loss at batch 16 (the test set plays no part in it). Every base lr of the grid
//!   runs at every batch size (60 runs), so the output also shows what every other choice
//!   would have given; nothing is tuned by hand.
//!
//! Prints the grid and a table (final training loss, test accuracy, wall time), and writes the
//! loss curves to `train_digits.png` and the tables to `train_digits.md` in
//! `target/train_digits/`. The runs are independent and single-threaded; as many run at once
//! as there are cores.
//!
//! Options: `--epochs N` (default 30); `--out DIR` to write elsewhere; `--write-docs` to
//! regenerate the committed `docs/train_digits.{md,png}` (only with the default epochs:
//! the docs describe that run).

mod common;
#[path = "train_digits/plot.rs"]
mod plot;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Dataset, RunResult};
use indicatif::{ProgressBar, ProgressStyle};
use lamb_std::Lamb;
use lamb_std::lamb_core::{LambConfig, Schedule};

/// The smallest batch: the sweep runs there and the √ rule is relative to it.
const BASE_BATCH: usize = 16;
/// Batch sizes (0 stands for the whole training set).
const BATCHES: [usize; 5] = [16, 64, 256, 1024, 0];
/// The base learning rates the sweep tries, for both optimizers.
const SWEEP: [f64; 6] = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1];
/// Warmup share of the steps.
const WARMUP: f64 = 0.1;
const DEFAULT_EPOCHS: usize = 30;
const OPTS: [Opt; 2] = [Opt::Lamb, Opt::AdamW];
/// A run "trains" if its final training loss is below this (about 97% training accuracy).
const TRAINED: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opt {
    Lamb,
    AdamW,
}

impl Opt {
    fn name(self) -> &'static str {
        match self {
            Opt::Lamb => "LAMB",
            Opt::AdamW => "AdamW",
        }
    }

    fn config(self, lr: f64) -> LambConfig {
        let lamb = LambConfig {
            lr,
            ..LambConfig::paper()
        };
        match self {
            Opt::Lamb => lamb,
            Opt::AdamW => lamb.adamw(),
        }
    }
}

struct Job {
    opt: Opt,
    base_lr: f64,
    batch: usize,
}

impl Job {
    fn lr(&self) -> f64 {
        self.base_lr * (self.batch as f64 / BASE_BATCH as f64).sqrt()
    }
}

struct Args {
    epochs: usize,
    out: PathBuf,
    /// How this run was started, for the document it writes.
    command: String,
}

fn parse_args() -> Args {
    let usage = || -> ! {
        eprintln!("usage: train_digits [--epochs N] [--out DIR | --write-docs]");
        std::process::exit(2)
    };
    let (mut epochs, mut out, mut write_docs) = (DEFAULT_EPOCHS, None, false);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--epochs" => {
                epochs = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--out" => out = Some(it.next().unwrap_or_else(|| usage()).into()),
            "--write-docs" => write_docs = true,
            _ => usage(),
        }
    }
    if write_docs && (out.is_some() || epochs != DEFAULT_EPOCHS) {
        eprintln!("--write-docs regenerates the docs from the default run: no --out or --epochs");
        usage();
    }
    Args {
        epochs,
        out: common::out_dir("train_digits", out, write_docs),
        command: common::command_line("train_digits"),
    }
}

fn run_job(
    job: &Job,
    train: &Dataset,
    test: &Dataset,
    epochs: usize,
    bar: &ProgressBar,
) -> RunResult {
    let mut opt = Lamb::with_decay_split(job.opt.config(job.lr())).unwrap();
    common::register(&mut opt);
    let total = common::total_steps(train.len(), job.batch, epochs);
    let warmup = (total as f64 * WARMUP).ceil() as u64;
    opt.set_schedule(Schedule::WarmupPoly {
        warmup,
        total,
        power: 1.0,
        end: 0.0,
    })
    .expect("a valid schedule");
    common::train(
        opt,
        common::Mlp::new(common::SEED),
        train,
        test,
        common::TrainSettings {
            batch: job.batch,
            epochs,
            seed: common::SEED,
        },
        &|| bar.inc(1),
    )
}

/// Every (batch, optimizer, base lr), `threads` runs at a time, with a progress bar.
fn run_grid(
    batches: &[usize],
    train: &Dataset,
    test: &Dataset,
    epochs: usize,
    threads: usize,
) -> (Vec<Job>, Vec<RunResult>) {
    // Every (batch, optimizer, base lr): the batch-16 column is the sweep that picks each
    // optimizer's base lr; the rest shows what the other choices would have given.
    // Smallest batches (the longest runs) first, for an even load on the workers.
    let jobs: Vec<Job> = batches
        .iter()
        .flat_map(|&batch| {
            OPTS.iter().flat_map(move |&opt| {
                SWEEP.iter().map(move |&base_lr| Job {
                    opt,
                    base_lr,
                    batch,
                })
            })
        })
        .collect();
    let bar = ProgressBar::new((jobs.len() * epochs) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} epochs (eta {eta})",
        )
        .unwrap(),
    );
    bar.set_message(format!(
        "{} runs: LAMB and AdamW x {} base lrs x {} batch sizes",
        jobs.len(),
        SWEEP.len(),
        batches.len()
    ));
    let results = common::run_parallel(&jobs, threads, |j| run_job(j, train, test, epochs, &bar));
    bar.finish_and_clear();
    (jobs, results)
}

fn main() {
    let args = parse_args();
    let started = Instant::now();
    let all = common::load_digits();
    let (train, test) = common::split(&all);
    let full = train.len();
    let batches: Vec<usize> = BATCHES
        .iter()
        .map(|&b| if b == 0 { full } else { b.min(full) })
        .collect();
    let threads = common::cores();
    println!(
        "UCI digits: {} training / {} test images; MLP 64-128-128-10 ({} parameters); \
         {} epochs per run; {} runs at a time",
        train.len(),
        test.len(),
        common::Mlp::new(common::SEED).param_count(),
        args.epochs,
        threads
    );

    let (jobs, results) = run_grid(&batches, &train, &test, args.epochs, threads);
    let elapsed = started.elapsed();
    let time = common::time_summary(elapsed);
    let grid = Grid {
        jobs,
        results,
        batches,
        full,
    };

    let chosen = OPTS.map(|opt| grid.tuned_lr(opt));
    let sweep_table = grid.sweep_table(chosen);
    let table = grid.results_table(chosen);
    let claim = grid.claim(chosen);
    println!(
        "\nFinal training loss for every base lr and batch size (bold: the base lr with the lowest \
         loss at batch {BASE_BATCH}, used below):\n\n{sweep_table}\n{table}\n{claim}\n"
    );

    std::fs::create_dir_all(&args.out).expect("the output directory");
    let png = args.out.join("train_digits.png");
    grid.plot(&png, chosen, args.epochs).expect("the plot");
    let md = args.out.join("train_digits.md");
    let found = Findings {
        sweep_table,
        table,
        claim,
        time,
        threads,
    };
    let doc = markdown(&args, &train, &test, &found);
    std::fs::write(&md, doc).expect("the markdown file");
    println!(
        "wrote {} and {}; {}",
        png.display(),
        md.display(),
        found.time
    );
}

/// NaN (a diverged run) sorts last.
fn nan_last(x: f64) -> f64 {
    if x.is_nan() { f64::INFINITY } else { x }
}

/// The highest training loss after the start, or the initial loss if it never rose above
/// it: above the initial loss means the run blew up (whether it recovered or not).
fn peak(r: &RunResult) -> f64 {
    r.curve[1..]
        .iter()
        .fold(r.curve[0], |a, &b| if b.is_nan() { b } else { a.max(b) })
}

fn blew_up(r: &RunResult) -> bool {
    let p = peak(r);
    p.is_nan() || p > r.curve[0]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Every run of the grid.
struct Grid {
    jobs: Vec<Job>,
    results: Vec<RunResult>,
    batches: Vec<usize>,
    full: usize,
}

impl Grid {
    fn get(&self, opt: Opt, base_lr: f64, batch: usize) -> (&Job, &RunResult) {
        self.jobs
            .iter()
            .zip(&self.results)
            .find(|(j, _)| j.opt == opt && j.base_lr == base_lr && j.batch == batch)
            .expect("every combination ran")
    }

    fn runs(&self, opt: Opt, batch: usize) -> impl Iterator<Item = &RunResult> {
        SWEEP.iter().map(move |&lr| self.get(opt, lr, batch).1)
    }

    /// The base lr with the lowest final training loss at the smallest batch.
    fn tuned_lr(&self, opt: Opt) -> f64 {
        SWEEP
            .into_iter()
            .min_by(|&a, &b| {
                let loss = |lr| nan_last(self.get(opt, lr, BASE_BATCH).1.train_loss);
                loss(a).total_cmp(&loss(b))
            })
            .unwrap()
    }

    fn batch_label(&self, batch: usize) -> String {
        if batch == self.full {
            format!("{batch} (full)")
        } else {
            batch.to_string()
        }
    }

    /// Final training loss for every base lr (rows) and batch (columns), and how many base
    /// lrs train / blow up at each batch size.
    fn sweep_table(&self, chosen: [f64; 2]) -> String {
        let mut t = String::from("| optimizer | base lr |");
        for &b in &self.batches {
            write!(t, " batch {} |", self.batch_label(b)).unwrap();
        }
        write!(t, "\n|---|---:|{}", "---:|".repeat(self.batches.len())).unwrap();
        for (k, opt) in OPTS.into_iter().enumerate() {
            for lr in SWEEP {
                let mark = if lr == chosen[k] { "**" } else { "" };
                write!(t, "\n| {} | {mark}{lr:e}{mark} |", opt.name()).unwrap();
                for &b in &self.batches {
                    let r = self.get(opt, lr, b).1;
                    let flag = if blew_up(r) { " ^" } else { "" };
                    write!(t, " {mark}{:.2e}{mark}{flag} |", r.train_loss).unwrap();
                }
            }
            write!(t, "\n| {} | loss < {TRAINED} |", opt.name()).unwrap();
            for &b in &self.batches {
                let n = self.runs(opt, b).filter(|r| r.train_loss < TRAINED).count();
                write!(t, " {n} of {} |", SWEEP.len()).unwrap();
            }
        }
        t.push_str(
            "\n\n^: the training loss rose above its initial value at some epoch (a blow-up), \
             whether or not the run recovered.\n",
        );
        t
    }

    /// Each optimizer at its tuned base lr, √-scaled, at every batch size.
    fn results_table(&self, chosen: [f64; 2]) -> String {
        let mut t = String::from(
            "| batch | optimizer | lr | steps | peak train loss | final train loss | test loss | test accuracy | wall time | in `Lamb::step` |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for &batch in &self.batches {
            for (k, opt) in OPTS.into_iter().enumerate() {
                let (j, r) = self.get(opt, chosen[k], batch);
                writeln!(
                    t,
                    "| {} | {} | {:.2e} | {} | {:.3} | {:.2e} | {:.4} | {:.2}% | {} | {} |",
                    self.batch_label(batch),
                    opt.name(),
                    j.lr(),
                    r.steps,
                    peak(r),
                    r.train_loss,
                    r.test_loss,
                    100.0 * r.test_acc,
                    secs(r.wall),
                    secs(r.opt_time),
                )
                .unwrap();
            }
        }
        t
    }

    /// What the numbers say, computed from them (so it stays true when the code changes).
    fn claim(&self, chosen: [f64; 2]) -> String {
        let mut s = String::new();
        self.claim_tuned(chosen, &mut s);
        self.claim_retuned(&mut s);
        self.claim_robustness(&mut s);
        self.claim_costs(&mut s);
        s
    }

    /// The runs at the base lr tuned at the smallest batch: blow-ups, losses, accuracies.
    fn claim_tuned(&self, chosen: [f64; 2], s: &mut String) {
        let at = |k: usize, batch| self.get(OPTS[k], chosen[k], batch).1;
        let lamb_lower = self
            .batches
            .iter()
            .filter(|&&b| at(0, b).train_loss < at(1, b).train_loss)
            .count();
        let lamb_acc = self
            .batches
            .iter()
            .filter(|&&b| at(0, b).test_acc > at(1, b).test_acc)
            .count();
        let blown = |k: usize| -> String {
            let b: Vec<String> = self
                .batches
                .iter()
                .filter(|&&b| blew_up(at(k, b)))
                .map(|&b| self.batch_label(b))
                .collect();
            if b.is_empty() {
                "at no batch size".into()
            } else {
                format!("at batch {}", b.join(", "))
            }
        };
        writeln!(
            s,
            "At the base lr tuned at batch {BASE_BATCH} and square-root scaled, LAMB's training \
             loss rose above its starting value (blew up) {}, AdamW's {}.",
            blown(0),
            blown(1)
        )
        .unwrap();
        let (l, a) = (at(0, self.full), at(1, self.full));
        writeln!(
            s,
            "Tuned at batch {BASE_BATCH} (base lr: LAMB {:e}, AdamW {:e}) and scaled by the \
             square-root rule: LAMB ends with the lower training loss at {lamb_lower} of {} batch \
             sizes and the higher test accuracy at {lamb_acc}. At the full batch ({} steps): \
             training loss LAMB {:.2e} vs AdamW {:.2e}, test accuracy LAMB {:.2}% vs AdamW {:.2}%.",
            chosen[0],
            chosen[1],
            self.batches.len(),
            l.steps,
            l.train_loss,
            a.train_loss,
            100.0 * l.test_acc,
            100.0 * a.test_acc,
        )
        .unwrap();
    }

    /// Each optimizer at its best base lr of the grid at every batch size.
    fn claim_retuned(&self, s: &mut String) {
        // Retuned at every batch size: each optimizer's best base lr there.
        let best = |opt, batch| -> (f64, &RunResult) {
            SWEEP
                .iter()
                .map(|&lr| (lr, self.get(opt, lr, batch).1))
                .min_by(|a, b| nan_last(a.1.train_loss).total_cmp(&nan_last(b.1.train_loss)))
                .unwrap()
        };
        let lamb_best = self
            .batches
            .iter()
            .filter(|&&b| best(Opt::Lamb, b).1.train_loss < best(Opt::AdamW, b).1.train_loss)
            .count();
        let ((bl_lr, bl), (ba_lr, ba)) = (best(Opt::Lamb, self.full), best(Opt::AdamW, self.full));
        writeln!(
            s,
            "Retuned at every batch size instead (each optimizer's best base lr of the grid at \
             that batch): LAMB ends lower at {lamb_best} of {}. At the full batch: LAMB {:.2e} \
             (base lr {bl_lr:e}, test accuracy {:.2}%) vs AdamW {:.2e} (base lr {ba_lr:e}, test \
             accuracy {:.2}%).",
            self.batches.len(),
            bl.train_loss,
            100.0 * bl.test_acc,
            ba.train_loss,
            100.0 * ba.test_acc,
        )
        .unwrap();
    }

    /// How many base lrs train, at the smallest and the full batch.
    fn claim_robustness(&self, s: &mut String) {
        let count = |opt, batch, f: &dyn Fn(&RunResult) -> bool| {
            self.runs(opt, batch).filter(|r| f(r)).count()
        };
        let trained = |r: &RunResult| r.train_loss < TRAINED;
        writeln!(
            s,
            "Over all {} base lrs (robustness to the one hyperparameter tuned): at the full batch \
             {} train below {TRAINED} with LAMB and {} with AdamW; at batch {BASE_BATCH}, {} and {}.",
            SWEEP.len(),
            count(Opt::Lamb, self.full, &trained),
            count(Opt::AdamW, self.full, &trained),
            count(Opt::Lamb, BASE_BATCH, &trained),
            count(Opt::AdamW, BASE_BATCH, &trained),
        )
        .unwrap();
    }

    /// Time in the optimizer, blow-ups and skipped steps over the whole grid.
    fn claim_costs(&self, s: &mut String) {
        let count = |opt, batch, f: &dyn Fn(&RunResult) -> bool| {
            self.runs(opt, batch).filter(|r| f(r)).count()
        };
        let blowups =
            |opt| -> usize { self.batches.iter().map(|&b| count(opt, b, &blew_up)).sum() };
        let per_opt = SWEEP.len() * self.batches.len();
        let steps: u64 = self.results.iter().map(|r| r.steps).sum();
        let opt_time: f64 = self.results.iter().map(|r| r.opt_time.as_secs_f64()).sum();
        let params = common::Mlp::new(common::SEED).param_count();
        writeln!(
            s,
            "`Lamb::step` took {:.0} us of wall time per step on average over all {steps} \
             steps of the grid ({params} parameters, one thread: {:.1} ns per parameter).",
            1e6 * opt_time / steps as f64,
            1e9 * opt_time / (steps as f64 * params as f64),
        )
        .unwrap();
        write!(
            s,
            "Runs whose training loss rose above its starting value at some epoch: LAMB {} of \
             {per_opt}, AdamW {} of {per_opt}. Steps skipped for non-finite values: {}.",
            blowups(Opt::Lamb),
            blowups(Opt::AdamW),
            self.results.iter().map(|r| r.skipped).sum::<u64>(),
        )
        .unwrap();
    }
}

/// What the document reports beyond the arguments and the data: the tables, the claim, the
/// run's time and how many runs ran at once.
struct Findings {
    sweep_table: String,
    table: String,
    claim: String,
    time: String,
    threads: usize,
}

fn markdown(args: &Args, train: &Dataset, test: &Dataset, found: &Findings) -> String {
    let Findings {
        sweep_table,
        table,
        claim,
        time,
        threads,
    } = found;
    let mut d = String::new();
    writeln!(
        d,
        "# LAMB vs AdamW from small to full batch: UCI handwritten digits\n\n\
         Written by `{}` (`lamb-std/examples/train_digits.rs`); every number below comes \
         from that run ({time}; {threads} runs at a time).\n\n\
         ![loss curves](train_digits.png)\n\n\
         ## Setup\n\n\
         - Data: the UCI optical handwritten digits as scikit-learn ships them (1797 8x8 images, \
         10 classes; `lamb-std/examples/data/`), pixels scaled to [0, 1], one fixed seeded split: \
         {} training / {} test images.\n\
         - Model: MLP 64-128-128-10, ReLU, softmax cross-entropy, f32; forward and backward \
         written as plain loops (`lamb-std/examples/common/mod.rs`); He-uniform init. Every run \
         starts from the same weights and sees the same sequence of shuffles.\n\
         - LAMB: `Lamb::with_decay_split(LambConfig::paper())` (beta = 0.9, 0.999, eps = 1e-6, \
         decoupled weight decay 0.01 and the trust ratio on the weight matrices; biases get \
         neither). AdamW: the same with `LambConfig::paper().adamw()`, i.e. the same kernels \
         with the trust ratio off. No gradient clipping.\n\
         - Budget: {} epochs for every run, so every run sees every sample equally often and a \
         batch-B run takes B times fewer steps: the large-batch question is whether the same data \
         in fewer, larger steps trains as well. (The last batch of an epoch may be smaller.)\n\
         - Learning rate: `lr = base_lr * sqrt(batch / {BASE_BATCH})`, linear warmup over the \
         first {:.0}% of the steps, then linear decay to 0 (`Schedule::WarmupPoly`, as in the LAMB \
         paper).\n\
         - `base_lr`: every base lr of the grid is run at every batch size. The one used for an \
         optimizer in the results table is the one with the lowest final training loss at batch \
         {BASE_BATCH} (bold), chosen by the program, once per optimizer; the test set plays no \
         part in it.\n\n\
         ## Final training loss, every base lr and batch size\n\n{sweep_table}\n\
         ## Results at the tuned base lr\n\n\
         Peak / final train loss: cross-entropy over the whole training set (no weight-decay \
         term), the highest after the start / after the last epoch. Wall time: the whole run, \
         {threads} runs sharing {threads} cores; `Lamb::step`: the part of it spent in the \
         optimizer.\n\n{table}\n\
         ## What this run shows\n\n{}\n\n\
         ## How far it goes\n\n\
         - One seed, one split, a 26k-parameter model and 1347 training images: the test set \
         has {} images, so one image is {:.2} points of test accuracy, and small differences \
         in either column are noise. Training is chaotic (see `docs/compact_state.md`: \
         flipping the last bit of every initial weight moves the final loss of a minibatch run \
         by far more than 2%), so the small-batch final losses, all close to zero, differ by \
         chance more than by optimizer.\n\
         - The conclusion hangs on one tuned number per optimizer: the grid above shows what \
         every other base lr would have given. Retuning AdamW at each batch size is the fair \
         comparison for \"can AdamW do it at all\"; tuning once and scaling is the comparison \
         for \"does the recipe transfer\", which is what LAMB claims to make easier. Studies at \
         scale (Nado et al. 2021, \"A Large Batch Optimizer Reality Check\") found that a \
         carefully retuned Adam matches LAMB at large batch; this small run cannot settle that \
         either way.\n\
         - The budget matters as much as the batch: `docs/compact_state.md` runs the same LAMB \
         configuration at the full batch for 100 epochs instead of 30, i.e. 70 more steps near \
         the peak lr; look there before reading \"stable at large batch\" into this table.\n\
         - Wall times are for {threads} runs at once on {threads} cores and include evaluating \
         the whole training set after every epoch.\n",
        args.command,
        train.len(),
        test.len(),
        args.epochs,
        WARMUP * 100.0,
        claim.replace('\n', "\n\n"),
        test.len(),
        100.0 / test.len() as f64,
    )
    .unwrap();
    d
}
