//! lamb-core against reference vectors of real LAMB implementations
//! (`tests/data/reference/`, made by `scripts/reference/generate.sh`).
//!
//! Each case starts from the implementation's preset with the case's hyperparameters,
//! runs the recorded number of steps on the scalar backend with the regenerated inputs,
//! and compares every tensor's final params, moments and total change, and the params
//! after each step for short tensors. Run with `--nocapture` to see the measured errors.

#[path = "common/reference_data.rs"]
mod reference_data;

use lamb_core::layer::F32Layer;
use lamb_core::{Adaptation, Backend, BiasCorrection, LambConfig, StepScalars};
use reference_data::{Case, Reference, flag, load, num};
use serde_json::Value;

/// The acceptance bar: relative L2 error of each tensor's params after the last step (and
/// after every step where recorded).
const PARAM_TOL: f64 = 2e-6;
/// Relative L2 error of the first and second moments.
const MOMENT_TOL: f64 = 1e-5;
/// Relative L2 error of the change `p_final − p_init`, in units of its f32 rounding floor
/// (see [`delta_floor`]). Rounding alone can reach 5 floors (half an ulp per step and side,
/// 5 steps, 2 sides, all of one sign); measured with the committed data: at most 0.84
/// floors for optax, 1.35 for timm, 1.17 for nvlamb, 1.00 for seed. A formula mistake
/// shows as tens of floors (optax with exact bias correction: 80 on zero-init tensors).
const DELTA_FLOOR_FACTOR: f64 = 8.0;

/// The errors of one tensor of one case.
#[derive(Debug, Default, Clone, Copy)]
struct Errors {
    param: f64,
    exp_avg: f64,
    exp_avg_sq: f64,
    delta: f64,
    /// The f32 rounding floor of `delta` for this tensor, see [`delta_floor`].
    delta_floor: f64,
    /// Max over the recorded intermediate steps (`None` when none are recorded).
    per_step: Option<f64>,
}

