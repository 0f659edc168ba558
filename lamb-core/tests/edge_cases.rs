//! Edge cases and bad input of the single-layer step: every refusal leaves every buffer as it was.

use lamb_core::layer::F32Layer;
use lamb_core::{
    Backend, Buffer, Field, LambConfig, LambError, LayerNorms, LayerReport, NonFinite, StepScalars,
    step_layer,
};

/// A layer's four buffers, cloneable so a test can compare before and after.
#[derive(Clone, Debug, PartialEq)]
struct Layer {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Layer {
    fn new(n: usize) -> Layer {
        let f = |k: usize, i: usize| ((i * 7 + k * 13) % 17) as f32 / 8.0 - 1.0;
        Layer {
            p: (0..n).map(|i| f(1, i)).collect(),
            g: (0..n).map(|i| f(2, i) * 0.1).collect(),
            m: (0..n).map(|i| f(3, i) * 0.01).collect(),
            v: (0..n).map(|i| f(4, i).abs() * 0.001).collect(),
        }
    }

    fn step(&mut self, cfg: &LambConfig, t: u64) -> Result<lamb_core::LayerReport, LambError> {
        step_layer(cfg, t, &mut self.p, &self.g, &mut self.m, &mut self.v)
    }

    /// Bit patterns, so that NaN == NaN and -0 != +0.
    fn bits(&self) -> Vec<u32> {
        [&self.p, &self.g, &self.m, &self.v]
            .iter()
            .flat_map(|b| b.iter().map(|x| x.to_bits()))
            .collect()
    }
}

#[test]
fn zero_norm_param_gets_ratio_one_except_in_seed() {
    for (name, cfg) in [
        ("paper", LambConfig::paper()),
        ("optax", LambConfig::optax()),
        ("timm", LambConfig::timm()),
        ("nvlamb", LambConfig::nvlamb()),
    ] {
        let mut l = Layer::new(64);
        l.p.fill(0.0);
        l.m.fill(0.0);
        l.v.fill(0.0);
        let r = l.step(&cfg, 1).unwrap();
        assert_eq!(r.param_norm, 0.0, "{name}");
        assert_eq!(r.trust_ratio, 1.0, "{name}");
        assert!(
            l.p.iter().any(|&x| x != 0.0),
            "{name}: a zero tensor must move"
        );
        // With ratio 1 the step is exactly lr * u.
        assert_eq!(r.step_size, cfg.lr as f32, "{name}");
    }
    let mut l = Layer::new(64);
    l.p.fill(0.0);
    let r = l.step(&LambConfig::seed(), 1).unwrap();
    assert_eq!(r.trust_ratio, 0.0);
    assert!(
        l.p.iter().all(|&x| x == 0.0),
        "seed(): a zero tensor never moves"
    );
}

#[test]
fn zero_gradient_with_zero_state_leaves_params_without_decay() {
    let mut l = Layer::new(100);
    l.g.fill(0.0);
    l.m.fill(0.0);
    l.v.fill(0.0);
    let before = l.p.clone();
    let r = l.step(&LambConfig::optax(), 1).unwrap();
    assert_eq!(r.update_norm, 0.0);
    assert_eq!(r.trust_ratio, 1.0);
    assert_eq!(l.p, before);

    // With weight decay the update is λp, and the trust ratio makes the step lr·‖p‖·p/‖λp‖.
    let cfg = LambConfig {
        lr: 0.1,
        ..LambConfig::paper()
    };
    let r = l.step(&cfg, 1).unwrap();
    assert!((r.trust_ratio - 100.0).abs() < 1e-3, "{}", r.trust_ratio);
    for (a, b) in l.p.iter().zip(&before) {
        assert!((a - b * 0.9).abs() <= 1e-6, "{a} vs {}", b * 0.9);
    }
}

#[test]
fn non_finite_gradient_skips_and_writes_nothing() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for all in [true, false] {
            let mut l = Layer::new(3000);
            if all {
                l.g.fill(bad);
            } else {
                l.g[2047] = bad;
            }
            let before = l.bits();
            let r = l.step(&LambConfig::paper(), 3).unwrap();
            assert!(r.skipped);
            assert_eq!(l.bits(), before, "bad={bad} all={all}");

            let cfg = LambConfig {
                non_finite: NonFinite::Error,
                ..LambConfig::paper()
            };
            let e = l.step(&cfg, 3).unwrap_err();
            assert_eq!(e, LambError::NonFinite {});
            assert!(e.to_string().contains("nothing was written"));
            assert_eq!(l.bits(), before);
        }
    }
}

