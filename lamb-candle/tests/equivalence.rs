//! The same parameters and gradients give bit-identical results through lamb-candle and
//! through lamb-std, for f32, bf16 and f16 Vars, every precision setting, 1 and several
//! threads, Vars without gradients, and models deep enough to nest on helper threads.

mod common;

use candle_core::{DType, Device, Var};
use common::*;
use lamb_candle::{Config, Lamb};
use lamb_std::lamb_core::layer::Rounding;
use lamb_std::lamb_core::{LambConfig, NonFinite, Schedule};
use lamb_std::{Precision, StateFormat};

/// NVLAMB with clipping, a warmup, loss scaling and `threads`.
fn config(threads: usize, precision: Precision) -> Config {
    Config {
        lamb: LambConfig {
            lr: 1e-2,
            non_finite: NonFinite::Skip,
            ..LambConfig::nvlamb()
        },
        max_grad_norm: Some(0.05),
        schedule: Schedule::WarmupPoly {
            warmup: 2,
            total: 10,
            power: 1.0,
            end: 0.0,
        },
        threads,
        precision,
        loss_scale: 4.0,
        ..Config::default()
    }
}

/// Runs `steps` steps of the model of `shapes` in `dtype` through both, Var `i` getting
/// no gradient at step `s` where `frozen(s, i)`; checks bits and state after each step,
/// and returns the final Var bits.
fn compare(
    shapes: &[(&str, &[usize])],
    dtype: DType,
    config: Config,
    steps: u64,
    frozen: impl Fn(u64, usize) -> bool,
) -> Vec<Vec<u32>> {
    let map = named_varmap(shapes, dtype);
    let vars = sorted_vars(&map);
    let mut opt = Lamb::from_varmap(&map, config).unwrap();
    let mut reference = reference(&vars, &config);
    let mut params: Vec<Buf> = vars.iter().map(|(_, v)| Buf::of(v)).collect();
    let mut previous = var_bits(&vars);
    for step in 0..steps {
        let store = grads(&vars, step, |i| !frozen(step, i));
        let report = opt.step_report(&store).unwrap();
        let want = reference_step(&mut reference, &mut params, &grad_bufs(&vars, &store), 0.25);
        assert_eq!(report, want, "step {step}");
        assert!(report.applied && report.grad_scale < 0.25, "{report:?}");
        let got = var_bits(&vars);
        assert_ne!(got, previous, "step {step} changed no Var");
        previous = got.clone();
        let want: Vec<Vec<u32>> = params.iter().map(Buf::bits).collect();
        assert!(
            got == want,
            "{dtype:?} step {step}: the Vars differ from lamb-std"
        );
        // Moments, master copies, last reports, step counter.
        assert!(
            state(opt.inner()) == state(&reference),
            "{dtype:?} step {step}: the state differs from lamb-std"
        );
    }
    var_bits(&vars)
}

fn never(_: u64, _: usize) -> bool {
    false
}

#[test]
fn f32_vars_match_lamb_std_for_every_thread_count() {
    let bits: Vec<_> = [1, 3]
        .map(|t| {
            compare(
                SHAPES,
                DType::F32,
                config(t, Precision::default()),
                4,
                never,
            )
        })
        .into();
    assert_eq!(bits[0], bits[1]);
}

#[test]
fn bf16_vars_through_master_copies_match_lamb_std() {
    let bits: Vec<_> = [1, 3]
        .map(|t| {
            compare(
                SHAPES,
                DType::BF16,
                config(t, Precision::default()),
                4,
                never,
            )
        })
        .into();
    assert_eq!(bits[0], bits[1]);
}

#[test]
fn bf16_vars_in_place_with_stochastic_rounding_and_compact_moments_match_lamb_std() {
    for moments in [StateFormat::Bf16, StateFormat::Q8] {
        let precision = Precision {
            moments,
            master: false,
            rounding: Rounding::Stochastic { seed: 7 },
            ..Precision::default()
        };
        let bits: Vec<_> = [1, 3]
            .map(|t| compare(SHAPES, DType::BF16, config(t, precision), 3, never))
            .into();
        assert_eq!(bits[0], bits[1], "{moments:?}");
    }
}

#[test]
fn f16_vars_through_master_copies_match_lamb_std() {
    compare(
        SHAPES,
        DType::F16,
        config(2, Precision::default()),
        3,
        never,
    );
}

#[test]
fn vars_without_gradients_are_not_stepped() {
    // enc.weight (1) frozen throughout; head.bias (2) missing at step 1 only.
    let frozen = |step: u64, i: usize| i == 1 || (i == 2 && step == 1);
    let map = varmap(DType::F32);
    let vars = sorted_vars(&map);
    let before = var_bits(&vars);
    let mut opt = Lamb::from_varmap(&map, config(2, Precision::default())).unwrap();
    for step in 0..3 {
        let _ = opt
            .step_report(&grads(&vars, step, |i| !frozen(step, i)))
            .unwrap();
    }
    assert_eq!(var_bits(&vars)[1], before[1]);
    let layer = opt.inner().layer(lamb_std::LayerId(1)).unwrap();
    assert!(layer.m.iter().chain(layer.v).all(|&x| x == 0.0) && layer.last.is_none());
    assert_eq!(opt.inner().steps(), 3);
    // And what did step is what lamb-std does with those layers left out.
    compare(
        SHAPES,
        DType::F32,
        config(1, Precision::default()),
        3,
        frozen,
    );
    compare(
        SHAPES,
        DType::BF16,
        config(3, Precision::default()),
        3,
        frozen,
    );
}

#[test]
fn many_vars_nest_on_helper_threads_and_still_match() {
    // 64 Vars nest on the caller's thread, the rest on helper threads of 1024 each.
    let names: Vec<String> = (0..1100).map(|i| format!("layer{i:04}.weight")).collect();
    let shapes: Vec<(&str, &[usize])> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.as_str(),
                if i.is_multiple_of(3) {
                    &[3, 5][..]
                } else {
                    &[7][..]
                },
            )
        })
        .collect();
    // A few frozen ones, one of them right at the first hop.
    let frozen = |_: u64, i: usize| i.is_multiple_of(97) || i == 64;
    compare(
        &shapes,
        DType::F32,
        config(2, Precision::default()),
        2,
        frozen,
    );
}

#[test]
fn vars_without_gradients_cost_no_stack() {
    // Thousands of frozen Vars (a fine-tuned head on a frozen body): they are skipped in a
    // loop, not nested, whatever their number.
    let mut vars = Vec::new();
    for i in 0..8000 {
        let var = Var::ones(2, DType::F32, &Device::Cpu).unwrap();
        vars.push((format!("frozen{i:05}"), var));
    }
    let config = Config {
        decay_split: false,
        ..Config::default()
    };
    let mut opt = Lamb::from_named_vars(vars.clone(), config).unwrap();
    let stepped = [17, 4000, 7999];
    let report = opt
        .step_report(&grads(&vars, 0, |i| stepped.contains(&i)))
        .unwrap();
    assert!(report.applied);
    for (i, bits) in var_bits(&vars).iter().enumerate() {
        assert_eq!(
            *bits == [1f32.to_bits(); 2],
            !stepped.contains(&i),
            "Var {i}"
        );
    }
}
