//! Does LAMB still converge with its moments stored in bf16 or 8 bits?
//!
//! ```text
//! cargo run --release --example compact_state
//! ```
//!
//! Trains the model of `train_digits` (MLP 64 → 128 → 128 → 10 on the UCI digits) with LAMB
//! for the same steps and the same data order with each state format of
//! [`lamb_std::Precision`]: f32 moments (8 bytes per parameter), bf16 moments (4) and 8-bit
//! blockwise moments (2 + the absmax scales). Every tensor is stored compactly
//! (`compact_min_len = 0`, biases included: stricter than the default, which keeps tensors
//! under 4096 elements in f32). Parameters and gradients stay f32, so the state format is the
//! only difference.
//!
//! Four settings, three seeds each (initial weights and data order): batch 256 for 30
//! epochs (minibatches, 180 steps), the full batch for 30 epochs (deterministic gradients,
//! 30 steps), the full batch for 100 epochs (longer at its peak lr of 9.2e-2, which is
//! near the edge of stability: a stress test), and the full batch for 200 epochs at a tenth
//! of that lr (long and stable, down to a training loss near 2e-4).
//! Training a network is chaotic: the smallest change grows over the steps. So next to f32,
//! bf16 and 8-bit there is a fourth run per seed, f32 state from initial weights changed in
//! their last bit: how far that run ends from the f32 one is what any perturbation costs, the
//! floor under which a precision effect cannot be seen.
//!
//! The check: the mean final training loss with bf16 and with 8-bit state is
//! within 2% of the f32-state one. Prints the tables and writes `compact_state.png` and
//! `compact_state.md` in `target/compact_state/`.
//!
//! Options: `--batch B` (a number or `full`), `--epochs N` and `--lr-scale X` run that one
//! setting instead; `--out DIR` writes elsewhere; `--write-docs` regenerates the committed
//! `docs/compact_state.{md,png}` (only from the four default settings: the docs describe
//! them).

mod common;
#[path = "compact_state/plot.rs"]
mod plot;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::RunResult;
use indicatif::{ProgressBar, ProgressStyle};
use lamb_std::lamb_core::{LambConfig, Schedule};
use lamb_std::{GroupId, Lamb, Precision, StateFormat};
use plot::plot;

/// LAMB's base lr as `train_digits` tunes it (its sweep at batch 16), √-scaled from batch 16.
const BASE_LR: f64 = 1e-2;
const BASE_BATCH: usize = 16;
const WARMUP: f64 = 0.1;
const SEEDS: [u64; 3] = [common::SEED, common::SEED + 1, common::SEED + 2];
/// The acceptance: |mean final loss / f32's − 1|.
const TOLERANCE: f64 = 0.02;
/// Default settings: (batch, 0 = the whole training set; epochs; multiplier of the lr).
const SETTINGS: [(usize, usize, f64); 4] =
    [(256, 30, 1.0), (0, 30, 1.0), (0, 100, 1.0), (0, 200, 0.1)];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    F32,
    /// f32 state, initial weights changed in their last bit: the noise floor.
    F32Ulp,
    Bf16,
    Q8,
}

const VARIANTS: [Variant; 4] = [Variant::F32, Variant::F32Ulp, Variant::Bf16, Variant::Q8];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::F32 => "f32",
            Variant::F32Ulp => "f32, init +-1 ulp",
            Variant::Bf16 => "bf16",
            Variant::Q8 => "8-bit",
        }
    }

    fn format(self) -> StateFormat {
        match self {
            Variant::F32 | Variant::F32Ulp => StateFormat::F32,
            Variant::Bf16 => StateFormat::Bf16,
            Variant::Q8 => StateFormat::Q8,
        }
    }

    fn color(self) -> plotters::style::RGBColor {
        use plotters::style::RGBColor;
        match self {
            Variant::F32 => RGBColor(30, 30, 30),
            Variant::F32Ulp => RGBColor(150, 150, 150),
            Variant::Bf16 => RGBColor(30, 90, 200),
            Variant::Q8 => RGBColor(200, 30, 30),
        }
    }
}

struct Args {
    settings: Vec<(usize, usize, f64)>,
    out: PathBuf,
    /// How this run was started, for the document it writes.
    command: String,
}

