//! New parameters must fit the format they are stored in: a step that could round a weight
//! to infinity in f16 or bf16 (to nearest or stochastically) is refused on every backend,
//! with nothing written; the check uses the ranges of p and u from phase 1, which every
//! backend computes bit for bit alike.

use half::{bf16, f16};
use lamb_core::layer::{CompactLayer, Grads, HalfMut, Moments, ParamFormat, Params, Rounding};
use lamb_core::{Backend, LambConfig, LambError, LayerNorms, LayerReport, NonFinite, StepScalars};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// One layer's owned buffers: f32 master/params, bf16 and f16 copies, f32 grads, f32 moments.
#[derive(Clone, PartialEq, Debug)]
struct Owned {
    p32: Vec<f32>,
    pb: Vec<bf16>,
    ph: Vec<f16>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

#[derive(Clone, Copy, Debug)]
enum P {
    MasterF16,
    MasterBf16,
    Bf16,
    Bf16Sr(u64),
}

impl Owned {
    fn new(p: &[f32], g: &[f32]) -> Owned {
        Owned {
            p32: p.to_vec(),
            pb: p.iter().map(|&x| bf16::from_f32(x)).collect(),
            ph: p.iter().map(|&x| f16::from_f32(x)).collect(),
            g: g.to_vec(),
            m: vec![0.0; p.len()],
            v: vec![0.0; p.len()],
        }
    }

    fn layer(&mut self, p: P) -> CompactLayer<'_> {
        CompactLayer {
            params: match p {
                P::MasterF16 => Params::Master {
                    master: &mut self.p32,
                    model: HalfMut::F16(&mut self.ph),
                },
                P::MasterBf16 => Params::Master {
                    master: &mut self.p32,
                    model: HalfMut::Bf16(&mut self.pb),
                },
                P::Bf16 => Params::Bf16 {
                    data: &mut self.pb,
                    rounding: Rounding::Nearest,
                },
                P::Bf16Sr(seed) => Params::Bf16 {
                    data: &mut self.pb,
                    rounding: Rounding::Stochastic { seed },
                },
            },
            grads: Grads::F32(&self.g),
            moments: Moments::F32 {
                m: &mut self.m,
                v: &mut self.v,
            },
        }
    }

    /// Whether the stored copy that `p` writes holds only finite values.
    fn model_finite(&self, p: P) -> bool {
        match p {
            P::MasterF16 => self.ph.iter().all(|x| x.is_finite()),
            _ => self.pb.iter().all(|x| x.is_finite()),
        }
    }
}

/// The step must be refused on every backend under both policies, with nothing written.
fn assert_refused(cfg: LambConfig, p: P, owned: &Owned) {
    for b in Backend::available() {
        for policy in [NonFinite::Skip, NonFinite::Error] {
            let cfg = LambConfig {
                non_finite: policy,
                ..cfg
            };
            let mut o = owned.clone();
            let r = b.step_layer_compact(&cfg, 1, 1.0, &mut o.layer(p));
            match policy {
                NonFinite::Skip => assert!(r.unwrap().skipped, "{b} {p:?}: applied"),
                NonFinite::Error => assert_eq!(r, Err(LambError::NonFinite {})),
            }
            assert!(&o == owned, "{b} {p:?}: a refused step wrote");
        }
    }
}

#[test]
fn steps_past_the_storage_range_are_refused_on_every_backend() {
    let adamw = LambConfig {
        lr: 1000.0,
        ..LambConfig::paper().adamw()
    };
    // f16 65000 − 1000·(−1 + 0.01·65000): far below −65504.
    let o = Owned::new(&[65000.0; 40], &[-1.0; 40]);
    assert_refused(adamw, P::MasterF16, &o);
    // LAMB: the trust ratio makes the step 0.1·60000, 60000 → 66000.
    let lamb = LambConfig {
        lr: 0.1,
        ..LambConfig::optax()
    };
    let o = Owned::new(&[60000.0; 40], &[-1.0; 40]);
    assert_refused(lamb, P::MasterF16, &o);
    // 1 + 3.398e38 is a finite f32 that rounds to infinity in bf16. (The step starts from
    // small weights: a weight near bf16::MAX would overflow the f32 sum of squares of ‖p‖,
    // refusing the step before the range check is reached, see `edge_cases.rs`.)
    let up = LambConfig {
        lr: 3.398e38,
        weight_decay: 0.0,
        ..LambConfig::paper().adamw()
    };
    let mut g = vec![0.0f32; 19];
    g[17] = -1.0;
    let o = Owned::new(&[1.0; 19], &g);
    for f in [P::MasterBf16, P::Bf16, P::Bf16Sr(1), P::Bf16Sr(2)] {
        assert_refused(up, f, &o);
    }
    // Stochastic rounding can take anything above bf16::MAX to infinity, even a step far
    // below half an ulp that rounding to nearest would take back to bf16::MAX: here the new
    // weight is bf16::MAX·(1 + 1e-5), about 1/200 of an ulp above it.
    let tiny = LambConfig {
        lr: bf16::MAX.to_f32() as f64 * (1.0 + 1e-5),
        ..up
    };
    assert_refused(tiny, P::Bf16Sr(3), &o);
    let mut near = o.clone();
    assert!(
        !Backend::Scalar
            .step_layer_compact(&tiny, 1, 1.0, &mut near.layer(P::Bf16))
            .unwrap()
            .skipped
    );
    assert_eq!(near.pb[17], bf16::MAX);
}

