//! Compact storage: every combination of parameter, gradient and moment formats gives the
//! same bits on every backend as on `scalar`, and the all-f32 combination equals the f32
//! kernels.

use half::{bf16, f16};
use lamb_core::layer::{CompactLayer, F32Layer};
use lamb_core::{Backend, LambConfig, LayerReport};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[path = "common/layer_storage.rs"]
mod layer_storage;
use layer_storage::{GFmt as G, GradBufs, MFmt as M, PFmt as P, Storage};

/// Seeded random inputs.
struct Inputs(SmallRng);
impl Inputs {
    fn new(seed: u64) -> Inputs {
        Inputs(SmallRng::seed_from_u64(seed))
    }
    /// Mostly ordinary values, with zeros, denormals and values outside f16's range mixed in.
    fn value(&mut self, scale: f32) -> f32 {
        let u: f32 = self.0.random_range(-1.0..1.0);
        match self.0.random_range(0..50) {
            0 => 0.0,
            1 => -0.0,
            2 => f32::from_bits(self.0.random_range(1..0x80_0000)), // f32 denormal
            3 => u * 6e-8,                                          // f16 denormal range
            4 => u * 7e4, // beyond f16's range: rounds to infinity in f16
            _ => u * scale,
        }
    }
}

/// One layer in every format (`common/layer_storage.rs`), its gradients, and the
/// stochastic-rounding seed (callers vary it per step).
#[derive(Clone)]
struct Owned {
    s: Storage,
    g: GradBufs,
    seed: u64,
}

impl Owned {
    fn new(rng: &mut Inputs, n: usize) -> Owned {
        let p32: Vec<f32> = (0..n).map(|_| rng.value(1.0)).collect();
        let g32: Vec<f32> = (0..n).map(|_| rng.value(0.1)).collect();
        Owned {
            s: Storage {
                pb: p32.iter().map(|&x| bf16::from_f32(x)).collect(),
                ph: p32.iter().map(|&x| f16::from_f32(x)).collect(),
                p32,
                ..Storage::zeroed(n)
            },
            g: GradBufs::new(g32),
            seed: 0xfeed,
        }
    }

    fn layer(&mut self, p: P, g: G, m: M) -> CompactLayer<'_> {
        self.s.layer(p, self.g.grads(g), m, self.seed)
    }

    /// Every stored bit.
    fn bits(&self) -> Vec<u32> {
        self.s.bits()
    }
}

fn report_bits(r: &LayerReport) -> [u32; 5] {
    let b = |x: f32| if x.is_nan() { u32::MAX } else { x.to_bits() };
    [
        b(r.param_norm),
        b(r.update_norm),
        b(r.trust_ratio),
        b(r.step_size),
        r.skipped as u32,
    ]
}

fn run(
    backend: Backend,
    owned: &Owned,
    p: P,
    g: G,
    m: M,
    cfg: &LambConfig,
) -> (Owned, Vec<[u32; 5]>) {
    let mut o = owned.clone();
    let mut reports = vec![];
    for step in 1..=2 {
        let mut layer = o.layer(p, g, m);
        let r = backend
            .step_layer_compact(cfg, step, 1.0, &mut layer)
            .unwrap();
        reports.push(report_bits(&r));
    }
    (o, reports)
}

const PS: [P; 5] = [P::F32, P::Bf16, P::Bf16Sr, P::MasterBf16, P::MasterF16];
const GS: [G; 3] = [G::F32, G::Bf16, G::F16];
const MS: [M; 4] = [M::F32, M::Bf16, M::Bf16Sr, M::Q8];