fn parse_args() -> Args {
    let usage = || -> ! {
        eprintln!(
            "usage: compact_state [--batch B|full] [--epochs N] [--lr-scale X] \
             [--out DIR | --write-docs]"
        );
        std::process::exit(2)
    };
    let (mut out, mut write_docs) = (None, false);
    let (mut batch, mut epochs, mut lr_scale) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--batch" => match value() {
                b if b == "full" => batch = Some(0),
                b => batch = Some(b.parse().unwrap_or_else(|_| usage())),
            },
            "--epochs" => epochs = Some(value().parse().unwrap_or_else(|_| usage())),
            "--lr-scale" => lr_scale = Some(value().parse().unwrap_or_else(|_| usage())),
            "--out" => out = Some(value().into()),
            "--write-docs" => write_docs = true,
            _ => usage(),
        }
    }
    let default_settings = batch.is_none() && epochs.is_none() && lr_scale.is_none();
    if write_docs && (out.is_some() || !default_settings) {
        eprintln!(
            "--write-docs regenerates the docs from the default settings: no --out, --batch, \
             --epochs or --lr-scale"
        );
        usage();
    }
    let settings = if default_settings {
        SETTINGS.to_vec()
    } else {
        vec![(
            batch.unwrap_or(SETTINGS[0].0),
            epochs.unwrap_or(SETTINGS[0].1),
            lr_scale.unwrap_or(1.0),
        )]
    };
    Args {
        settings,
        out: common::out_dir("compact_state", out, write_docs),
        command: common::command_line("compact_state"),
    }
}

#[derive(Clone, Copy)]
struct Setting {
    batch: usize,
    epochs: usize,
    lr: f64,
    steps: u64,
}

struct Job {
    setting: usize,
    variant: Variant,
    seed: u64,
}

struct Run {
    result: RunResult,
    bytes_per_param: f64,
}

/// The model of `seed`, or (for the noise floor) the same with every weight's last bit
/// flipped.
fn initial_model(seed: u64, variant: Variant) -> common::Mlp {
    let mut model = common::Mlp::new(seed);
    if variant == Variant::F32Ulp {
        for p in model.params.iter_mut().step_by(2) {
            for w in p.iter_mut() {
                *w = f32::from_bits(w.to_bits() ^ 1);
            }
        }
    }
    model
}

fn run_job(
    job: &Job,
    s: Setting,
    train: &common::Dataset,
    test: &common::Dataset,
    bar: &ProgressBar,
) -> Run {
    let mut opt = Lamb::with_decay_split(LambConfig {
        lr: s.lr,
        ..LambConfig::paper()
    })
    .unwrap();
    let precision = Precision {
        moments: job.variant.format(),
        compact_min_len: 0,
        ..Precision::default()
    };
    for group in [GroupId(0), GroupId(1)] {
        opt.set_precision(group, precision)
            .expect("before the layers");
    }
    common::register(&mut opt);
    opt.set_schedule(Schedule::WarmupPoly {
        warmup: (s.steps as f64 * WARMUP).ceil() as u64,
        total: s.steps,
        power: 1.0,
        end: 0.0,
    })
    .expect("a valid schedule");
    let bytes_per_param = opt.bytes_per_param();
    let result = common::train(
        opt,
        initial_model(job.seed, job.variant),
        train,
        test,
        common::TrainSettings {
            batch: s.batch,
            epochs: s.epochs,
            seed: job.seed,
        },
        &|| bar.inc(1),
    );
    assert_eq!(result.steps, s.steps);
    Run {
        result,
        bytes_per_param,
    }
}

/// Every run, by setting, variant and seed.
struct Runs<'a> {
    jobs: &'a [Job],
    runs: &'a [Run],
}

impl Runs<'_> {
    fn get(&self, setting: usize, v: Variant, seed: u64) -> &Run {
        self.jobs
            .iter()
            .zip(self.runs)
            .find(|(j, _)| j.setting == setting && j.variant == v && j.seed == seed)
            .map(|(_, r)| r)
            .unwrap()
    }
}