#[test]
fn non_finite_state_or_param_is_caught_too() {
    for which in 0..4 {
        let mut l = Layer::new(50);
        match which {
            0 => l.m[10] = f32::NAN,
            1 => l.v[10] = f32::INFINITY,
            // Finite, but g² overflows f32: v would become inf and stall this element forever.
            2 => l.g[10] = 1e20,
            _ => l.p[10] = f32::NAN,
        }
        let before = l.bits();
        assert!(l.step(&LambConfig::paper(), 2).unwrap().skipped);
        assert_eq!(l.bits(), before);
    }
}

/// Norm sums are f32 lane partials (the kernels' module docs): a block whose ‖p‖² or
/// ‖u‖² overflows f32 refuses the step on every backend, under both policies, with
/// nothing written.
#[test]
fn norm_sums_beyond_f32_refuse_the_step_on_every_backend() {
    // ‖p‖ of one block ≈ 2e19·√1000 (p² alone overflows f32); ‖u‖ ≈ 1e19·√1000 from the
    // weight decay of 1e19-sized weights (u² overflows, p² does not).
    let big_p = (2e19f32, 0.01);
    let big_u = (1e19f32 / 3.0, 3.0);
    for (p, decay) in [big_p, big_u] {
        for b in Backend::available() {
            for policy in [NonFinite::Skip, NonFinite::Error] {
                let cfg = LambConfig {
                    weight_decay: decay,
                    non_finite: policy,
                    ..LambConfig::paper()
                };
                let mut l = Layer::new(1000);
                l.p.fill(p);
                let before = l.bits();
                let mut layer = F32Layer {
                    param: &mut l.p,
                    grad: &l.g,
                    m: &mut l.m,
                    v: &mut l.v,
                };
                let r = b.step_layer(&cfg, 2, 1.0, &mut layer);
                match policy {
                    NonFinite::Skip => assert!(r.unwrap().skipped, "{b} p={p:e}: applied"),
                    _ => assert_eq!(r, Err(LambError::NonFinite {}), "{b} p={p:e}"),
                }
                assert_eq!(l.bits(), before, "{b} p={p:e}: a refused step wrote");
            }
        }
    }
    let e = LambError::NonFinite {}.to_string();
    assert!(e.contains("f32") && e.contains("norm"), "{e}");
}

/// Blocks are added in f64: a layer whose ‖p‖² is beyond f32 steps as long as every
/// block's sum is within it, with the same bits on every backend.
#[test]
fn layer_norms_beyond_f32_add_up_in_f64() {
    // Each block: 1024 · (4e17)² ≈ 1.6e38 < f32::MAX; three blocks ≈ 4.9e38 > f32::MAX.
    let cfg = LambConfig::paper();
    let mut first: Option<(LayerReport, Vec<u32>)> = None;
    for b in Backend::available() {
        let mut l = Layer::new(3 * 1024);
        l.p.fill(4e17);
        let mut layer = F32Layer {
            param: &mut l.p,
            grad: &l.g,
            m: &mut l.m,
            v: &mut l.v,
        };
        let r = b.step_layer(&cfg, 2, 1.0, &mut layer).unwrap();
        assert!(!r.skipped, "{b}");
        assert!((r.param_norm / (4e17 * (3.0f32 * 1024.0).sqrt()) - 1.0).abs() < 1e-5);
        match &first {
            None => first = Some((r, l.bits())),
            Some((r0, bits)) => {
                assert_eq!(&r, r0, "{b}");
                assert!(&l.bits() == bits, "{b}: other bits");
            }
        }
    }
}

#[test]
fn empty_layer_is_a_no_op() {
    let mut l = Layer::new(0);
    let r = l.step(&LambConfig::paper(), 1).unwrap();
    assert_eq!(
        (r.param_norm, r.update_norm, r.trust_ratio, r.skipped),
        (0.0, 0.0, 1.0, false)
    );
}

#[test]
fn huge_constant_layer_moves_like_a_single_element() {
    // For a constant tensor ‖p‖/‖u‖ does not depend on the length, so every element of a
    // 5M-element layer must take the step a 1-element layer takes, to one ulp. The trust
    // ratios agree within the error bound of the norms: each block sum adds 64 squares per
    // f32 lane and folds 16 lanes (≤ 68 roundings of 2^-24, relative), the blocks add in
    // f64, and a norm halves that error; the ratio of two norms, rounded to f32, is within
    // 2·35 + 1 roundings of 2^-24 < 36·f32::EPSILON.
    let n = 5 * (1 << 20) + 3;
    let cfg = LambConfig {
        lr: 0.01,
        ..LambConfig::paper()
    };
    let mut big = Layer {
        p: vec![0.75; n],
        g: vec![-0.125; n],
        m: vec![0.0; n],
        v: vec![0.0; n],
    };
    let mut one = Layer {
        p: vec![0.75],
        g: vec![-0.125],
        m: vec![0.0],
        v: vec![0.0],
    };
    let rb = big.step(&cfg, 1).unwrap();
    let r1 = one.step(&cfg, 1).unwrap();
    assert!((rb.trust_ratio - r1.trust_ratio).abs() <= 36.0 * f32::EPSILON * r1.trust_ratio);
    let expect = one.p[0];
    assert!(
        big.p
            .iter()
            .all(|&x| (x.to_bits() as i64 - expect.to_bits() as i64).abs() <= 1)
    );
    assert!(big.m.iter().all(|&x| x == one.m[0]));
    assert!(big.v.iter().all(|&x| x == one.v[0]));
    assert!((rb.param_norm / (n as f32).sqrt() - 0.75).abs() < 1e-6);
}