#[test]
fn every_format_combination_is_bit_exact_on_every_backend() {
    let mut rng = Inputs::new(0xabcdef);
    let cfg = LambConfig {
        lr: 0.01,
        ..LambConfig::paper()
    };
    let backends: Vec<Backend> = Backend::available()
        .filter(|&b| b != Backend::Scalar)
        .collect();
    for b in Backend::ALL {
        if b.checked().is_none() {
            println!("SKIPPED backend {b}: not supported by this CPU");
        }
    }
    for n in [0, 1, 7, 16, 17, 255, 256, 257, 1023, 1024, 1025, 2500] {
        let owned = Owned::new(&mut rng, n);
        for p in PS {
            for g in GS {
                for m in MS {
                    let (ref_o, ref_r) = run(Backend::Scalar, &owned, p, g, m, &cfg);
                    for &b in &backends {
                        let (o, r) = run(b, &owned, p, g, m, &cfg);
                        assert_eq!(r, ref_r, "{b} {p:?} {g:?} {m:?} n={n}: report");
                        assert!(
                            o.bits() == ref_o.bits(),
                            "{b} {p:?} {g:?} {m:?} n={n}: state"
                        );
                    }
                }
            }
        }
    }
    println!("backends {backends:?}: 60 combinations x 12 lengths bit-exact");
}

/// The compact path's chunked code (f32 params and moments used in place, gradients
/// decoded from bf16) computes what the f32 kernels compute on the decoded gradients.
/// (An all-f32 compact layer is handed to the f32 kernels directly, so the gradients here
/// are bf16: that keeps the step on the chunked path.)
#[test]
fn compact_path_with_f32_state_equals_the_f32_kernels() {
    let mut rng = Inputs::new(5);
    let cfg = LambConfig::paper();
    for b in Backend::available() {
        for n in [0, 5, 300, 2049] {
            let owned = Owned::new(&mut rng, n);
            let (o, _) = run(b, &owned, P::F32, G::Bf16, M::F32, &cfg);
            let g: Vec<f32> = owned.g.gb.iter().map(|x| x.to_f32()).collect();
            let (mut p, mut m, mut v) = (
                owned.s.p32.clone(),
                owned.s.m32.clone(),
                owned.s.v32.clone(),
            );
            for step in 1..=2 {
                b.step_layer(
                    &cfg,
                    step,
                    1.0,
                    &mut F32Layer {
                        param: &mut p,
                        grad: &g,
                        m: &mut m,
                        v: &mut v,
                    },
                )
                .unwrap();
            }
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&o.s.p32) == bits(&p)
                    && bits(&o.s.m32) == bits(&m)
                    && bits(&o.s.v32) == bits(&v),
                "{b} n={n}"
            );
        }
    }
}

#[test]
fn split_pieces_equal_the_whole_layer() {
    // lamb-std cuts layers into block-aligned pieces for threads: the pieces must compute
    // what the whole layer computes, stochastic rounding included.
    let mut rng = Inputs::new(11);
    let cfg = LambConfig::paper();
    let b = Backend::detect();
    let n = 5000;
    let mut owned = Owned::new(&mut rng, n);
    // Master values past f16's range would make the f16 model copy infinite, a step the
    // plan refuses (tests/half_range.rs): keep them inside, so that the pieces are compared
    // on a step that is applied.
    for x in &mut owned.s.p32 {
        *x = x.clamp(-60000.0, 60000.0);
    }
    for (p, m) in [
        (P::Bf16Sr, M::Q8),
        (P::MasterF16, M::Bf16),
        (P::Bf16Sr, M::Bf16Sr),
    ] {
        let mut whole = owned.clone();
        {
            let mut layer = whole.layer(p, G::F32, m);
            b.step_layer_compact(&cfg, 1, 1.0, &mut layer).unwrap();
        }
        let mut parts = owned.clone();
        {
            let layer = parts.layer(p, G::F32, m);
            let s = lamb_core::StepScalars::new(&cfg, 1, 1.0).unwrap();
            let whole_norms = b.norms_compact(&s, &layer).unwrap();
            let report = lamb_core::LayerReport::plan(&cfg, whole_norms);
            assert!(!report.skipped, "{p:?} {m:?}");
            let (mut a, mut c) = layer.split_at(2048).unwrap();
            let mut blocks = [lamb_core::LayerNorms::default(); 5];
            b.norms_blocks_compact(&s, &a, &mut blocks[..2]).unwrap();
            b.norms_blocks_compact(&s, &c, &mut blocks[2..]).unwrap();
            let sum = blocks
                .iter()
                .fold(lamb_core::LayerNorms::default(), |x, &y| x + y);
            assert_eq!(sum, whole_norms);
            b.apply_compact(&s, report.step_size, &mut a, 0).unwrap();
            b.apply_compact(&s, report.step_size, &mut c, 2048).unwrap();
        }
        assert!(whole.bits() == parts.bits(), "{p:?} {m:?}");
    }
    let mut o = owned.clone();
    let layer = o.layer(P::F32, G::F32, M::Q8);
    assert!(
        layer.split_at(100).is_err(),
        "8-bit moments split inside a block"
    );
}

