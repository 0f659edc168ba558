//! `LambConfig::validate` accepts exactly the documented set, names the first bad field and
//! its value, and an accepted configuration never produces a non-finite parameter or moment
//! from moderate finite inputs in one step.
//!
//! The predicate is [`lamb_fuzz::expected_first_invalid`], written from the field docs of
//! `config.rs`, not from `validate()`:
//! - lr: finite, >= 0, and finite once rounded to f32;
//! - beta1, beta2: in [0, 1) (NaN is not);
//! - eps: finite, > 0, finite and > 0 once rounded to f32;
//! - weight_decay: finite, >= 0, finite once rounded to f32;
//! - param_norm_min / ratio_min: finite, >= 0; param_norm_max / ratio_max: not NaN (+inf is
//!   "no bound"); min <= max.
//!
//! "Moderate" (the step property), precisely:
//! - inputs: 1..=256 elements; every element of p, g, m and v finite with |x| <= 1e6
//!   (±0, subnormals and tiny values included; v may be negative, which must then be caught);
//! - any step in 1..=u64::MAX and any grad_scale that `StepScalars::new` accepts (finite, > 0);
//! - configuration: accepted by `validate()`, and additionally `lr <= 1`,
//!   `lr * ratio_min <= 1` and `param_norm_min <= 1e30`. These three keep `lr * r * u`
//!   representable: with them `|η·r·u_i| <= max(lr·φ(‖p‖), |u_i|) <= f32::MAX` for every
//!   element, since r is either `φ/‖u‖` (or less), 1 (zero norm / no adaptation), or
//!   `ratio_min`. Without them, an accepted configuration such as `lr = 3e38` with
//!   adaptation off makes an applied step write `-inf` into the parameter (`validate` only
//!   bounds lr by f32's range): a finding of this issue, reproduced by
//!   `lamb-core/tests/fuzz_regressions.rs`, and outside this target's property.
//!
//! Under these conditions the step must return `Ok` (or `Err(NonFinite)` under
//! `NonFinite::Error`); if it says it applied, every p, m and v is finite; if it skipped or
//! failed, nothing changed.
#![no_main]

use arbitrary::Arbitrary;
use lamb_core::layer::F32Layer;
use lamb_core::{Backend, LambError};
use lamb_fuzz::{ConfigSpec, F32, Few, Fill, StepNo, bits_all, expected_first_invalid};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    config: ConfigSpec,
    len: u8,
    step: StepNo,
    grad_scale: F32,
    p: Fill,
    g: Fill,
    m: Fill,
    v: Fill,
    patches: Few<(u8, u8, F32), 8>,
}

/// Folds any f32 into the moderate range: non-finite → 0, |x| > 1e6 → x mod 1e6.
fn moderate(x: f32) -> f32 {
    if !x.is_finite() {
        0.0
    } else if x.abs() > 1e6 {
        x % 1e6
    } else {
        x
    }
}

fn field_value(c: &lamb_core::LambConfig, name: &str) -> f64 {
    match name {
        "lr" => c.lr,
        "beta1" => c.beta1,
        "beta2" => c.beta2,
        "eps" => c.eps,
        "weight_decay" => c.weight_decay,
        "param_norm_min" => c.param_norm_min,
        "param_norm_max" => c.param_norm_max,
        "ratio_min" => c.ratio_min,
        "ratio_max" => c.ratio_max,
        _ => unreachable!(),
    }
}