/// The plan's bound is exact at the limits: the largest new value the format keeps finite
/// passes, the next f32 up does not, on both signs, for every format.
#[test]
fn the_limit_is_exact() {
    let cfg = LambConfig {
        lr: 1.0,
        ..LambConfig::paper().adamw()
    };
    for format in [
        ParamFormat::F16,
        ParamFormat::Bf16,
        ParamFormat::Bf16Stochastic,
    ] {
        let limit = format.finite_limit().unwrap();
        for (edge, over) in [(limit, limit.next_up()), (-limit, (-limit).next_down())] {
            // p − 1·u with p at 0 and u = −edge: the new value is exactly `edge`.
            let at = |x: f32| LayerNorms {
                param_sq: 0.0,
                update_sq: x as f64 * x as f64,
                update_min: (-x).min(0.0),
                update_max: (-x).max(0.0),
                param_format: format,
                ..LayerNorms::default()
            };
            assert!(
                !LayerReport::plan(&cfg, at(edge)).skipped,
                "{format:?} {edge}"
            );
            assert!(
                LayerReport::plan(&cfg, at(over)).skipped,
                "{format:?} {over}"
            );
        }
        // A new value of 3.4e38 fits f32, not the half formats.
        let f32_norms = LayerNorms {
            param_sq: 0.0,
            update_sq: 3.4e38f32 as f64 * 3.4e38f32 as f64,
            update_min: -3.4e38,
            ..LayerNorms::default()
        };
        assert!(!LayerReport::plan(&cfg, f32_norms).skipped);
        assert!(
            LayerReport::plan(
                &cfg,
                LayerNorms {
                    param_format: format,
                    ..f32_norms
                }
            )
            .skipped
        );
    }
}

/// Uniform in [−1, 1).
fn unit(rng: &mut SmallRng) -> f32 {
    rng.random_range(-1.0..1.0)
}

/// Sound and identical everywhere: over random layers near the top of each format's range
/// and random learning rates, every backend makes the same decision as scalar, and a step
/// that is applied never leaves a non-finite value in the stored copy.
#[test]
fn no_applied_step_stores_infinity() {
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let (mut applied, mut refused) = (0, 0);
    for round in 0..400 {
        let (p, top) = match round % 4 {
            0 => (P::MasterF16, 65504.0f32),
            1 => (P::MasterBf16, bf16::MAX.to_f32()),
            2 => (P::Bf16, bf16::MAX.to_f32()),
            _ => (P::Bf16Sr(round), bf16::MAX.to_f32()),
        };
        let n = rng.random_range(1..=40);
        let params: Vec<f32> = (0..n)
            .map(|_| bf16::from_f32(top * unit(&mut rng)).to_f32())
            .collect();
        let grads: Vec<f32> = (0..n).map(|_| unit(&mut rng)).collect();
        let cfg = LambConfig {
            lr: top as f64 * 10f64.powf(-4.0 * unit(&mut rng).abs() as f64) * 0.01,
            weight_decay: if round % 3 == 0 { 0.0 } else { 0.01 },
            ..LambConfig::paper().adamw()
        };
        let owned = Owned::new(&params, &grads);
        let mut reference = owned.clone();
        let want = Backend::Scalar
            .step_layer_compact(&cfg, 1, 1.0, &mut reference.layer(p))
            .unwrap();
        if want.skipped {
            refused += 1;
            assert!(reference == owned);
        } else {
            applied += 1;
            assert!(reference.model_finite(p), "{p:?} {cfg:?}: stored infinity");
        }
        for b in Backend::available() {
            let mut o = owned.clone();
            let r = b.step_layer_compact(&cfg, 1, 1.0, &mut o.layer(p)).unwrap();
            assert_eq!(r, want, "{b} {p:?}");
            assert!(o == reference, "{b} {p:?}");
        }
    }
    println!("{applied} applied, {refused} refused");
    assert!(
        applied > 50 && refused > 50,
        "{applied} applied, {refused} refused"
    );
}

