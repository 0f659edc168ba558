//! What the examples share: the digits data (shipped in `examples/data`, embedded at compile
//! time), the seeded random generator, a small MLP with its forward and backward pass written
//! out as plain loops, and the PNG plot setup.
//!
//! No ML framework: the model is three dense layers, `64 → 128 → 128 → 10`, ReLU between
//! them and softmax cross-entropy at the end, all in f32. A weight matrix is stored
//! `[inputs][outputs]` row-major, so that both the forward pass and the weight gradient are
//! `axpy` loops over contiguous rows (which the compiler vectorises), and the only
//! reduction (the gradient of the hidden activations) is a dot product with eight
//! independent accumulators.

use std::io::Read;

use rand::{Rng, RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;

/// Pixels per image (8×8).
pub const INPUTS: usize = 64;
/// Digits 0–9.
pub const CLASSES: usize = 10;
/// Hidden width of both hidden layers.
pub const HIDDEN: usize = 128;
/// Seed of everything: the split, the initial weights, the shuffles.
pub const SEED: u64 = 2019;
/// Test-set share of the split (sklearn's `train_test_split` default, 25%).
pub const TEST_FRACTION: f64 = 0.25;

/// The UCI handwritten digits as scikit-learn ships them (see `examples/data/README.md`).
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");
/// DejaVu Sans cut down to ASCII (see `examples/data/README.md`).
pub const FONT: &[u8] = include_bytes!("../data/DejaVuSans-subset.ttf");

/// A labelled set: `x` is `len × INPUTS`, pixels scaled from 0..=16 to 0..=1.
pub struct Dataset {
    pub x: Vec<f32>,
    pub y: Vec<u8>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    fn pick(&self, idx: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(idx.len() * INPUTS);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            x.extend_from_slice(&self.x[i * INPUTS..(i + 1) * INPUTS]);
            y.push(self.y[i]);
        }
        Dataset { x, y }
    }
}

/// All 1797 images, in file order.
pub fn load_digits() -> Dataset {
    let mut csv = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut csv)
        .expect("examples/data/digits.csv.gz is a gzip'd text file");
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (n, line) in csv.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let fields: Vec<f32> = line
            .split(',')
            .map(|f| f.trim().parse::<f32>().expect("a number"))
            .collect();
        assert_eq!(fields.len(), INPUTS + 1, "line {} of digits.csv", n + 1);
        x.extend(fields[..INPUTS].iter().map(|p| p / 16.0));
        let label = fields[INPUTS];
        assert!((0.0..10.0).contains(&label) && label.fract() == 0.0);
        y.push(label as u8);
    }
    assert_eq!(y.len(), 1797, "the UCI digits set has 1797 images");
    Dataset { x, y }
}

/// The fixed split: a seeded shuffle, the last 25% is the test set.
pub fn split(all: &Dataset) -> (Dataset, Dataset) {
    let mut idx: Vec<usize> = (0..all.len()).collect();
    shuffle(&mut rng(SEED ^ 0x5EED_5917), &mut idx);
    let test = (all.len() as f64 * TEST_FRACTION).ceil() as usize;
    let (train, test) = idx.split_at(all.len() - test);
    (all.pick(train), all.pick(test))
}

/// The examples' random generator, seeded: SplitMix64 from `rand_xoshiro`, whose output is
/// fixed by its definition (unlike `StdRng`/`SmallRng`, which may change between `rand`
/// versions), so the committed `docs/` reproduce bit for bit. Uniform draws are rand's
/// `random::<f64>()`.
pub fn rng(seed: u64) -> SplitMix64 {
    SplitMix64::seed_from_u64(seed)
}

/// Fisher–Yates with `next_u64() % (i + 1)` draws (the modulo bias is negligible for these
/// lengths). Not `SliceRandom::shuffle`, which draws differently: this is the data order the
/// committed `docs/` were computed with.
pub fn shuffle<T>(rng: &mut SplitMix64, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}

/// A dense layer's shape.
#[derive(Clone, Copy)]
struct Dense {
    inputs: usize,
    outputs: usize,
}