fuzz_target!(|input: Input| {
    let config = input.config.build();
    let expected = expected_first_invalid(&config);
    let got = config.validate();

    // 1. validate() accepts exactly the documented set and names the first bad field.
    match (&got, expected) {
        (Ok(()), None) => {}
        (Err(LambError::InvalidHyperparameter { field, value, .. }), Some(name)) => {
            assert_eq!(
                field.name(),
                name,
                "validate named the wrong field for {config:?}"
            );
            assert_eq!(
                value.to_bits(),
                field_value(&config, name).to_bits(),
                "validate reported a value other than the field's for {config:?}"
            );
        }
        (
            Err(LambError::InvalidBounds {
                lower_field,
                lower,
                upper,
            }),
            Some(name),
        ) => {
            assert_eq!(
                lower_field.name(),
                name,
                "bounds error on the wrong pair for {config:?}"
            );
            let hi = if name == "ratio_min" {
                "ratio_max"
            } else {
                "param_norm_max"
            };
            assert_eq!(lower.to_bits(), field_value(&config, name).to_bits());
            assert_eq!(upper.to_bits(), field_value(&config, hi).to_bits());
            assert!(
                lower > upper,
                "InvalidBounds with lower <= upper: {config:?}"
            );
        }
        (got, expected) => panic!(
            "validate() = {got:?}, but the documented rules say {}: {config:?}",
            match expected {
                None => "valid".to_string(),
                Some(f) => format!("invalid {f}"),
            }
        ),
    }

    // 2. One step on moderate inputs.
    let len = 1 + input.len as usize;
    let mut bufs = [(); 4].map(|_| vec![0f32; len]);
    for (b, fill) in bufs
        .iter_mut()
        .zip([&input.p, &input.g, &input.m, &input.v])
    {
        fill.fill(b);
    }
    for &(buffer, index, value) in input.patches.iter() {
        bufs[buffer as usize % 4][index as usize % len] = value.get();
    }
    for b in &mut bufs {
        b.iter_mut().for_each(|x| *x = moderate(*x));
    }
    let [mut p, g, mut m, mut v] = bufs;
    let before = [bits_all(&p), bits_all(&m), bits_all(&v)];
    let step = input.step.get().max(1);
    let grad_scale = input.grad_scale.get();
    let result = Backend::detect().step_layer(
        &config,
        step,
        grad_scale,
        &mut F32Layer {
            param: &mut p,
            grad: &g,
            m: &mut m,
            v: &mut v,
        },
    );

    let applied = matches!(&result, Ok(r) if !r.skipped);
    if !applied {
        assert_eq!(bits_all(&p), before[0], "params written on {result:?}");
        assert_eq!(bits_all(&m), before[1], "m written on {result:?}");
        assert_eq!(bits_all(&v), before[2], "v written on {result:?}");
    }
    if got.is_err() {
        assert!(
            result.is_err(),
            "an invalid config stepped: {config:?} -> {result:?}"
        );
        return;
    }
    if !(grad_scale.is_finite() && grad_scale > 0.0) {
        assert!(
            matches!(result, Err(LambError::InvalidHyperparameter { .. })),
            "grad_scale {grad_scale:?} accepted: {result:?}"
        );
        return;
    }
    let moderate_config =
        config.lr <= 1.0 && config.lr * config.ratio_min <= 1.0 && config.param_norm_min <= 1e30;
    if !moderate_config {
        return;
    }
    match &result {
        Ok(_) | Err(LambError::NonFinite {}) => {}
        Err(e) => panic!("accepted config refused a moderate step: {e:?} for {config:?}"),
    }
    if applied {
        for (name, b) in [("param", &p), ("m", &m), ("v", &v)] {
            if let Some(i) = b.iter().position(|x| !x.is_finite()) {
                panic!(
                    "accepted config, moderate inputs, applied step, non-finite {name}[{i}] = {:?}\n\
                     config = {config:?}\nstep = {step}, grad_scale = {grad_scale:?}\n\
                     before: p = {:?}\n g = {g:?}\n m = {:?}\n v = {:?}\nreport = {result:?}",
                    b[i],
                    before[0]
                        .iter()
                        .map(|&x| f32::from_bits(x))
                        .collect::<Vec<_>>(),
                    before[1]
                        .iter()
                        .map(|&x| f32::from_bits(x))
                        .collect::<Vec<_>>(),
                    before[2]
                        .iter()
                        .map(|&x| f32::from_bits(x))
                        .collect::<Vec<_>>(),
                );
            }
        }
    }
});
