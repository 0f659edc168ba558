//! An MLP built with `candle_nn` layers and trained with candle's autograd on the digits
//! data the repository ships, once with lamb-candle and once with `candle_nn::AdamW`.
//!
//! ```text
//! cargo run --release -p lamb-candle --example digits
//! ```
//!
//! The model is `64 → 128 → 128 → 10` (`candle_nn::linear`, ReLU, softmax cross-entropy)
//! on the UCI handwritten digits (1797 8×8 images, `lamb-std/examples/data`, split 75/25
//! with a fixed seed), mini-batches of 64, the same seeded initial weights and batch order
//! for both optimizers. The only lines that differ between the two runs are the
//! optimizer's construction (see `Run::optimizer`). Prints a progress bar, then a table:
//! final training loss, test accuracy, optimizer time per step, total time.
//!
//! Options: `--epochs N` (default 30), `--threads N` (lamb-candle's, default 1).

use std::io::Read;
use std::time::{Duration, Instant};

use candle_core::{D, DType, Device, Module, Tensor, Var};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use lamb_candle::lamb_std::lamb_core::LambConfig;

/// The data: `label` then 64 pixels in 0..=16 per line... see `read_digits`.
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../../lamb-std/examples/data/digits.csv.gz");
const INPUTS: usize = 64;
const HIDDEN: usize = 128;
const CLASSES: usize = 10;
const BATCH: usize = 64;
const SEED: u64 = 2019;

type Result<T> = candle_core::Result<T>;

/// SplitMix64: seeded initial weights and shuffles, the same for both runs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
    }
}

/// A split of the data: `x` is `n × 64` in 0..=1, `y` the labels.
struct Split {
    x: Tensor,
    y: Tensor,
}

/// The 1797 images (64 pixels then the label, per line), split 75/25 by a seeded shuffle.
fn read_digits() -> Result<(Split, Split)> {
    let mut csv = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ).read_to_string(&mut csv)?;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for line in csv.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse().map_err(candle_core::Error::wrap))
            .collect::<Result<_>>()?;
        if f.len() != INPUTS + 1 {
            candle_core::bail!("a line of digits.csv has {} fields", f.len());
        }
        x.extend(f[..INPUTS].iter().map(|p| p / 16.0));
        y.push(f[INPUTS] as u32);
    }
    let n = y.len();
    let mut idx: Vec<u32> = (0..n as u32).collect();
    Rng(SEED ^ 0x5EED_5917).shuffle(&mut idx);
    let test = n.div_ceil(4);
    let x = Tensor::from_vec(x, (n, INPUTS), &Device::Cpu)?;
    let y = Tensor::from_vec(y, n, &Device::Cpu)?;
    let pick = |ids: &[u32]| -> Result<Split> {
        let ids = Tensor::new(ids, &Device::Cpu)?;
        Ok(Split {
            x: x.index_select(&ids, 0)?,
            y: y.index_select(&ids, 0)?,
        })
    };
    Ok((pick(&idx[..n - test])?, pick(&idx[n - test..])?))
}

/// The initial weights, seeded (candle's CPU generator cannot be): uniform in ±1/√fan_in,
/// as `candle_nn::linear` draws its bias.
fn initial_weights() -> Result<VarMap> {
    let map = VarMap::new();
    let mut rng = Rng(SEED);
    let mut data = map.data().lock().expect("a fresh map");
    for (name, inputs, outputs) in [
        ("fc1", INPUTS, HIDDEN),
        ("fc2", HIDDEN, HIDDEN),
        ("fc3", HIDDEN, CLASSES),
    ] {
        let bound = 1.0 / (inputs as f32).sqrt();
        let mut var = |shape: &[usize]| -> Result<Var> {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.symmetric() * bound).collect();
            Var::from_vec(v, shape, &Device::Cpu)
        };
        data.insert(format!("{name}.weight"), var(&[outputs, inputs])?);
        data.insert(format!("{name}.bias"), var(&[outputs])?);
    }
    drop(data);
    Ok(map)
}

/// A copy of `map`, so that both runs start from the same weights.
fn copy(map: &VarMap) -> Result<VarMap> {
    let out = VarMap::new();
    for (name, var) in map.data().lock().expect("not poisoned").iter() {
        let t = var.as_tensor().copy()?;
        out.data()
            .lock()
            .expect("not poisoned")
            .insert(name.clone(), Var::from_tensor(&t)?);
    }
    Ok(out)
}

struct Mlp {
    layers: [Linear; 3],
}

