//! Every kind of bad value, at every kind of position, on every backend, through the f32
//! kernels and the compact ones: the step is refused and nothing is written.
//!
//! Phase 1 handles a layer as rows of 16 lanes: full rows, then a zero-padded partial row
//! (lengths not a multiple of 16). Each path has its own copy of the checks, so a bad value
//! is tried at the first element, in the middle of a full row, in the last full row, at
//! each lane of the partial row, and around the reduction block boundary (1024). The kinds:
//! an infinite gradient; a finite gradient whose square overflows (v becomes infinite and u
//! a harmless-looking finite number: only the denominator check sees it); NaN or infinity
//! in m, v or p.

use half::{bf16, f16};
use lamb_core::codec::QBLOCK;
use lamb_core::layer::{CompactLayer, F32Layer};
use lamb_core::{Backend, LANES, LambConfig};
use rand::distr::Uniform;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[path = "common/layer_storage.rs"]
mod layer_storage;
use layer_storage::{GFmt, GradBufs, MFmt, PFmt, Storage};

/// `n` values uniform in [−scale, scale).
fn uniform(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    let dist = Uniform::new(-scale, scale).unwrap();
    (0..n).map(|_| rng.sample(dist)).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bad {
    GradInf,
    GradNegInf,
    /// Finite, but 1e40 overflows f32.
    GradSquareOverflows,
    MNan,
    MInf,
    VNan,
    VInf,
    PNan,
    PInf,
}

const BAD: [Bad; 9] = [
    Bad::GradInf,
    Bad::GradNegInf,
    Bad::GradSquareOverflows,
    Bad::MNan,
    Bad::MInf,
    Bad::VNan,
    Bad::VInf,
    Bad::PNan,
    Bad::PInf,
];

impl Bad {
    fn value(self) -> f32 {
        match self {
            Bad::GradInf | Bad::MInf | Bad::VInf | Bad::PInf => f32::INFINITY,
            Bad::GradNegInf => f32::NEG_INFINITY,
            Bad::GradSquareOverflows => 1e20,
            Bad::MNan | Bad::VNan | Bad::PNan => f32::NAN,
        }
    }
}

/// The storage combinations: the f32 kernels, and compact layers that go through the
/// chunked path (f32 views, decoded bf16/f16, 8-bit moments).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    F32,
    /// f32 params and moments, bf16 gradients.
    F32ParamsBf16Grads,
    /// bf16 params (to nearest) and moments, f32 gradients.
    Bf16,
    /// f32 master + f16 model copy, f16 gradients, f32 moments.
    MasterF16,
    /// bf16 params (stochastic), bf16 gradients, 8-bit moments.
    Bf16Q8,
}

const KERNELS: [Kernel; 5] = [
    Kernel::F32,
    Kernel::F32ParamsBf16Grads,
    Kernel::Bf16,
    Kernel::MasterF16,
    Kernel::Bf16Q8,
];

/// One layer in every format the kernels above read (`common/layer_storage.rs`).
#[derive(Clone, Debug)]
struct Layer {
    s: Storage,
    g: GradBufs,
}

impl Layer {
    fn new(rng: &mut SmallRng, n: usize) -> Layer {
        let p = uniform(rng, n, 1.0);
        let g = uniform(rng, n, 0.1);
        let m = uniform(rng, n, 0.01);
        let v: Vec<f32> = uniform(rng, n, 1e-3).iter().map(|x| x.abs()).collect();
        let q = n.div_ceil(QBLOCK);
        Layer {
            s: Storage {
                pb: p.iter().map(|&x| bf16::from_f32(x)).collect(),
                mb: m.iter().map(|&x| bf16::from_f32(x)).collect(),
                vb: v.iter().map(|&x| bf16::from_f32(x)).collect(),
                ph: p.iter().map(|&x| f16::from_f32(x)).collect(),
                mq: (0..n).map(|i| (i % 97) as u8).collect(),
                vq: (0..n).map(|i| (i % 89) as u8).collect(),
                ma: vec![0.01; q],
                va: vec![1e-3; q],
                p32: p,
                m32: m,
                v32: v,
            },
            g: GradBufs::new(g),
        }
    }

    /// Puts `bad` at element `i` of the buffers `kernel` reads; `false` if that kernel's
    /// format cannot hold the value (f16 gradients cannot hold 1e20; 8-bit codes no NaN).
    fn set(&mut self, kernel: Kernel, bad: Bad, i: usize) -> bool {
        let x = bad.value();
        let grad = matches!(
            bad,
            Bad::GradInf | Bad::GradNegInf | Bad::GradSquareOverflows
        );
        match (kernel, bad) {
            (Kernel::MasterF16, Bad::GradSquareOverflows) => return false,
            (Kernel::Bf16Q8, Bad::MNan | Bad::MInf | Bad::VNan | Bad::VInf) => return false,
            _ => {}
        }
        match bad {
            _ if grad => {
                self.g.g32[i] = x;
                self.g.gb[i] = bf16::from_f32(x);
                self.g.gh[i] = f16::from_f32(x);
            }
            Bad::MNan | Bad::MInf => {
                self.s.m32[i] = x;
                self.s.mb[i] = bf16::from_f32(x);
            }
            Bad::VNan | Bad::VInf => {
                self.s.v32[i] = x;
                self.s.vb[i] = bf16::from_f32(x);
            }
            _ => {
                self.s.p32[i] = x;
                self.s.pb[i] = bf16::from_f32(x);
            }
        }
        true
    }