const LAYERS: [Dense; 3] = [
    Dense {
        inputs: INPUTS,
        outputs: HIDDEN,
    },
    Dense {
        inputs: HIDDEN,
        outputs: HIDDEN,
    },
    Dense {
        inputs: HIDDEN,
        outputs: CLASSES,
    },
];

/// Names and shapes of the tensors, in the order of [`Mlp::params`] (what the optimizer is
/// told with `add_param`: rank-2 weights get weight decay and the trust ratio, biases not).
pub fn param_specs() -> Vec<(String, Vec<usize>)> {
    let mut specs = Vec::new();
    for (l, d) in LAYERS.iter().enumerate() {
        specs.push((format!("fc{}.weight", l + 1), vec![d.inputs, d.outputs]));
        specs.push((format!("fc{}.bias", l + 1), vec![d.outputs]));
    }
    specs
}

/// The model's parameters: `[w1, b1, w2, b2, w3, b3]`, weights `[inputs][outputs]`.
#[derive(Clone)]
pub struct Mlp {
    pub params: Vec<Vec<f32>>,
}

impl Mlp {
    /// He-uniform weights (`±√(6/fan_in)`), zero biases.
    pub fn new(seed: u64) -> Mlp {
        let mut rng = rng(seed);
        let mut params = Vec::new();
        for d in LAYERS {
            let bound = (6.0 / d.inputs as f64).sqrt();
            params.push(
                (0..d.inputs * d.outputs)
                    .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
                    .collect(),
            );
            params.push(vec![0.0; d.outputs]);
        }
        Mlp { params }
    }

    pub fn param_count(&self) -> usize {
        self.params.iter().map(Vec::len).sum()
    }

    /// Gradient buffers shaped like the parameters.
    pub fn zeros_like(&self) -> Vec<Vec<f32>> {
        self.params.iter().map(|p| vec![0.0; p.len()]).collect()
    }

    /// Forward pass of `x` (`n × INPUTS`) into `acts`: `acts[0]` and `acts[1]` the hidden
    /// activations after ReLU, `acts[2]` the logits.
    fn forward(&self, x: &[f32], n: usize, acts: &mut [Vec<f32>; 3]) {
        for (l, d) in LAYERS.iter().enumerate() {
            let (w, b) = (&self.params[2 * l], &self.params[2 * l + 1]);
            let (before, rest) = acts.split_at_mut(l);
            let input: &[f32] = if l == 0 { x } else { &before[l - 1] };
            let out = &mut rest[0];
            out.resize(n * d.outputs, 0.0);
            for i in 0..n {
                let row = &mut out[i * d.outputs..(i + 1) * d.outputs];
                row.copy_from_slice(b);
                // Inputs are sparse (blank pixels, ReLU zeros): skip the zero ones.
                for (k, &a) in input[i * d.inputs..(i + 1) * d.inputs].iter().enumerate() {
                    if a != 0.0 {
                        axpy(row, a, &w[k * d.outputs..(k + 1) * d.outputs]);
                    }
                }
                if l + 1 < LAYERS.len() {
                    for v in row.iter_mut() {
                        *v = v.max(0.0);
                    }
                }
            }
        }
    }

    /// Mean softmax cross-entropy and accuracy over a whole set.
    pub fn evaluate(&self, data: &Dataset, scratch: &mut Scratch) -> (f64, f64) {
        const CHUNK: usize = 256;
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for start in (0..data.len()).step_by(CHUNK) {
            let n = CHUNK.min(data.len() - start);
            let x = &data.x[start * INPUTS..(start + n) * INPUTS];
            self.forward(x, n, &mut scratch.acts);
            for i in 0..n {
                let logits = &scratch.acts[2][i * CLASSES..(i + 1) * CLASSES];
                let label = data.y[start + i] as usize;
                loss += cross_entropy(logits, label, None);
                let argmax = (0..CLASSES)
                    .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                    .unwrap();
                correct += (argmax == label) as usize;
            }
        }
        (loss / data.len() as f64, correct as f64 / data.len() as f64)
    }

