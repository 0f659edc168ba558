//! Regression tests from fuzzing (`fuzz/`): each reproduces a finding with its
//! minimal input. See fuzz/README.md for the targets and how to turn a crash artifact into
//! a test here.

use lamb_core::{BiasCorrection, LambConfig, step_layer};

/// Found while bounding `config_validate`'s "moderate" inputs, and by `checkpoint_decode`
/// (a model configured with `ratio_min = 3.4e38` saved a `-inf` master copy after one
/// step). `validate()` accepts any lr and ratio bounds that are finite in f32, and phase 1
/// checks that ‖p‖, ‖u‖ and the step size `lr·r` are finite, but not that `p − lr·r·u` is:
/// here `p = 1 − 3e38·2 = −inf`, and the step reports `applied` with the parameter
/// destroyed. Failure, never corruption (the all-or-nothing step of lamb-core's crate docs):
/// the step must either be refused (skipped / `NonFinite`) or leave finite values.
#[test]
fn an_applied_step_never_writes_a_non_finite_parameter() {
    let huge_lr = LambConfig {
        lr: 3e38,
        weight_decay: 1.0,
        ..LambConfig::paper().adamw()
    };
    let huge_ratio_min = LambConfig {
        lr: 1.0,
        ratio_min: 3.4e38,
        ..LambConfig::paper()
    };
    for (cfg, p0) in [(huge_lr, 1.0f32), (huge_ratio_min, 2.0)] {
        assert!(cfg.validate().is_ok());
        let (mut p, g, mut m, mut v) = ([p0], [1.0f32], [0.0f32], [0.0f32]);
        let before = (p, m, v);
        match step_layer(&cfg, 1, &mut p, &g, &mut m, &mut v) {
            Ok(r) if !r.skipped => assert!(
                p[0].is_finite() && m[0].is_finite() && v[0].is_finite(),
                "applied step wrote p = {p:?}, m = {m:?}, v = {v:?} (report {r:?}, config {cfg:?})"
            ),
            // Refused: nothing may have been written.
            _ => assert_eq!((p, m, v), before),
        }
    }
}

/// `validate()` accepts β1 = 0.99999999 (it is in [0, 1) as an f64), but with
/// `BiasCorrection::F32` the correction is `1 − f32(β1)^t = 1 − 1 = 0`, so `1/(1 − β1^t)` is
/// infinite and every step of every layer is skipped (update norm NaN), forever, with no
/// error. Either `validate()` should refuse such a β under F32 bias correction, or the step
/// should work. Same for β2.
#[test]
fn an_accepted_f32_bias_corrected_config_can_step() {
    for (b1, b2) in [(0.99999999, 0.999), (0.9, 1.0 - 2f64.powi(-25))] {
        let cfg = LambConfig {
            beta1: b1,
            beta2: b2,
            bias_correction: BiasCorrection::F32,
            ..LambConfig::paper()
        };
        if cfg.validate().is_err() {
            continue; // refusing the configuration is a fix
        }
        let (mut p, g, mut m, mut v) = ([1.0f32, 2.0], [0.1f32, 0.2], [0.0f32; 2], [0.0f32; 2]);
        let r = step_layer(&cfg, 1, &mut p, &g, &mut m, &mut v).unwrap();
        assert!(
            !r.skipped,
            "beta1 = {b1}, beta2 = {b2}: accepted by validate(), yet every step is skipped: {r:?}"
        );
    }
}