/// `‖a − e‖ / ‖e‖` in f64; `‖a‖` (an absolute error) where `e` is all zeros.
fn rel_l2(actual: impl Iterator<Item = f64>, expected: impl Iterator<Item = f64>) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (a, e) in actual.zip(expected) {
        diff += (a - e) * (a - e);
        norm += e * e;
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

fn rel_l2_f32(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    rel_l2(
        actual.iter().map(|&x| x as f64),
        expected.iter().map(|&x| x as f64),
    )
}

/// The spacing of f32 values around `x`.
fn ulp(x: f32) -> f64 {
    let a = x.abs();
    if a == 0.0 {
        f32::from_bits(1) as f64
    } else {
        (f32::from_bits(a.to_bits() + 1) - a) as f64
    }
}

/// The rounding floor of the relative change error: `‖ulp(p_final)‖ / ‖p_final − p_init‖`.
/// Both the implementation and lamb-core round p to f32 at every step, an error of up to
/// half an ulp of p per step and side that does not shrink with the change: with lr = 1e-3
/// a step moves p by ~0.1 % of |p|, so half an ulp of p (3e-8 |p|) is already ~3e-5 of
/// one step's move. `INFINITY` where the expected change is zero.
fn delta_floor(init: &[f32], expected_final: &[f32]) -> f64 {
    let ulps = expected_final.iter().map(|&x| ulp(x) * ulp(x)).sum::<f64>();
    let change = init
        .iter()
        .zip(expected_final)
        .map(|(&a, &b)| (b as f64 - a as f64).powi(2))
        .sum::<f64>();
    (ulps / change).sqrt()
}

/// Runs one case through lamb-core and measures every tensor against the reference.
fn run_case(cfg: &LambConfig, case: &Case, steps: u64) -> Vec<Errors> {
    let n = case.tensors.len();
    let init: Vec<Vec<f32>> = case
        .tensors
        .iter()
        .map(|t| t.init.materialize(t.len))
        .collect();
    let mut p = init.clone();
    let mut m: Vec<Vec<f32>> = case.tensors.iter().map(|t| vec![0.0; t.len]).collect();
    let mut v = m.clone();
    let mut per_step: Vec<Option<f64>> = vec![None; n];
    for step in 1..=steps {
        let grads: Vec<Vec<f32>> = case
            .tensors
            .iter()
            .map(|t| t.grads[step as usize - 1].materialize(t.len))
            .collect();
        // Global clipping over every tensor of the case, from this step's raw grads.
        let grad_scale = match case.max_grad_norm {
            None => 1.0,
            Some(max_norm) => {
                let sq: f64 = grads
                    .iter()
                    .map(|g| Backend::Scalar.sum_squares(g).unwrap())
                    .sum();
                (1.0 / (sq.sqrt() / max_norm).max(1.0)) as f32
            }
        };
        for k in 0..n {
            let report = Backend::Scalar
                .step_layer(
                    cfg,
                    step,
                    grad_scale,
                    &mut F32Layer {
                        param: &mut p[k],
                        grad: &grads[k],
                        m: &mut m[k],
                        v: &mut v[k],
                    },
                )
                .unwrap_or_else(|e| panic!("case {}: {e}", case.name));
            assert!(!report.skipped, "case {}: step {step} skipped", case.name);
            let t = &case.tensors[k];
            if let Some(expected) = t.param_after_step.get(step as usize - 1) {
                let e = rel_l2_f32(&p[k], expected);
                per_step[k] = Some(per_step[k].map_or(e, |x| x.max(e)));
            }
        }
    }
    (0..n)
        .map(|k| {
            let t = &case.tensors[k];
            let delta = rel_l2(
                p[k].iter()
                    .zip(&init[k])
                    .map(|(&a, &b)| a as f64 - b as f64),
                t.param
                    .iter()
                    .zip(&init[k])
                    .map(|(&a, &b)| a as f64 - b as f64),
            );
            Errors {
                param: rel_l2_f32(&p[k], &t.param),
                exp_avg: rel_l2_f32(&m[k], &t.exp_avg),
                exp_avg_sq: rel_l2_f32(&v[k], &t.exp_avg_sq),
                delta,
                delta_floor: delta_floor(&init[k], &t.param),
                per_step: per_step[k],
            }
        })
        .collect()
}

/// The largest errors over a set of tensors.
#[derive(Debug, Default)]
struct Max {
    param: f64,
    per_step: f64,
    exp_avg: f64,
    exp_avg_sq: f64,
    delta: f64,
    delta_in_floors: f64,
}

/// Runs every case of `reference` with the config `config_of` builds, prints the largest
/// errors (and a table of all of them if `table`) and adds each violated tolerance to
/// `failures`.
fn check_reference(
    reference: &Reference,
    config_of: impl Fn(&Case) -> LambConfig,
    failures: &mut Vec<String>,
    table: bool,
) {
    println!(
        "\n== {} {}, {} steps. Relative L2 errors; tolerances: params {PARAM_TOL:.0e} \
         (per-step: after steps 1..{}, short tensors), moments {MOMENT_TOL:.0e}, change \
         {DELTA_FLOOR_FACTOR} f32 floors",
        reference.implementation,
        reference.versions,
        reference.steps,
        reference.steps - 1
    );
    let header = format!(
        "{:<22} {:<13} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>8}",
        "case", "tensor", "param", "per-step", "exp_avg", "exp_avg_sq", "change", "floor", "floors"
    );
    if table {
        println!("{header}");
    }
    let mut max = Max::default();
    for case in &reference.cases {
        let cfg = config_of(case);
        let errors = run_case(&cfg, case, reference.steps);
        for (t, e) in case.tensors.iter().zip(&errors) {
            let per_step = e.per_step.map_or("-".into(), |x| format!("{x:.2e}"));
            let in_floors = e.delta / e.delta_floor;
            let row = format!(
                "{:<22} {:<13} {:>9.2e} {:>9} {:>9.2e} {:>10.2e} {:>9.2e} {:>9.2e} {:>8.3}",
                case.name,
                t.name,
                e.param,
                per_step,
                e.exp_avg,
                e.exp_avg_sq,
                e.delta,
                e.delta_floor,
                in_floors
            );
            if table {
                println!("{row}");
            }
            let who = format!("{} / {} / {}", reference.implementation, case.name, t.name);
            check_errors(&who, e, failures);
            max.add(e);
        }
    }
    println!(
        "{:<22} {:<13} {:>9.2e} {:>9.2e} {:>9.2e} {:>10.2e} {:>9.2e} {:>9} {:>8.3}",
        "MAX",
        "",
        max.param,
        max.per_step,
        max.exp_avg,
        max.exp_avg_sq,
        max.delta,
        "",
        max.delta_in_floors
    );
}

/// Adds each tolerance that `e`, the errors of tensor `who`, violates to `failures`.
fn check_errors(who: &str, e: &Errors, failures: &mut Vec<String>) {
    let mut fail = |what: &str, value: f64, tol: f64| {
        if value.is_nan() || value > tol {
            failures.push(format!("{who}: {what} error {value:.3e} > {tol:.3e}"));
        }
    };
    fail("params", e.param, PARAM_TOL);
    fail("per-step params", e.per_step.unwrap_or(0.0), PARAM_TOL);
    fail("exp_avg", e.exp_avg, MOMENT_TOL);
    fail("exp_avg_sq", e.exp_avg_sq, MOMENT_TOL);
    // Where the reference does not move the tensor at all, neither may lamb-core
    // (`delta` is then the absolute change, and the floor infinite).
    let delta_tol = if e.delta_floor.is_finite() {
        DELTA_FLOOR_FACTOR * e.delta_floor
    } else {
        0.0
    };
    fail("change", e.delta, delta_tol);
}

impl Max {
    /// Takes the errors of one more tensor into the maxima.
    fn add(&mut self, e: &Errors) {
        self.param = self.param.max(e.param);
        self.per_step = self.per_step.max(e.per_step.unwrap_or(0.0));
        self.exp_avg = self.exp_avg.max(e.exp_avg);
        self.exp_avg_sq = self.exp_avg_sq.max(e.exp_avg_sq);
        self.delta = self.delta.max(e.delta);
        if e.delta_floor.is_finite() {
            self.delta_in_floors = self.delta_in_floors.max(e.delta / e.delta_floor);
        }
    }
}

fn assert_no_failures(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} check(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn hp(case: &Case) -> &Value {
    &case.hyperparameters
}

/// `optax.lamb(learning_rate, b1, b2, eps, eps_root, weight_decay)`.
fn optax_config(case: &Case) -> LambConfig {
    let h = hp(case);
    assert_eq!(
        num(h, "eps_root"),
        0.0,
        "eps_root has no lamb-core equivalent here"
    );
    LambConfig {
        lr: num(h, "learning_rate"),
        beta1: num(h, "b1"),
        beta2: num(h, "b2"),
        eps: num(h, "eps"),
        weight_decay: num(h, "weight_decay"),
        ..LambConfig::optax()
    }
}

/// `timm.optim.Lamb(lr, bias_correction, betas, eps, weight_decay, grad_averaging,
/// max_grad_norm, trust_clip, always_adapt, ...)`; `max_grad_norm` is the case's global
/// clipping.
fn timm_config(case: &Case) -> LambConfig {
    let h = hp(case);
    for off in ["caution", "decoupled_decay", "corrected_weight_decay"] {
        assert!(!flag(h, off), "timm `{off}` has no lamb-core equivalent");
    }
    LambConfig {
        lr: num(h, "lr"),
        beta1: h["betas"][0].as_f64().unwrap(),
        beta2: h["betas"][1].as_f64().unwrap(),
        eps: num(h, "eps"),
        weight_decay: num(h, "weight_decay"),
        bias_correction: if flag(h, "bias_correction") {
            BiasCorrection::F64
        } else {
            BiasCorrection::Off
        },
        grad_averaging: flag(h, "grad_averaging"),
        adaptation: if flag(h, "always_adapt") {
            Adaptation::Always
        } else {
            Adaptation::WhenDecayed
        },
        ratio_max: if flag(h, "trust_clip") {
            1.0
        } else {
            f64::INFINITY
        },
        ..LambConfig::timm()
    }
}

/// apex `FusedLAMB(..., use_nvlamb=True)` with the scalars as its CUDA kernel receives
/// them: `lr`, `beta1`, `beta2`, `eps` and `weight_decay` are C++ floats there, so they
/// are taken rounded to f32 (`kernel_arguments`). With the f32 betas, lamb-core's
/// `1 − β2` and `1 − β^t` (computed in f64, rounded once) are exactly apex's.
fn nvlamb_config(case: &Case) -> LambConfig {
    let h = hp(case);
    assert!(flag(h, "use_nvlamb") && flag(h, "adam_w_mode"));
    let k = &case.raw["kernel_arguments"][0];
    LambConfig {
        lr: num(k, "lr"),
        beta1: num(k, "beta1"),
        beta2: num(k, "beta2"),
        eps: num(k, "eps"),
        weight_decay: num(k, "decay"),
        bias_correction: if flag(h, "bias_correction") {
            BiasCorrection::F64
        } else {
            BiasCorrection::Off
        },
        grad_averaging: flag(h, "grad_averaging"),
        ..LambConfig::nvlamb()
    }
}

/// [`LambConfig::seed`]'s formula (`lr`, `beta1`, `beta2`, `eps`).
fn seed_config(case: &Case) -> LambConfig {
    let h = hp(case);
    LambConfig {
        lr: num(h, "lr"),
        beta1: num(h, "beta1"),
        beta2: num(h, "beta2"),
        eps: num(h, "eps"),
        ..LambConfig::seed()
    }
}

#[test]
fn optax_preset_matches_optax_lamb() {
    let reference = load("optax");
    for case in &reference.cases {
        assert!(
            case.tensors
                .iter()
                .any(|t| t.init == reference_data::Recipe::Zeros),
            "every optax case must hold a zero-initialised tensor"
        );
    }
    let mut failures = Vec::new();
    check_reference(&reference, optax_config, &mut failures, true);
    assert_no_failures(failures);
}

/// `BiasCorrection::F32` against the bias corrections jax computes in optax's code path:
/// `1 − decay**count` in f32 from the int32 count, and optax's `tree_bias_correction` of a
/// moment of 1, i.e. `1 / (1 − decay**count)` as optax divides.
#[test]
fn optax_bias_correction_is_bit_exact() {
    let reference = load("optax");
    for case in &reference.cases {
        let cfg = optax_config(case);
        let bc = &case.raw["bias_corrections"];
        for (key, pick) in [("b1", 0), ("b2", 1)] {
            for row in bc[key].as_array().expect("bias_corrections") {
                let count = row["count"].as_u64().unwrap();
                let jax_bc = f32::from_bits(row["one_minus_pow_bits"].as_u64().unwrap() as u32);
                let jax_inv = f32::from_bits(row["inverse_bits"].as_u64().unwrap() as u32);
                let s = StepScalars::new(&cfg, count, 1.0).unwrap();
                let ours = if pick == 0 { s.inv_bias1 } else { s.inv_bias2 };
                assert_eq!(
                    ours.to_bits(),
                    jax_inv.to_bits(),
                    "case {} {key} count {count}: lamb-core 1/bc = {ours:e}, optax {jax_inv:e}",
                    case.name
                );
                assert_eq!(ours, 1.0 / jax_bc);
            }
        }
    }
}

/// The reference has teeth. optax updates v with `1 − b2` rounded to f32 (f32(0.001)) but
/// bias-corrects with `1 − f32(0.999)^t` in f32, so at t = 1 its v̂ is g²·(1 + 1.3e-5), not
/// g². With the exact bias correction (`F64`) lamb-core's v̂ would lose that factor, and
/// every zero-initialised tensor (trust ratio 1, so the absolute size of u shows) would
/// move ~6.5e-6 short: the checks must catch that.
#[test]
fn optax_reference_rejects_f64_bias_correction() {
    let reference = load("optax");
    let mut failures = Vec::new();
    println!("-- optax with BiasCorrection::F64 instead of F32 (must fail on zero-init tensors):");
    check_reference(
        &reference,
        |case| LambConfig {
            bias_correction: BiasCorrection::F64,
            ..optax_config(case)
        },
        &mut failures,
        false,
    );
    for f in &failures {
        println!("   (expected) {f}");
    }
    for case in &reference.cases {
        let needle = format!("optax / {} / zero_init256: params", case.name);
        assert!(
            failures.iter().any(|f| f.starts_with(&needle)),
            "case {}: F64 bias correction went unnoticed",
            case.name
        );
    }
}

#[test]
fn timm_preset_matches_timm_lamb() {
    let mut failures = Vec::new();
    check_reference(&load("timm"), timm_config, &mut failures, true);
    assert_no_failures(failures);
}

#[test]
fn nvlamb_preset_matches_apex_semantics() {
    let reference = load("nvlamb");
    let mut failures = Vec::new();
    check_reference(&reference, nvlamb_config, &mut failures, true);

    // For information: the preset with the Python-level hyperparameters (betas 0.9 and
    // 0.999 as f64) instead of apex's f32 kernel arguments. Not asserted.
    let mut python_level = Vec::new();
    println!("-- nvlamb with the Python-level hyperparameters (f64 betas), for information:");
    check_reference(
        &reference,
        |case| {
            let h = hp(case);
            LambConfig {
                lr: num(h, "lr"),
                beta1: h["betas"][0].as_f64().unwrap(),
                beta2: h["betas"][1].as_f64().unwrap(),
                eps: num(h, "eps"),
                weight_decay: num(h, "weight_decay"),
                ..nvlamb_config(case)
            }
        },
        &mut python_level,
        false,
    );
    let (v_only, other): (Vec<_>, Vec<_>) =
        python_level.iter().partition(|f| f.contains("exp_avg_sq"));
    println!(
        "   (not asserted) {} exp_avg_sq errors ~1.3e-5 (apex's 1 − β2 is 1 − f32(β2)), and:",
        v_only.len()
    );
    for f in other {
        println!("   (not asserted) {f}");
    }
    assert_no_failures(failures);
}

#[test]
fn seed_preset_matches_seed_formula() {
    let mut failures = Vec::new();
    check_reference(&load("seed"), seed_config, &mut failures, true);
    assert_no_failures(failures);
}

/// The generator here and in generate.py agree on a few known values (the checksums in
/// the manifests check every input).
#[test]
fn input_generator_known_values() {
    use reference_data::{Recipe, splitmix64};
    // SplitMix64 reference outputs for seed 0.
    let first: Vec<u64> = splitmix64(0, 3).collect();
    assert_eq!(
        first,
        [0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, 0x06c45d188009454f]
    );
    let x = Recipe::TinyHuge {
        seed: 7,
        scale_log2: -1,
        even_log2: -20,
        odd_log2: 20,
    }
    .materialize(4);
    assert!(x[0].abs() < 2f32.powi(-21) && x[1].abs() < 2f32.powi(19));
    assert!(x[1].abs() > 1.0);
}

/// The preset itself, not only the per-case configuration, carries apex's kernel
/// arguments: for every case run with apex's default betas, `LambConfig::nvlamb()`'s betas
/// are the f32 values the CUDA kernel received (f64 betas would change `1 − β2` and every
/// bias correction in the last bits).
#[test]
fn nvlamb_preset_betas_are_apex_kernel_arguments() {
    let preset = LambConfig::nvlamb();
    let reference = load("nvlamb");
    let mut checked = 0;
    for case in &reference.cases {
        let h = hp(case);
        if h["betas"][0].as_f64() != Some(0.9) || h["betas"][1].as_f64() != Some(0.999) {
            continue;
        }
        // The recorded arguments are C++ floats (the JSON decimal may parse an ulp of f64
        // away from them): the preset must hold exactly those f32 values.
        let k = &case.raw["kernel_arguments"][0];
        let kernel = |key| num(k, key) as f32 as f64;
        assert_eq!(preset.beta1, kernel("beta1"), "case {}: beta1", case.name);
        assert_eq!(preset.beta2, kernel("beta2"), "case {}: beta2", case.name);
        checked += 1;
    }
    assert!(checked > 0, "no nvlamb case uses apex's default betas");
}