    /// Loss and gradients (into `grads`, overwritten) of the mean cross-entropy over the
    /// samples `batch` of `data`. Returns the mean loss.
    pub fn loss_and_grad(
        &self,
        data: &Dataset,
        batch: &[usize],
        grads: &mut [Vec<f32>],
        scratch: &mut Scratch,
    ) -> f64 {
        let n = batch.len();
        scratch.x.clear();
        for &i in batch {
            scratch
                .x
                .extend_from_slice(&data.x[i * INPUTS..(i + 1) * INPUTS]);
        }
        let x = std::mem::take(&mut scratch.x);
        self.forward(&x, n, &mut scratch.acts);

        // d loss / d logits = (softmax − onehot) / n, written over the logits.
        let mut loss = 0.0f64;
        let inv_n = 1.0 / n as f32;
        {
            let logits = &mut scratch.acts[2];
            let mut d = [0.0f32; CLASSES];
            for (i, &s) in batch.iter().enumerate() {
                let row = &mut logits[i * CLASSES..(i + 1) * CLASSES];
                loss += cross_entropy(row, data.y[s] as usize, Some(&mut d));
                for (r, dv) in row.iter_mut().zip(d) {
                    *r = dv * inv_n;
                }
            }
        }

        for g in grads.iter_mut() {
            g.fill(0.0);
        }
        // Layers from the last to the first: `delta` is d loss / d (layer output).
        for l in (0..LAYERS.len()).rev() {
            let d = LAYERS[l];
            let (before, rest) = scratch.acts.split_at_mut(l);
            let delta = &rest[0];
            let input: &[f32] = if l == 0 { &x } else { &before[l - 1] };
            let (gw, gb) = {
                let (a, b) = grads.split_at_mut(2 * l + 1);
                (&mut a[2 * l], &mut b[0])
            };
            for i in 0..n {
                let drow = &delta[i * d.outputs..(i + 1) * d.outputs];
                add(gb, drow);
                for (k, &a) in input[i * d.inputs..(i + 1) * d.inputs].iter().enumerate() {
                    if a != 0.0 {
                        axpy(&mut gw[k * d.outputs..(k + 1) * d.outputs], a, drow);
                    }
                }
            }
            if l > 0 {
                // d loss / d (previous activation), through its ReLU: zero where the unit
                // was off, so only active units need the dot product.
                let w = &self.params[2 * l];
                let prev = &mut before[l - 1];
                for i in 0..n {
                    let drow = &delta[i * d.outputs..(i + 1) * d.outputs];
                    for k in 0..d.inputs {
                        let a = &mut prev[i * d.inputs + k];
                        *a = if *a > 0.0 {
                            dot(drow, &w[k * d.outputs..(k + 1) * d.outputs])
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
        scratch.x = x;
        loss / n as f64
    }
}

/// Working memory of the passes, reused from batch to batch.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    acts: [Vec<f32>; 3],
}

/// `−log softmax(logits)[label]`, computed stably; optionally the gradient
/// `softmax − onehot` into `grad`.
fn cross_entropy(logits: &[f32], label: usize, grad: Option<&mut [f32; CLASSES]>) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut e = [0.0f32; CLASSES];
    let mut sum = 0.0f32;
    for (e, &z) in e.iter_mut().zip(logits) {
        *e = (z - max).exp();
        sum += *e;
    }
    if let Some(g) = grad {
        for (c, (g, e)) in g.iter_mut().zip(e).enumerate() {
            *g = e / sum - (c == label) as u32 as f32;
        }
    }
    (sum.ln() - (logits[label] - max)) as f64
}

/// `y += a·x`.
#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `y += x`.
#[inline]
fn add(y: &mut [f32], x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += x;
    }
}

/// Dot product with eight independent partial sums (vectorisable without fast-math).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// What one training run produced.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// Mean cross-entropy over the whole training set (no weight-decay term), before
    /// training and after every epoch.
    pub curve: Vec<f64>,
    /// The last point of `curve`.
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    /// Optimizer steps taken, and how many the optimizer skipped (non-finite gradients).
    pub steps: u64,
    pub skipped: u64,
    /// Wall time of the whole run (forward, backward, optimizer), and of `Lamb::step` alone.
    pub wall: std::time::Duration,
    pub opt_time: std::time::Duration,
}

/// Optimizer steps of `epochs` epochs over `n` samples in batches of `batch` (the last
/// batch of an epoch may be smaller: every epoch sees every sample once).
pub fn total_steps(n: usize, batch: usize, epochs: usize) -> u64 {
    (n.div_ceil(batch) * epochs) as u64
}

/// Registers the model's tensors with `opt`, in the order of [`Mlp::params`].
pub fn register(opt: &mut lamb_std::Lamb) {
    for (name, shape) in param_specs() {
        opt.add_param(name, &shape).expect("valid layer");
    }
}

/// How long [`train`] trains and on which shuffles.
#[derive(Clone, Copy, Debug)]
pub struct TrainSettings {
    /// Samples per optimizer step (the last batch of an epoch may be smaller).
    pub batch: usize,
    /// Passes over the training set.
    pub epochs: usize,
    /// Seed of the shuffles.
    pub seed: u64,
}

/// Trains `model` with `opt` (its tensors registered, its schedule set) for
/// `settings.epochs` epochs of shuffles (from `settings.seed`) in batches of
/// `settings.batch`. `on_epoch` is called after every epoch (for a progress bar).
pub fn train(
    mut opt: lamb_std::Lamb,
    model: Mlp,
    train: &Dataset,
    test: &Dataset,
    settings: TrainSettings,
    on_epoch: &dyn Fn(),
) -> RunResult {
    let batch_step =
        |model: &mut Mlp, chunk: &[usize], grads: &mut Vec<Vec<f32>>, scratch: &mut Scratch| {
            model.loss_and_grad(train, chunk, grads, scratch);
            let t = std::time::Instant::now();
            let mut ps: Vec<&mut [f32]> = model.params.iter_mut().map(|p| &mut p[..]).collect();
            let gs: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
            let report = opt.step(&mut ps, &gs).expect("a valid step");
            (report.applied, t.elapsed())
        };
    train_loop(model, train, test, settings, true, on_epoch, batch_step)
}

/// The training loop of [`train`] and of the data-parallel example: the shuffles (the same
/// sequence for every run of a seed, whatever its batch size or optimizer), one call of
/// `batch_step` per batch (it computes the gradients and steps, and returns whether the step
/// was applied and the optimizer's time), and the loss curve. With `evaluate` false (a rank
/// other than the first) the losses are left at 0.
pub fn train_loop(
    mut model: Mlp,
    train: &Dataset,
    test: &Dataset,
    settings: TrainSettings,
    evaluate: bool,
    on_epoch: &dyn Fn(),
    mut batch_step: impl FnMut(
        &mut Mlp,
        &[usize],
        &mut Vec<Vec<f32>>,
        &mut Scratch,
    ) -> (bool, std::time::Duration),
) -> RunResult {
    let started = std::time::Instant::now();
    let mut grads = model.zeros_like();
    let mut scratch = Scratch::default();
    let mut rng = rng(settings.seed ^ 0xBA7C4);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let loss = |model: &Mlp, data: &Dataset, scratch: &mut Scratch| {
        if evaluate {
            model.evaluate(data, scratch)
        } else {
            (0.0, 0.0)
        }
    };
    let mut curve = vec![loss(&model, train, &mut scratch).0];
    let (mut steps, mut skipped) = (0u64, 0u64);
    let mut opt_time = std::time::Duration::ZERO;
    for _ in 0..settings.epochs {
        shuffle(&mut rng, &mut order);
        for chunk in order.chunks(settings.batch) {
            let (applied, took) = batch_step(&mut model, chunk, &mut grads, &mut scratch);
            opt_time += took;
            steps += 1;
            skipped += u64::from(!applied);
        }
        curve.push(loss(&model, train, &mut scratch).0);
        on_epoch();
    }
    let (test_loss, test_acc) = loss(&model, test, &mut scratch);
    RunResult {
        train_loss: *curve.last().unwrap_or(&0.0),
        curve,
        test_loss,
        test_acc,
        steps,
        skipped,
        wall: started.elapsed(),
        opt_time,
    }
}

/// Runs `jobs` on `threads` worker threads (each run is single-threaded and independent),
/// returning the results in job order.
pub fn run_parallel<J: Sync, R: Send>(
    jobs: &[J],
    threads: usize,
    run: impl Fn(&J) -> R + Sync,
) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= jobs.len() {
                        break;
                    }
                    let r = run(&jobs[i]);
                    *results[i].lock().unwrap() = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.into_inner().unwrap().expect("every job ran"))
        .collect()
}