    /// One step (step 2, so bias correction is not trivial); whether it was skipped.
    fn step(&mut self, b: Backend, kernel: Kernel) -> bool {
        let cfg = LambConfig::paper();
        let r = match kernel {
            Kernel::F32 => b.step_layer(
                &cfg,
                2,
                1.0,
                &mut F32Layer {
                    param: &mut self.s.p32,
                    grad: &self.g.g32,
                    m: &mut self.s.m32,
                    v: &mut self.s.v32,
                },
            ),
            _ => {
                let mut layer = self.compact_layer(kernel);
                b.step_layer_compact(&cfg, 2, 1.0, &mut layer)
            }
        };
        r.unwrap().skipped
    }

    fn compact_layer(&mut self, kernel: Kernel) -> CompactLayer<'_> {
        let (p, g, m, seed) = match kernel {
            Kernel::F32 => unreachable!(),
            Kernel::F32ParamsBf16Grads => (PFmt::F32, GFmt::Bf16, MFmt::F32, 0),
            Kernel::Bf16 => (PFmt::Bf16, GFmt::F32, MFmt::Bf16, 0),
            Kernel::MasterF16 => (PFmt::MasterF16, GFmt::F16, MFmt::F32, 0),
            Kernel::Bf16Q8 => (PFmt::Bf16Sr, GFmt::Bf16, MFmt::Q8, 7),
        };
        self.s.layer(p, self.g.grads(g), m, seed)
    }

    /// Every stored bit (NaN compared by its bits, so a refused step must leave it as is).
    fn bits(&self) -> Vec<u32> {
        self.s.bits()
    }
}

/// The backends of this CPU (scalar included); prints which are skipped.
fn backends() -> Vec<Backend> {
    for b in Backend::ALL {
        if b.checked().is_none() {
            println!("SKIPPED backend {b}: not supported by this CPU");
        }
    }
    Backend::available().collect()
}

/// The position classes of a layer of `n` elements: the first element, the middle of a
/// full row, the last full row (its middle and last lane), every lane of the partial row,
/// and the elements around the block boundary.
fn positions(n: usize) -> Vec<usize> {
    let full = n / LANES;
    let mut out = vec![0];
    if full > 0 {
        out.push((full / 2) * LANES + LANES / 2);
        out.push((full - 1) * LANES + LANES / 2);
        out.push(full * LANES - 1);
    }
    out.extend(full * LANES..n);
    out.extend([1023, 1024].into_iter().filter(|&i| i < n));
    out.sort_unstable();
    out.dedup();
    out.retain(|&i| i < n);
    out
}

/// Runs every (backend, kernel, bad kind, position) on layers of the given lengths; returns
/// how many cases ran. Each must be refused with nothing written; the failures of every
/// backend are gathered and reported together.
fn check(lengths: impl IntoIterator<Item = usize>, every_position: bool) -> usize {
    let backends = backends();
    let mut rng = SmallRng::seed_from_u64(0xbad);
    let mut cases = 0;
    let mut failures: Vec<(Backend, Kernel, String)> = vec![];
    for n in lengths {
        let clean = Layer::new(&mut rng, n);
        let at: Vec<usize> = if every_position {
            (0..n).collect()
        } else {
            positions(n)
        };
        for &i in &at {
            for bad in BAD {
                for kernel in KERNELS {
                    let mut layer = clean.clone();
                    if !layer.set(kernel, bad, i) {
                        continue;
                    }
                    let before = layer.bits();
                    for &b in &backends {
                        let mut l = layer.clone();
                        let skipped = l.step(b, kernel);
                        let what = format!("{b} {kernel:?}: {bad:?} at {i} of {n}");
                        if !skipped {
                            failures.push((b, kernel, format!("{what}: the step was applied")));
                        } else if l.bits() != before {
                            failures.push((b, kernel, format!("{what}: a refused step wrote")));
                        }
                        cases += 1;
                    }
                }
            }
        }
    }
    if !failures.is_empty() {
        let mut summary: Vec<String> = vec![];
        for b in &backends {
            for k in KERNELS {
                let count = failures.iter().filter(|f| f.0 == *b && f.1 == k).count();
                if count > 0 {
                    summary.push(format!("{b} {k:?}: {count}"));
                }
            }
        }
        let first: Vec<&str> = failures.iter().take(10).map(|f| f.2.as_str()).collect();
        panic!(
            "{} of {cases} cases not refused ({}); first: {first:#?}",
            failures.len(),
            summary.join(", ")
        );
    }
    cases
}

/// Lengths with a partial row of 1 and of 15 lanes, and one past a block,
/// at every position class.
#[test]
fn bad_values_at_every_position_class_are_refused() {
    let cases = check([17, 31, 1041], false);
    println!("{cases} cases refused");
}

/// Every position of every length up to 40 (no full row, one, two, with every partial
/// row), and the position classes around the block boundary.
#[test]
fn bad_values_at_every_position_of_short_layers_are_refused() {
    let cases = check(0..=40, true) + check([1023, 1024, 1025], false);
    println!("{cases} cases refused");
}

/// The clean layers step: a test whose layers were always refused would prove nothing.
#[test]
fn clean_layers_step() {
    let mut rng = SmallRng::seed_from_u64(0xbad);
    for n in [1, 17, 31, 1041] {
        let clean = Layer::new(&mut rng, n);
        for b in backends() {
            for kernel in KERNELS {
                let mut l = clean.clone();
                assert!(!l.step(b, kernel), "{b} {kernel:?} n={n}");
                assert!(l.bits() != clean.bits());
            }
        }
    }
}