/// One setting's results.
struct Report {
    table: String,
    verdict: String,
    pass: bool,
    /// The noise floor (|dev| of the 1-ulp f32 run) is below the tolerance: the check can
    /// tell a 2% effect from chaos here.
    resolves: bool,
}

/// The settings' batch sizes (0: full batch), lrs and step counts.
fn make_settings(args: &Args, full: usize) -> Vec<Setting> {
    args.settings
        .iter()
        .map(|&(b, epochs, lr_scale)| {
            let batch = if b == 0 { full } else { b.clamp(1, full) };
            Setting {
                batch,
                epochs,
                lr: lr_scale * BASE_LR * (batch as f64 / BASE_BATCH as f64).sqrt(),
                steps: common::total_steps(full, batch, epochs),
            }
        })
        .collect()
}

/// Every (setting, seed, variant) run, on every core, with a progress bar over epochs.
fn run_all(
    settings: &[Setting],
    train: &common::Dataset,
    test: &common::Dataset,
) -> (Vec<Job>, Vec<Run>) {
    let jobs: Vec<Job> = (0..settings.len())
        .flat_map(|setting| {
            SEEDS.iter().flat_map(move |&seed| {
                VARIANTS.map(|variant| Job {
                    setting,
                    variant,
                    seed,
                })
            })
        })
        .collect();
    let epochs_total: usize = jobs.iter().map(|j| settings[j.setting].epochs).sum();
    let bar = ProgressBar::new(epochs_total as u64);
    bar.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} {pos}/{len} epochs").unwrap(),
    );
    let runs = common::run_parallel(&jobs, common::cores(), |job| {
        run_job(job, settings[job.setting], train, test, &bar)
    });
    bar.finish_and_clear();
    (jobs, runs)
}

/// The markdown document: setup, one section per setting, the summary.
fn document(
    args: &Args,
    (train, test): (&common::Dataset, &common::Dataset),
    settings: &[Setting],
    reports: &[Report],
    time: &str,
) -> String {
    let full = train.len();
    let mut doc = format!(
        "# LAMB with compact optimizer state: f32 vs bf16 vs 8-bit moments\n\n\
         Written by `{}` (`lamb-std/examples/compact_state.rs`; {time}); every number below \
         comes from that run.\n\n![loss curves](compact_state.png)\n\n\
         ## Setup\n\n\
         - The model, data and split of [train_digits](train_digits.md): MLP 64-128-128-10 on \
         the UCI digits, {} training / {} test images.\n\
         - LAMB (`Lamb::with_decay_split(LambConfig::paper())`), lr = {BASE_LR:e} * \
         sqrt(batch / {BASE_BATCH}) (train_digits' tuned base lr; the last setting a tenth \
         of it), warmup over the first {:.0}% of the steps, then linear decay to 0.\n\
         - The only difference between the formats: `Precision {{ moments, compact_min_len: 0, \
         .. }}` on both groups, so every tensor's m and v (biases too) are stored in that \
         format (bf16 m and v round stochastically, seeded by step and layer: with round to \
         nearest a bf16 v cannot decay). Parameters and gradients are f32; all arithmetic is \
         f32.\n\
         - Three seeds (initial weights and data order); within a seed every run sees the same \
         batches. The row \"f32, init +-1 ulp\" is f32 state from the same initial weights with \
         each weight's last bit flipped: the smallest possible perturbation, whose effect on \
         the final loss is the noise floor of this comparison (training is chaotic; two f32 runs \
         that differ in one bit per weight do not end at the same loss).\n\
         - Final loss: cross-entropy over the whole training set after the last step. \
         |dev|: the mean over seeds of |final loss / the same seed's f32 final loss - 1|. \
         Bytes / param: `Lamb::bytes_per_param()` (moments and 8-bit scales).\n\
         - The acceptance: the mean final loss of bf16 and of 8-bit state within \
         {:.0}% of f32's.\n",
        args.command,
        train.len(),
        test.len(),
        WARMUP * 100.0,
        100.0 * TOLERANCE,
    );
    for (s, r) in settings.iter().zip(reports) {
        write!(
            doc,
            "\n## {}\n\n{}\n{}\n",
            setting_title(s, full),
            r.table,
            r.verdict
        )
        .unwrap();
    }
    write!(doc, "\n## Summary\n\n{}\n", summary(reports)).unwrap();
    doc
}