#[test]
fn length_mismatches_are_refused_untouched() {
    for (buffer, n_g, n_m, n_v) in [
        (Buffer::Grad, 9, 10, 10),
        (Buffer::ExpAvg, 10, 11, 10),
        (Buffer::ExpAvgSq, 10, 10, 0),
        (Buffer::Grad, 0, 10, 10),
    ] {
        let mut l = Layer::new(10);
        l.g.truncate(n_g);
        l.m.resize(n_m, 0.5);
        l.v.truncate(n_v);
        let before = l.clone();
        let e = l.step(&LambConfig::paper(), 1).unwrap_err();
        let found = [n_g, n_m, n_v][buffer as usize - 1];
        assert_eq!(
            e,
            LambError::LengthMismatch {
                buffer,
                expected: 10,
                found
            }
        );
        assert_eq!(
            e.to_string(),
            format!("{} has {found} elements, param has 10", buffer.name())
        );
        assert_eq!(l, before);
    }
    // An empty param with non-empty state is a mismatch too.
    let mut l = Layer::new(4);
    let e = step_layer(&LambConfig::paper(), 1, &mut [], &l.g, &mut l.m, &mut l.v).unwrap_err();
    assert!(matches!(
        e,
        LambError::LengthMismatch {
            expected: 0,
            found: 4,
            ..
        }
    ));
}

#[test]
fn step_zero_is_refused_untouched() {
    let mut l = Layer::new(10);
    let before = l.clone();
    assert_eq!(l.step(&LambConfig::paper(), 0), Err(LambError::StepZero));
    assert_eq!(l, before);
}

/// The paper preset with the hyperparameter `field` set to `value`.
fn paper_with(field: Field, value: f64) -> LambConfig {
    let mut c = LambConfig::paper();
    *match field {
        Field::Lr => &mut c.lr,
        Field::Beta1 => &mut c.beta1,
        Field::Beta2 => &mut c.beta2,
        Field::Eps => &mut c.eps,
        Field::WeightDecay => &mut c.weight_decay,
        Field::ParamNormMin => &mut c.param_norm_min,
        Field::ParamNormMax => &mut c.param_norm_max,
        Field::RatioMin => &mut c.ratio_min,
        Field::RatioMax => &mut c.ratio_max,
        Field::GradScale => unreachable!("grad_scale is not a LambConfig field"),
    } = value;
    c
}