#[test]
fn non_finite_gradients_skip_in_every_format() {
    let mut rng = Inputs::new(3);
    let cfg = LambConfig::paper();
    let mut owned = Owned::new(&mut rng, 600);
    owned.g.g32[300] = f32::NAN;
    owned.g.gb[300] = bf16::NAN;
    owned.g.gh[300] = f16::INFINITY;
    for b in Backend::available() {
        for p in PS {
            for g in GS {
                for m in MS {
                    let mut o = owned.clone();
                    let before = o.bits();
                    let r = b
                        .step_layer_compact(&cfg, 1, 1.0, &mut o.layer(p, g, m))
                        .unwrap();
                    assert!(r.skipped, "{b} {p:?} {g:?} {m:?}");
                    assert!(o.bits() == before);
                }
            }
        }
    }
}

#[test]
fn length_mismatches_are_refused_untouched() {
    let mut rng = Inputs::new(4);
    let mut o = Owned::new(&mut rng, 300);
    o.s.ma.pop();
    let before = o.bits();
    let e = Backend::Scalar
        .step_layer_compact(
            &LambConfig::paper(),
            1,
            1.0,
            &mut o.layer(P::F32, G::F32, M::Q8),
        )
        .unwrap_err();
    assert_eq!(e.to_string(), "m absmax has 1 elements, param has 2");
    let mut o2 = Owned::new(&mut rng, 300);
    o2.s.ph.pop();
    let e = Backend::Scalar
        .step_layer_compact(
            &LambConfig::paper(),
            1,
            1.0,
            &mut o2.layer(P::MasterF16, G::F32, M::F32),
        )
        .unwrap_err();
    assert!(e.to_string().contains("model copy has 299 elements"), "{e}");
    assert!(o.bits() == before);
}

/// The second moment of a gradient that stops, over 1000 steps of β2 = 0.999: f32 v decays
/// by 0.999^1000 = 0.368. In bf16 with round to nearest, `v·0.999` rounds back to v (the
/// change is under half an ulp), so v never decays; stochastic rounding decays it on
/// average as f32 does.
#[test]
fn bf16_second_moment_decays_only_with_stochastic_rounding() {
    let cfg = LambConfig::paper();
    let b = Backend::detect();
    let n = 4096;
    let v0 = 0.01f32;
    let mean_v = |m: M| {
        let mut o = Owned::new(&mut Inputs::new(9), n);
        o.g.g32.fill(0.0);
        o.s.vb.fill(bf16::from_f32(v0));
        for step in 1..=1000 {
            o.seed = step; // a fresh draw per step, as the docs ask
            b.step_layer_compact(&cfg, step, 1.0, &mut o.layer(P::F32, G::F32, m))
                .unwrap();
        }
        o.s.vb.iter().map(|x| x.to_f64()).sum::<f64>() / n as f64
    };
    let start = bf16::from_f32(v0).to_f64();
    let f32_decay = start * 0.999f64.powi(1000);
    let nearest = mean_v(M::Bf16);
    let stochastic = mean_v(M::Bf16Sr);
    println!(
        "v after 1000 steps: f32 {f32_decay:e}, bf16 nearest {nearest:e}, bf16 stochastic {stochastic:e}"
    );
    assert_eq!(
        nearest, start,
        "round to nearest: v stays put (the defect SR fixes)"
    );
    assert!(
        (stochastic / f32_decay - 1.0).abs() < 0.02,
        "stochastic rounding: mean v {stochastic:e}, f32 {f32_decay:e}"
    );
}