fn main() {
    let args = parse_args();
    let started = Instant::now();
    let all = common::load_digits();
    let (train, test) = common::split(&all);
    let full = train.len();
    let settings = make_settings(&args, full);
    println!(
        "MLP 64-128-128-10 ({} parameters), LAMB, seeds {SEEDS:?}, moments in f32 / bf16 / 8-bit",
        common::Mlp::new(common::SEED).param_count(),
    );
    let (jobs, runs) = run_all(&settings, &train, &test);
    let time = common::time_summary(started.elapsed());

    let runs = Runs {
        jobs: &jobs,
        runs: &runs,
    };
    let mut reports = Vec::new();
    for (k, s) in settings.iter().enumerate() {
        let report = report(k, &runs);
        println!(
            "\n{}\n\n{}\n{}",
            setting_title(s, full),
            report.table,
            report.verdict
        );
        reports.push(report);
    }

    std::fs::create_dir_all(&args.out).expect("the output directory");
    let png = args.out.join("compact_state.png");
    plot(&png, &settings, full, &runs).expect("the plot");
    let md = args.out.join("compact_state.md");
    let doc = document(&args, (&train, &test), &settings, &reports, &time);
    std::fs::write(&md, doc).expect("the markdown file");
    println!(
        "\n{}\n\nWrote {} and {}; {time}",
        summary(&reports),
        png.display(),
        md.display(),
    );
}

fn summary(reports: &[Report]) -> String {
    let measurable: Vec<&Report> = reports.iter().filter(|r| r.resolves).collect();
    let passed = measurable.iter().filter(|r| r.pass).count();
    let mut s = format!(
        "In the settings where the comparison resolves {:.0}% (the 1-ulp noise floor below \
         it): {} of {}, the acceptance holds in {passed}.",
        100.0 * TOLERANCE,
        measurable.len(),
        reports.len(),
    );
    let rest = reports.len() - measurable.len();
    if rest > 0 {
        write!(
            s,
            " In the other {rest}, flipping one bit of every initial weight moves the final loss \
             by more than {:.0}%, so the acceptance cannot be judged there (it holds in {} of \
             them); see the per-seed deviations against that floor.",
            100.0 * TOLERANCE,
            reports.iter().filter(|r| !r.resolves && r.pass).count(),
        )
        .unwrap();
    }
    s
}

fn setting_title(s: &Setting, full: usize) -> String {
    let batch = if s.batch == full {
        format!("full batch ({full})")
    } else {
        format!("batch {}", s.batch)
    };
    format!(
        "{batch}, lr {:.2e}, {} epochs = {} steps",
        s.lr, s.epochs, s.steps
    )
}

/// One setting's runs, averaged over seeds.
struct SeedMeans<'a> {
    k: usize,
    runs: &'a Runs<'a>,
}

impl SeedMeans<'_> {
    fn mean(&self, v: Variant, x: &dyn Fn(&RunResult) -> f64) -> f64 {
        SEEDS
            .iter()
            .map(|&seed| x(&self.runs.get(self.k, v, seed).result))
            .sum::<f64>()
            / SEEDS.len() as f64
    }

    /// Mean over seeds of |loss / the same seed's f32 loss − 1|.
    fn dev(&self, v: Variant) -> f64 {
        SEEDS
            .iter()
            .map(|&seed| {
                (self.runs.get(self.k, v, seed).result.train_loss
                    / self.runs.get(self.k, Variant::F32, seed).result.train_loss
                    - 1.0)
                    .abs()
            })
            .sum::<f64>()
            / SEEDS.len() as f64
    }

    /// The mean final loss relative to f32's, minus 1.
    fn rel(&self, v: Variant) -> f64 {
        self.mean(v, &|r| r.train_loss) / self.mean(Variant::F32, &|r| r.train_loss) - 1.0
    }
}