/// Worker threads: one per core.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Makes the shipped font plotters' `"sans-serif"` (no system fonts needed).
pub fn register_font() {
    use plotters::style::{FontStyle, register_font};
    if register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
        panic!("examples/data/DejaVuSans-subset.ttf is not a font");
    }
}

/// One panel of a figure drawn into an RGB buffer.
pub type Panel<'a> =
    plotters::drawing::DrawingArea<plotters::backend::BitMapBackend<'a>, plotters::coord::Shift>;

/// A legend key: a short line in `style`.
pub fn line_key(
    style: plotters::style::ShapeStyle,
) -> impl Fn((i32, i32)) -> plotters::element::PathElement<(i32, i32)> {
    move |(x, y)| plotters::element::PathElement::new(vec![(x, y), (x + 20, y)], style)
}

/// Draws a chart's legend at `position`, on a translucent white box with a black border.
pub fn draw_legend<'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut plotters::chart::ChartContext<'a, plotters::backend::BitMapBackend<'a>, CT>,
    position: plotters::chart::SeriesLabelPosition,
    font_size: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::style::{BLACK, Color, WHITE};
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", font_size))
        .draw()?;
    Ok(())
}

/// Writes an RGB8 buffer as a PNG file.
pub fn write_png(
    path: &std::path::Path,
    rgb: &[u8],
    width: u32,
    height: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::High);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(())
}