#[test]
fn every_invalid_hyperparameter_is_refused_untouched() {
    let cases = [
        (Field::Lr, -1e-3, "-0.001"),
        (Field::Lr, f64::NAN, "NaN"),
        (Field::Lr, f64::INFINITY, "inf"),
        (Field::Lr, 1e300, "1e300"),
        (Field::Beta1, 1.0, "= 1.0:"),
        (Field::Beta1, -0.1, "-0.1"),
        (Field::Beta1, f64::NAN, "NaN"),
        (Field::Beta2, 1.5, "1.5"),
        (Field::Beta2, f64::NAN, "NaN"),
        (Field::Eps, 0.0, "= 0.0:"),
        (Field::Eps, -1e-8, "-1e-8"),
        (Field::Eps, f64::NAN, "NaN"),
        (Field::Eps, 1e-50, "1e-50"),
        (Field::WeightDecay, f64::NAN, "NaN"),
        (Field::WeightDecay, -0.01, "-0.01"),
        (Field::ParamNormMin, f64::NAN, "NaN"),
        (Field::ParamNormMax, f64::NAN, "NaN"),
        (Field::RatioMin, -1.0, "-1.0"),
        (Field::RatioMax, f64::NAN, "NaN"),
    ];
    for (field, value, shown) in cases {
        let cfg = paper_with(field, value);
        let mut l = Layer::new(33);
        let before = l.clone();
        let e = l.step(&cfg, 1).unwrap_err();
        match e {
            LambError::InvalidHyperparameter { field: f, .. } => assert_eq!(f, field, "{e}"),
            other => panic!("{field:?}: expected InvalidHyperparameter, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(field.name()) && msg.contains(shown), "{msg}");
        assert_eq!(l, before, "{msg}");
    }
}

#[test]
fn inverted_bounds_are_refused_untouched() {
    for (cfg, text) in [
        (
            LambConfig {
                param_norm_min: 2.0,
                param_norm_max: 1.0,
                ..LambConfig::paper()
            },
            "param_norm_min = 2.0 is greater than param_norm_max = 1.0",
        ),
        (
            LambConfig {
                ratio_min: 10.0,
                ratio_max: 0.5,
                ..LambConfig::paper()
            },
            "ratio_min = 10.0 is greater than ratio_max = 0.5",
        ),
    ] {
        let mut l = Layer::new(5);
        let before = l.clone();
        let e = l.step(&cfg, 1).unwrap_err();
        assert!(matches!(e, LambError::InvalidBounds { .. }));
        assert!(e.to_string().contains(text), "{e}");
        assert_eq!(l, before);
    }
}

/// Equal bounds are a valid configuration: a fixed trust ratio (`ratio_min == ratio_max`)
/// or a fixed φ(‖p‖). Only a lower bound above the upper one is refused.
#[test]
fn equal_bounds_are_accepted() {
    let fixed_ratio = LambConfig {
        ratio_min: 0.5,
        ratio_max: 0.5,
        ..LambConfig::paper()
    };
    let fixed_phi = LambConfig {
        param_norm_min: 2.0,
        param_norm_max: 2.0,
        ..LambConfig::paper()
    };
    for cfg in [fixed_ratio, fixed_phi] {
        let mut l = Layer::new(5);
        let report = l.step(&cfg, 1).unwrap();
        assert!(!report.skipped);
    }
    let mut l = Layer::new(5);
    assert_eq!(l.step(&fixed_ratio, 1).unwrap().trust_ratio, 0.5);
}

#[test]
fn bad_grad_scale_is_refused_untouched() {
    for scale in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        let mut l = Layer::new(5);
        let before = l.clone();
        let e = Backend::Scalar
            .step_layer(
                &LambConfig::paper(),
                1,
                scale,
                &mut F32Layer {
                    param: &mut l.p,
                    grad: &l.g,
                    m: &mut l.m,
                    v: &mut l.v,
                },
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                LambError::InvalidHyperparameter {
                    field: Field::GradScale,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(l, before);
        assert!(StepScalars::new(&LambConfig::paper(), 1, scale).is_err());
    }
}

#[test]
fn trust_ratio_clamps_apply() {
    let mut a = Layer::new(64);
    let mut b = a.clone();
    let free = a.step(&LambConfig::paper(), 1).unwrap();
    assert!(free.trust_ratio > 1.0, "test premise: {}", free.trust_ratio);
    let clipped = LambConfig {
        ratio_max: 1.0,
        ..LambConfig::paper()
    };
    assert_eq!(b.step(&clipped, 1).unwrap().trust_ratio, 1.0);
    let phi = LambConfig {
        param_norm_max: 1.0,
        ..LambConfig::paper()
    };
    let r = Layer::new(64).step(&phi, 1).unwrap();
    assert!((r.trust_ratio - 1.0 / r.update_norm).abs() <= 1e-6 * r.trust_ratio);
}

#[test]
fn adaptation_policies() {
    // timm: no trust ratio on a layer without weight decay.
    let cfg = LambConfig {
        weight_decay: 0.0,
        ..LambConfig::timm()
    };
    assert_eq!(Layer::new(64).step(&cfg, 1).unwrap().trust_ratio, 1.0);
    assert_ne!(
        Layer::new(64)
            .step(&LambConfig::timm(), 1)
            .unwrap()
            .trust_ratio,
        1.0
    );
    assert_eq!(
        Layer::new(64)
            .step(&LambConfig::paper().adamw(), 1)
            .unwrap()
            .trust_ratio,
        1.0
    );
}

/// The f32 overflow check keeps a margin of 2^-16 below `f32::MAX` for the roundings of
/// `p − s·u`: a layer whose bound ‖p‖ + s·‖u‖ lies inside that margin is refused, one just
/// below it steps.
#[test]
fn the_f32_overflow_bound_keeps_its_margin() {
    let cfg = LambConfig {
        lr: 0.0,
        ..LambConfig::paper().adamw()
    };
    let plan = |pn: f64| {
        LayerReport::plan(
            &cfg,
            LayerNorms {
                param_sq: pn * pn,
                update_sq: 1.0,
                ..LayerNorms::default()
            },
        )
    };
    let max = f32::MAX as f64;
    assert!(plan(max * (1.0 - 1.0 / 131072.0)).skipped);
    assert!(!plan(max * (1.0 - 1.0 / 32768.0)).skipped);
}