/// The markdown table of one setting: a row per variant.
fn table(s: &SeedMeans) -> String {
    let (k, runs) = (s.k, s.runs);
    let mut t = String::from("| state | bytes / param |");
    for seed in SEEDS {
        write!(t, " final loss, seed {seed} |").unwrap();
    }
    t.push_str(
        " mean final loss | mean vs f32 | \\|dev\\| | test loss (mean) | test accuracy (mean) | \
         wall time (mean) | in `Lamb::step` (mean) |\n|---|---:|",
    );
    t.push_str(&"---:|".repeat(SEEDS.len() + 7));
    for v in VARIANTS {
        write!(
            t,
            "\n| {} | {:.3} |",
            v.name(),
            runs.get(k, v, SEEDS[0]).bytes_per_param
        )
        .unwrap();
        for seed in SEEDS {
            write!(t, " {:.4e} |", runs.get(k, v, seed).result.train_loss).unwrap();
        }
        write!(
            t,
            " {:.4e} | {:+.2}% | {:.2}% | {:.4} | {:.2}% | {:.2} s | {:.2} s |",
            s.mean(v, &|r| r.train_loss),
            100.0 * s.rel(v),
            100.0 * s.dev(v),
            s.mean(v, &|r| r.test_loss),
            100.0 * s.mean(v, &|r| r.test_acc),
            s.mean(v, &|r| r.wall.as_secs_f64()),
            s.mean(v, &|r| r.opt_time.as_secs_f64()),
        )
        .unwrap();
    }
    t.push('\n');
    t
}

/// The verdict of one setting, whether the acceptance holds, and whether the setting can
/// resolve it (the 1-ulp noise floor below the tolerance).
fn verdict(s: &SeedMeans) -> (String, bool, bool) {
    let pass = [Variant::Bf16, Variant::Q8]
        .iter()
        .all(|&v| s.rel(v).abs() <= TOLERANCE);
    // Say when the means miss only downwards (lower loss than f32's); per seed, |dev| below.
    let only_below = [Variant::Bf16, Variant::Q8]
        .iter()
        .all(|&v| s.rel(v) <= TOLERANCE);
    let skipped: u64 = SEEDS
        .iter()
        .flat_map(|&seed| VARIANTS.map(|v| s.runs.get(s.k, v, seed).result.skipped))
        .sum();
    let floor = s.dev(Variant::F32Ulp);
    let resolves = floor < TOLERANCE;
    let outcome = match (resolves, pass) {
        (true, true) => "holds",
        (true, false) if only_below => {
            "FAILS as a two-sided bar (the means miss downwards: a lower loss than f32's; per \
             seed they scatter, see |dev|)"
        }
        (true, false) => "FAILS",
        (false, true) => "holds, though this setting cannot resolve it (see below)",
        (false, false) => "is not met, though this setting cannot resolve it (see below)",
    };
    let mut verdict = format!(
        "Mean final loss vs f32: bf16 {:+.2}%, 8-bit {:+.2}%: the {:.0}% acceptance {outcome}. \
         Per seed (|dev|), bf16 ends {:.2}% and 8-bit {:.2}% from the f32 run of the same seed, \
         and f32 from weights one bit away {floor_pct:.2}%.",
        100.0 * s.rel(Variant::Bf16),
        100.0 * s.rel(Variant::Q8),
        100.0 * TOLERANCE,
        100.0 * s.dev(Variant::Bf16),
        100.0 * s.dev(Variant::Q8),
        floor_pct = 100.0 * floor,
    );
    if !resolves {
        let cmp = |v| {
            if s.dev(v) > floor {
                "more than"
            } else {
                "less than"
            }
        };
        write!(
            verdict,
            " That floor is above {:.0}%: here the smallest perturbation moves the final loss \
             more than the tolerance, so a {:.0}% test cannot tell precision from chaos. bf16 \
             deviates {} it, 8-bit {} it.",
            100.0 * TOLERANCE,
            100.0 * TOLERANCE,
            cmp(Variant::Bf16),
            cmp(Variant::Q8),
        )
        .unwrap();
    }
    write!(verdict, " Steps skipped for non-finite values: {skipped}.").unwrap();
    (verdict, pass, resolves)
}

fn report(k: usize, runs: &Runs) -> Report {
    let means = SeedMeans { k, runs };
    let (verdict, pass, resolves) = verdict(&means);
    Report {
        table: table(&means),
        verdict,
        pass,
        resolves,
    }
}