/// The command that started this example, as a user would type it (for the "written by"
/// line of the documents it writes).
pub fn command_line(example: &str) -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut command = format!("cargo run --release --example {example}");
    if !args.is_empty() {
        command.push_str(" -- ");
        command.push_str(&args.join(" "));
    }
    command
}

/// Where an example writes its plot and table: `--out DIR` if given; the workspace's `docs/`
/// with `--write-docs` (the committed copies, regenerated only when asked); otherwise
/// `<target dir>/<example>/`, beside the build output, so that an ordinary run leaves the
/// repository's tracked files alone.
pub fn out_dir(
    example: &str,
    out: Option<std::path::PathBuf>,
    write_docs: bool,
) -> std::path::PathBuf {
    match (out, write_docs) {
        (Some(dir), _) => dir,
        (None, true) => workspace_dir().join("docs"),
        (None, false) => target_dir().join(example),
    }
}

/// The workspace's root.
fn workspace_dir() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The target directory the running example was built in: cargo puts it at
/// `<target>/<profile>/examples/<name>` (`<target>/<triple>/<profile>/...` when cross
/// compiling, which gives `<target>/<triple>`, still inside it).
fn target_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(std::path::Path::to_path_buf))
        .unwrap_or_else(|| workspace_dir().join("target"))
}

/// CPU time of this process so far (user + system, all threads), where Linux's
/// `/proc/self/stat` tells it; `None` elsewhere. Wall time on a busy machine overstates what a
/// run needs; this does not.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15, in
    // clock ticks of USER_HZ = 100 on every Linux architecture.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// "12.3 s" of wall time, with the CPU time when known.
pub fn time_summary(wall: std::time::Duration) -> String {
    match cpu_seconds() {
        Some(cpu) => format!(
            "{:.1} s wall time, {cpu:.1} s of CPU time over {} cores",
            wall.as_secs_f64(),
            cores()
        ),
        None => format!("{:.1} s wall time", wall.as_secs_f64()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ordinary run writes under the target directory the example was built in; only
    /// `--write-docs` writes the tracked `docs/`, and `--out` wins over both.
    #[test]
    fn a_run_writes_under_target_and_only_write_docs_writes_docs() {
        let docs = workspace_dir().join("docs");
        let run = out_dir("train_digits", None, false);
        assert!(!run.starts_with(&docs), "{}", run.display());
        assert!(run.ends_with("train_digits"), "{}", run.display());
        let target = run.parent().unwrap();
        assert!(std::env::current_exe().unwrap().starts_with(target));
        assert_eq!(out_dir("train_digits", None, true), docs);
        let elsewhere = std::path::PathBuf::from("elsewhere");
        assert_eq!(
            out_dir("train_digits", Some(elsewhere.clone()), false),
            elsewhere
        );
    }
}