impl Mlp {
    /// `candle_nn::linear` layers over the Vars of `map` (which already holds them).
    fn new(map: &VarMap) -> Result<Mlp> {
        let vb = VarBuilder::from_varmap(map, DType::F32, &Device::Cpu);
        Ok(Mlp {
            layers: [
                candle_nn::linear(INPUTS, HIDDEN, vb.pp("fc1"))?,
                candle_nn::linear(HIDDEN, HIDDEN, vb.pp("fc2"))?,
                candle_nn::linear(HIDDEN, CLASSES, vb.pp("fc3"))?,
            ],
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.layers[0].forward(x)?.relu()?;
        let h = self.layers[1].forward(&h)?.relu()?;
        self.layers[2].forward(&h)
    }
}

/// Which optimizer a run uses.
#[derive(Clone, Copy)]
enum Run {
    Lamb,
    AdamW,
}

/// Either optimizer, behind the same trait (boxed: lamb-candle holds its settings inline).
enum Opt {
    Lamb(Box<lamb_candle::Lamb>),
    AdamW(AdamW),
}

impl Run {
    fn name(self) -> &'static str {
        match self {
            Run::Lamb => "lamb-candle (LAMB)",
            Run::AdamW => "candle_nn::AdamW",
        }
    }

    /// The lines a candle user changes to switch: the optimizer's construction.
    fn optimizer(self, map: &VarMap, threads: usize) -> Result<Opt> {
        Ok(match self {
            Run::Lamb => Opt::Lamb(Box::new(lamb_candle::Lamb::from_varmap(
                map,
                lamb_candle::Config {
                    lamb: LambConfig {
                        lr: 1e-2,
                        ..LambConfig::paper()
                    },
                    threads,
                    ..Default::default()
                },
            )?)),
            Run::AdamW => Opt::AdamW(AdamW::new(
                map.all_vars(),
                ParamsAdamW {
                    lr: 1e-3,
                    weight_decay: 0.01,
                    ..Default::default()
                },
            )?),
        })
    }
}

impl Opt {
    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        match self {
            Opt::Lamb(o) => o.step(grads),
            Opt::AdamW(o) => o.step(grads),
        }
    }
}

/// What a run ends with.
struct Outcome {
    run: Run,
    train_loss: f32,
    test_accuracy: f32,
    opt_time: Duration,
    steps: u32,
    total: Duration,
}

fn train(
    run: Run,
    init: &VarMap,
    data: &(Split, Split),
    epochs: usize,
    threads: usize,
    bar: &ProgressBar,
) -> Result<Outcome> {
    let start = Instant::now();
    let map = copy(init)?;
    let model = Mlp::new(&map)?;
    let mut opt = run.optimizer(&map, threads)?;
    let (train, test) = data;
    let n = train.y.dims1()?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = Rng(SEED ^ 0xBA7C);
    let (mut opt_time, mut steps) = (Duration::ZERO, 0u32);
    let mut train_loss = f32::NAN;
    for epoch in 0..epochs {
        rng.shuffle(&mut order);
        let (mut sum, mut count) = (0.0f32, 0usize);
        for batch in order.chunks(BATCH) {
            let ids = Tensor::new(batch, &Device::Cpu)?;
            let (x, y) = (
                train.x.index_select(&ids, 0)?,
                train.y.index_select(&ids, 0)?,
            );
            let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
            let grads = loss.backward()?;
            let t = Instant::now();
            opt.step(&grads)?;
            opt_time += t.elapsed();
            steps += 1;
            sum += loss.to_scalar::<f32>()? * batch.len() as f32;
            count += batch.len();
        }
        train_loss = sum / count as f32;
        bar.set_message(format!(
            "{}: epoch {}/{epochs}, loss {train_loss:.4}",
            run.name(),
            epoch + 1
        ));
        bar.inc(1);
    }
    let predicted = model.forward(&test.x)?.argmax(D::Minus1)?;
    let right = predicted.eq(&test.y)?.to_dtype(DType::F32)?.mean_all()?;
    Ok(Outcome {
        run,
        train_loss,
        test_accuracy: right.to_scalar::<f32>()?,
        opt_time,
        steps,
        total: start.elapsed(),
    })
}

fn main() -> Result<()> {
    let (mut epochs, mut threads) = (30usize, 1usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next().and_then(|v| v.parse().ok());
        match (a.as_str(), value) {
            ("--epochs", Some(n)) => epochs = n,
            ("--threads", Some(n)) => threads = n,
            _ => {
                eprintln!("usage: digits [--epochs N] [--threads N]");
                std::process::exit(2);
            }
        }
    }
    let data = read_digits()?;
    let init = initial_weights()?;
    let runs = [Run::Lamb, Run::AdamW];
    let bar = ProgressBar::new((runs.len() * epochs) as u64);
    bar.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} {pos}/{len} epochs  {msg}")
            .map_err(candle_core::Error::wrap)?,
    );
    let outcomes = runs
        .iter()
        .map(|&run| train(run, &init, &data, epochs, threads, &bar))
        .collect::<Result<Vec<_>>>()?;
    bar.finish_and_clear();

    println!(
        "digits: 64-128-128-10 MLP (candle_nn::linear, candle autograd), {} train / {} test images, batch {BATCH}, {epochs} epochs",
        data.0.y.dims1()?,
        data.1.y.dims1()?
    );
    println!();
    println!(
        "| optimizer            | train loss | test accuracy | optimizer time / step | total time |"
    );
    println!(
        "|----------------------|-----------:|--------------:|----------------------:|-----------:|"
    );
    for o in &outcomes {
        println!(
            "| {:<20} | {:>10.4} | {:>12.2}% | {:>18.1} µs | {:>8.2} s |",
            o.run.name(),
            o.train_loss,
            100.0 * o.test_accuracy,
            o.opt_time.as_secs_f64() * 1e6 / o.steps as f64,
            o.total.as_secs_f64()
        );
    }
    Ok(())
}