/// Phase 1's ranges are exact and order-independent: every backend's block results and
/// their sum equal scalar's bit for bit, on lengths that end in every kind of partial row.
#[test]
fn ranges_are_bit_exact_on_every_backend() {
    let mut rng = SmallRng::seed_from_u64(77);
    let s = StepScalars::new(&LambConfig::paper(), 3, 1.0).unwrap();
    for n in [1usize, 5, 16, 17, 31, 255, 256, 1023, 1024, 1025, 3000] {
        let params: Vec<f32> = (0..n).map(|_| unit(&mut rng) * 100.0).collect();
        let grads: Vec<f32> = (0..n).map(|_| unit(&mut rng)).collect();
        let mut owned = Owned::new(&params, &grads);
        owned.m.iter_mut().for_each(|x| *x = unit(&mut rng) * 0.1);
        owned
            .v
            .iter_mut()
            .for_each(|x| *x = unit(&mut rng).abs() * 0.1);
        for p in [P::MasterF16, P::Bf16Sr(5)] {
            let mut blocks_ref = vec![LayerNorms::default(); n.div_ceil(1024)];
            let layer = owned.layer(p);
            Backend::Scalar
                .norms_blocks_compact(&s, &layer, &mut blocks_ref)
                .unwrap();
            let whole = Backend::Scalar.norms_compact(&s, &layer).unwrap();
            if n >= 16 {
                assert!(whole.param_max > 0.0 && whole.update_min < 0.0);
            }
            assert_eq!(whole.param_format, p_format(p));
            for b in Backend::available() {
                let mut blocks = vec![LayerNorms::default(); n.div_ceil(1024)];
                b.norms_blocks_compact(&s, &layer, &mut blocks).unwrap();
                assert_eq!(blocks, blocks_ref, "{b} {p:?} n={n}");
                assert_eq!(b.norms_compact(&s, &layer).unwrap(), whole, "{b} n={n}");
            }
        }
    }
}

fn p_format(p: P) -> ParamFormat {
    match p {
        P::MasterF16 => ParamFormat::F16,
        P::MasterBf16 | P::Bf16 => ParamFormat::Bf16,
        P::Bf16Sr(_) => ParamFormat::Bf16Stochastic,
    }
}

/// The plan's range check on its own, both edges: the largest new value is
/// `max p − s·min u` and the smallest `min p − s·max u` (s ≥ 0). Each edge is tested just
/// inside and just outside f16's range, with the other edge far inside, so that each term
/// of each bound is needed (a bound that added instead of multiplied, or dropped a sign,
/// decides one of these cases wrongly).
#[test]
fn the_plan_checks_each_edge_of_the_range() {
    // No trust ratio: the step size is the learning rate.
    let cfg = |lr: f64| LambConfig {
        lr,
        ..LambConfig::paper().adamw()
    };
    let norms = |p: (f32, f32), u: (f32, f32)| LayerNorms {
        param_sq: 1.0,
        update_sq: 1.0,
        param_min: p.0,
        param_max: p.1,
        update_min: u.0,
        update_max: u.1,
        param_format: ParamFormat::F16,
    };
    // Top edge: max p = 65000, min u = −2, so the largest new value is 65000 + 2·lr.
    let top = norms((0.0, 65000.0), (-2.0, 0.0));
    assert!(!LayerReport::plan(&cfg(200.0), top).skipped); // 65400 stays below 65520
    assert!(LayerReport::plan(&cfg(300.0), top).skipped); // 65600 rounds to inf
    // Bottom edge: min p = −65000, max u = 2: the smallest is −65000 − 2·lr.
    let bottom = norms((-65000.0, 0.0), (0.0, 2.0));
    assert!(!LayerReport::plan(&cfg(200.0), bottom).skipped);
    assert!(LayerReport::plan(&cfg(300.0), bottom).skipped);
    // An update that pulls the weights back in keeps them in range at any rate.
    let inward = norms((0.0, 65000.0), (0.0, 2.0));
    assert!(!LayerReport::plan(&cfg(300.0), inward).skipped);
    // The same ranges in f32 storage are far from its limit.
    for n in [top, bottom] {
        let f32_layer = LayerNorms {
            param_format: ParamFormat::F32,
            ..n
        };
        assert!(!LayerReport::plan(&cfg(300.0), f32_layer).skipped);
    }
}
