//! The step domain (`lamb_std::domain`): a step counter beyond `MAX_STEP`, moments, an
//! `lr × lr_scale` or a clipping threshold under which no step can succeed are refused
//! where they enter (setters, lamb checkpoints, PyTorch states) with a message that says
//! what is wrong, and values just inside the domain still load and step. A step at
//! `MAX_STEP` is an error that changes nothing, never a panic or a wrap.

use std::collections::HashMap;

use lamb_std::lamb_core::codec::q8_v_encode;
use lamb_std::lamb_core::half::bf16;
use lamb_std::lamb_core::layer::Grads;
use lamb_std::lamb_core::{BiasCorrection, LambConfig};
use lamb_std::{
    Error, GroupId, Lamb, LayerId, MAX_STEP, ParamsIn, Precision, StateFormat, StepReport,
};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// Layers "w" (5 elements) and "b" (2) in one group.
mod common;
use common::sign;

fn model(config: LambConfig) -> Lamb {
    let mut opt = Lamb::new(config).unwrap();
    opt.add_layer("w", 5).unwrap();
    opt.add_layer("b", 2).unwrap();
    opt
}

fn params() -> Vec<Vec<f32>> {
    vec![vec![0.5, -0.25, 1.0, 2.0, -1.5], vec![0.1, -0.1]]
}

/// A step with gradients `g` on every element (f32 parameters).
fn step(opt: &mut Lamb, p: &mut [Vec<f32>], g: f32) -> Result<StepReport, Error> {
    let grads: Vec<Vec<f32>> = p.iter().map(|x| vec![g; x.len()]).collect();
    let mut pp: Vec<&mut [f32]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
    let gg: Vec<&[f32]> = grads.iter().map(|x| x.as_slice()).collect();
    opt.step(&mut pp, &gg)
}

/// Everything a step or a load can change, as text.
fn snapshot(opt: &Lamb) -> String {
    let mut s = format!(
        "{} {:?} {:?}",
        opt.steps(),
        opt.max_grad_norm(),
        opt.schedule()
    );
    for g in 0..opt.group_count() {
        s += &format!(" {:?}", opt.group(GroupId(g)).unwrap());
    }
    for i in 0..opt.layer_count() {
        let l = opt.layer(LayerId(i)).unwrap();
        s += &format!(" {:?} {:?} {:?}", l.state, l.master, l.last);
    }
    s
}

/// Rewrites a lamb checkpoint (its `lamb.meta` JSON and any tensor bytes) and signs it
/// again, as a hostile writer would.
fn edit(
    bytes: &[u8],
    meta_edit: impl Fn(&mut Value),
    tensor_edit: impl Fn(&str, &mut Vec<u8>),
) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, md) = SafeTensors::read_metadata(bytes).unwrap();
    let mut metadata = md.metadata().clone().unwrap();
    let mut meta: Value = serde_json::from_str(&metadata["lamb.meta"]).unwrap();
    meta_edit(&mut meta);
    metadata.insert("lamb.meta".into(), meta.to_string());
    metadata.insert("lamb.checksum".into(), "xxh64:0000000000000000".into());
    let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let mut d = t.data().to_vec();
            tensor_edit(&n, &mut d);
            (n, t.dtype(), t.shape().to_vec(), d)
        })
        .collect();
    let views = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()));
    let out = safetensors::serialize(views, Some(metadata)).unwrap();
    sign(out)
}

/// `bytes` with step counter `step` (the metadata and every step tensor).
fn with_step(bytes: &[u8], step: u64) -> Vec<u8> {
    edit(
        bytes,
        |m| m["step"] = step.into(),
        |name, d| {
            if name.ends_with(".step") {
                *d = (step as f32).to_le_bytes().to_vec();
            }
        },
    )
}

/// `bytes` with element `k` of f32 tensor `tensor` set to `x`.
fn with_f32(bytes: &[u8], tensor: &str, k: usize, x: f32) -> Vec<u8> {
    edit(
        bytes,
        |_| {},
        |name, d| {
            if name == tensor {
                d[4 * k..4 * k + 4].copy_from_slice(&x.to_le_bytes());
            }
        },
    )
}

/// Loads `bytes`, expecting a refusal whose message contains `want`, with nothing changed.
fn refused(opt: &mut Lamb, bytes: &[u8], want: &str) -> String {
    let before = snapshot(opt);
    let e = opt.load_checkpoint_bytes(bytes).unwrap_err().to_string();
    assert!(e.contains(want), "expected {want:?} in: {e}");
    assert_eq!(
        snapshot(opt),
        before,
        "a refused load changed the optimizer"
    );
    e
}

/// A checkpoint of `model(config)` after one step.
fn one_step_checkpoint(config: LambConfig) -> Vec<u8> {
    let mut opt = model(config);
    let mut p = params();
    assert!(step(&mut opt, &mut p, 0.01).unwrap().applied);
    opt.to_checkpoint_bytes().unwrap()
}

// ---------------------------------------------------------------------------------------
// The step counter.

#[test]
fn a_checkpoint_beyond_the_step_limit_is_refused() {
    let bytes = one_step_checkpoint(LambConfig::paper());
    let mut opt = model(LambConfig::paper());
    for s in [u64::MAX, MAX_STEP + 1, 1 << 60] {
        refused(
            &mut opt,
            &with_step(&bytes, s),
            &format!(
                "the step counter is {s}, beyond the largest lamb keeps: 9007199254740992 \
                 (2^53, lamb_std::MAX_STEP)"
            ),
        );
    }
    // An optimizer without layers has no step tensors to disagree with the counter.
    let empty = Lamb::new(LambConfig::paper())
        .unwrap()
        .to_checkpoint_bytes()
        .unwrap();
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    refused(
        &mut opt,
        &with_step(&empty, u64::MAX),
        "the step counter is 18446744073709551615",
    );
}

/// At `MAX_STEP` a step is an `Err` that changes nothing (it used to overflow: a panic in
/// a debug build, a wrap to step 0 in a release build). Just below it steps normally.
#[test]
fn at_the_step_limit_a_step_is_an_error_and_changes_nothing() {
    let bytes = one_step_checkpoint(LambConfig::paper());
    let mut opt = model(LambConfig::paper());
    let mut p = params();
    opt.load_checkpoint_bytes(&with_step(&bytes, MAX_STEP - 1))
        .unwrap();
    let report = step(&mut opt, &mut p, 0.01).unwrap();
    assert!(report.applied);
    assert_eq!((report.step, opt.steps()), (MAX_STEP, MAX_STEP));
    // Saved at the limit, it loads again.
    let at_limit = opt.to_checkpoint_bytes().unwrap();
    let mut again = model(LambConfig::paper());
    again.load_checkpoint_bytes(&at_limit).unwrap();
    assert_eq!(again.steps(), MAX_STEP);
    assert_eq!(again.to_checkpoint_bytes().unwrap().len(), at_limit.len());
    for opt in [&mut opt, &mut again] {
        let (before, p_before) = (snapshot(opt), p.clone());
        for g in [0.01, 0.0] {
            let e = step(opt, &mut p, g).unwrap_err();
            assert_eq!(e, Error::StepLimit { step: MAX_STEP });
            assert_eq!(
                e.to_string(),
                "the step counter is at 9007199254740992, the most lamb counts (MAX_STEP = \
                 2^53): no further step can be taken; reset() or load a checkpoint"
            );
        }
        assert_eq!(snapshot(opt), before);
        assert_eq!(p, p_before);
    }
    // reset() is a way on.
    opt.reset();
    assert!(step(&mut opt, &mut p, 0.01).unwrap().applied);
}

/// A PyTorch state's step counter has the same bound: 2^53 loads, and the next step is the
/// same error.
#[test]
fn a_torch_state_at_the_step_limit_loads_and_cannot_step() {
    let f32s = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let torch = |step: Value| {
        let tensors = [
            ("state.0.exp_avg", vec![5], f32s(&[0.0; 5])),
            ("state.0.exp_avg_sq", vec![5], f32s(&[0.0; 5])),
            ("state.1.exp_avg", vec![2], f32s(&[0.0; 2])),
            ("state.1.exp_avg_sq", vec![2], f32s(&[0.0; 2])),
        ];
        let views = tensors.iter().map(|(n, s, b)| {
            (
                n.to_string(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        });
        let groups = serde_json::json!([{"params": [0, 1], "lr": 0.001, "step": step}]);
        let md = HashMap::from([("param_groups".to_string(), groups.to_string())]);
        safetensors::serialize(views, Some(md)).unwrap()
    };
    let mut opt = model(LambConfig::paper());
    opt.load_torch_state_bytes(&torch((MAX_STEP as f64).into()))
        .unwrap();
    assert_eq!(opt.steps(), MAX_STEP);
    let e = step(&mut opt, &mut params(), 0.01).unwrap_err();
    assert_eq!(e, Error::StepLimit { step: MAX_STEP });
    let e = opt
        .load_torch_state_bytes(&torch(((MAX_STEP + 2) as f64).into()))
        .unwrap_err();
    assert!(e.to_string().contains("whole number in [0, 2^53]"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Moments.

/// The largest value the refusal `e` says can step.
fn limit_in(e: &str) -> f32 {
    e.rsplit("that can step is ")
        .next()
        .and_then(|s| s.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no limit in: {e}"))
}

/// v = f32::MAX loaded, then every step was skipped: at step 2 (the checkpoint's step + 1)
/// the bias correction 1/(1 − 0.999²) ≈ 500 makes v̂ overflow whatever the gradient. Now
/// refused, naming the layer, the element, the step and the largest v that can step; that
/// value loads, and steps.
#[test]
fn a_second_moment_that_can_never_step_is_refused_and_the_limit_steps() {
    let bytes = one_step_checkpoint(LambConfig::paper());
    let mut opt = model(LambConfig::paper());
    let e = refused(
        &mut opt,
        &with_f32(&bytes, "state.0.exp_avg_sq", 1, f32::MAX),
        "layer 'w': exp_avg_sq[1] = 3.4028235e38 can take no step: at step 2, its \
         bias-corrected v̂ overflows f32 whatever the gradient, so every step would be skipped \
         (at step 2 the largest exp_avg_sq that can step is ",
    );
    let limit = limit_in(&e);
    assert!(limit > 1e35 && limit < 1e36, "{limit}");
    refused(
        &mut opt,
        &with_f32(&bytes, "state.0.exp_avg_sq", 1, limit.next_up()),
        "exp_avg_sq[1] = ",
    );
    for g in [0.0, 1e-3] {
        let mut opt = model(LambConfig::paper());
        opt.load_checkpoint_bytes(&with_f32(&bytes, "state.0.exp_avg_sq", 1, limit))
            .unwrap();
        let report = step(&mut opt, &mut params(), g).unwrap();
        assert!(report.applied, "v at the limit, gradient {g}: {report:?}");
    }
}

#[test]
fn a_first_moment_that_can_never_step_is_refused_and_the_limit_steps() {
    let bytes = one_step_checkpoint(LambConfig::paper());
    let mut opt = model(LambConfig::paper());
    let e = refused(
        &mut opt,
        &with_f32(&bytes, "state.1.exp_avg", 0, -f32::MAX),
        "layer 'b': exp_avg[0] = -3.4028235e38 can take no step: at step 2, its \
         bias-corrected m̂ overflows f32",
    );
    let limit = limit_in(&e);
    for m in [limit.next_up(), -limit.next_up()] {
        refused(
            &mut opt,
            &with_f32(&bytes, "state.1.exp_avg", 0, m),
            "exp_avg[0] = ",
        );
    }
    // At the limit it loads. Its update m̂ / √v̂ is finite for a large second moment, but
    // above ~1.8e19, whose square overflows the f32 lanes of ‖u‖²: that step is refused by
    // the step itself (the domain does not promise a finite update, see `domain.rs`). A
    // first moment 2^-8 of the limit steps.
    let at_limit = with_f32(&bytes, "state.1.exp_avg", 0, -limit);
    let at_limit = with_f32(&at_limit, "state.1.exp_avg_sq", 0, 1e35);
    let mut opt = model(LambConfig::paper());
    opt.load_checkpoint_bytes(&at_limit).unwrap();
    assert!(!step(&mut opt, &mut params(), 0.0).unwrap().applied);
    let below = with_f32(&bytes, "state.1.exp_avg", 0, -limit / 256.0);
    let below = with_f32(&below, "state.1.exp_avg_sq", 0, 1e35);
    let mut opt = model(LambConfig::paper());
    opt.load_checkpoint_bytes(&below).unwrap();
    assert!(step(&mut opt, &mut params(), 0.0).unwrap().applied);
}

/// The rule reads compact moments as the kernels decode them.
#[test]
fn compact_moments_that_can_never_step_are_refused() {
    let compact = |moments| {
        let mut opt = Lamb::new(LambConfig::paper()).unwrap();
        let precision = Precision {
            moments,
            compact_min_len: 0,
            ..Precision::default()
        };
        opt.set_precision(GroupId(0), precision).unwrap();
        opt.add_layer("w", 300).unwrap();
        opt
    };
    let stepped = |moments| {
        let mut opt = compact(moments);
        let mut p = vec![0.5f32; 300];
        let g = vec![0.01f32; 300];
        let r = opt
            .step_mixed(&mut [ParamsIn::F32(&mut p)], &[Grads::F32(&g)])
            .unwrap();
        assert!(r.applied);
        opt.to_checkpoint_bytes().unwrap()
    };
    let bytes = stepped(StateFormat::Bf16);
    let huge = edit(
        &bytes,
        |_| {},
        |name, d| {
            if name == "state.0.exp_avg_sq" {
                d[6..8].copy_from_slice(&bf16::MAX.to_bits().to_le_bytes());
            }
        },
    );
    refused(
        &mut compact(StateFormat::Bf16),
        &huge,
        "layer 'w': exp_avg_sq[3] = 3.3895314e38 can take no step",
    );
    let bytes = stepped(StateFormat::Q8);
    let huge = edit(
        &bytes,
        |_| {},
        |name, d| {
            if name == "state.0.exp_avg_sq.absmax" {
                d[4..8].copy_from_slice(&f32::MAX.to_le_bytes());
            }
            if name == "state.0.exp_avg_sq" {
                d[256] = q8_v_encode(1.0, 1.0);
            }
        },
    );
    refused(
        &mut compact(StateFormat::Q8),
        &huge,
        "layer 'w': exp_avg_sq[256] = 3.4028235e38 can take no step",
    );
}

/// A configuration change can trap moments too: a state with v = 1e38, stepping without
/// bias correction, would never step again with it (× ≈500 at step 2). `set_group` checks
/// the group's moments when it changes what the rule reads, and only then.
#[test]
fn set_group_refuses_a_configuration_under_which_the_moments_cannot_step() {
    let off = LambConfig {
        bias_correction: BiasCorrection::Off,
        ..LambConfig::paper()
    };
    let bytes = with_f32(&one_step_checkpoint(off), "state.0.exp_avg_sq", 2, 1e38);
    let mut opt = model(off);
    opt.load_checkpoint_bytes(&bytes).unwrap();
    let before = snapshot(&opt);
    let e = opt
        .set_group(GroupId(0), LambConfig::paper(), 1.0)
        .unwrap_err();
    assert!(matches!(e, Error::StateCannotStep { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(
            "layer 'w': with this configuration exp_avg_sq[2] = 1e38 can take no step: at \
             step 2"
        ),
        "{e}"
    );
    assert!(
        e.to_string().ends_with("; the group was not changed"),
        "{e}"
    );
    assert_eq!(snapshot(&opt), before);
    // Another learning rate is no concern of the moments.
    opt.set_group(GroupId(0), LambConfig { lr: 0.5, ..off }, 2.0)
        .unwrap();
    assert!(step(&mut opt, &mut params(), 0.01).unwrap().applied);
}

// ---------------------------------------------------------------------------------------
// Learning rate and clipping.

/// `lr × lr_scale` must be finite in f32: `lr_scale = 1e300` was accepted everywhere and
/// then every step erred ("invalid lr = 1e297").
#[test]
fn an_lr_scale_whose_product_overflows_is_refused_everywhere() {
    let want = "group 'default': lr × lr_scale = 0.001 × 1e300 = 1e297 is not finite in f32";
    let mut opt = model(LambConfig::paper());
    let before = snapshot(&opt);
    let e = opt
        .set_group(GroupId(0), LambConfig::paper(), 1e300)
        .unwrap_err();
    assert!(matches!(e, Error::LrScaleOverflow { .. }), "{e:?}");
    assert!(e.to_string().starts_with(want), "{e}");
    assert_eq!(snapshot(&opt), before);
    let e = opt
        .add_group("more", LambConfig::paper(), 1e300)
        .unwrap_err();
    assert!(
        e.to_string().starts_with("group 'more': lr × lr_scale"),
        "{e}"
    );
    assert_eq!(opt.group_count(), 1);
    let bytes = one_step_checkpoint(LambConfig::paper());
    refused(
        &mut opt,
        &edit(
            &bytes,
            |m| m["groups"][0]["lr_scale"] = 1e300.into(),
            |_, _| {},
        ),
        want,
    );

    // The boundary: f32 rounds up to infinity from 2^128 − 2^103 on.
    let wd0 = LambConfig {
        lr: 1.0,
        weight_decay: 0.0,
        ..LambConfig::paper()
    };
    let edge = 2f64.powi(128) - 2f64.powi(103);
    let e = opt.set_group(GroupId(0), wd0, edge).unwrap_err();
    assert!(matches!(e, Error::LrScaleOverflow { .. }), "{e:?}");
    opt.set_group(GroupId(0), wd0, edge.next_down()).unwrap();
    // Just inside: a step that moves nothing (zero gradient, no decay) succeeds.
    let mut p = params();
    let report = step(&mut opt, &mut p, 0.0).unwrap();
    assert!(report.applied);
    assert_eq!(p, params());
}

/// A PyTorch state replaces `lr` and keeps lamb's `lr_scale`: their product is checked.
#[test]
fn a_torch_lr_that_overflows_with_the_lr_scale_is_refused() {
    let mut opt = model(LambConfig::paper());
    opt.set_group(GroupId(0), LambConfig::paper(), 1e30)
        .unwrap();
    let groups = serde_json::json!([{"params": [0, 1], "lr": 1e10}]);
    let md = HashMap::from([("param_groups".to_string(), groups.to_string())]);
    let none: Vec<(String, TensorView<'_>)> = Vec::new();
    let file = safetensors::serialize(none, Some(md)).unwrap();
    let e = opt.load_torch_state_bytes(&file).unwrap_err();
    assert!(
        e.to_string()
            .contains("group 'default': lr × lr_scale = 10000000000.0 × 1e30"),
        "{e}"
    );
}

/// `max_grad_norm = 5e-324` was accepted, and every step with a gradient of norm above
/// about 1e-278 skipped (the clipping factor rounds to 0 in f32). The threshold must be at
/// least f32::MIN_POSITIVE, at `set_max_grad_norm` and at every load.
#[test]
fn a_clipping_threshold_below_f32s_normal_range_is_refused_everywhere() {
    let min = f32::MIN_POSITIVE as f64;
    let mut opt = model(LambConfig::paper());
    for x in [5e-324, 1e-40, min.next_down()] {
        let e = opt.set_max_grad_norm(Some(x)).unwrap_err();
        assert_eq!(e, Error::InvalidMaxGradNorm(x));
        assert_eq!(
            e.to_string(),
            format!(
                "invalid max_grad_norm = {x:?}: must be finite and at least 1.1754944e-38 \
                 (f32::MIN_POSITIVE; use None to turn clipping off)"
            )
        );
    }
    assert_eq!(opt.max_grad_norm(), None);
    let bytes = one_step_checkpoint(LambConfig::paper());
    refused(
        &mut opt,
        &edit(&bytes, |m| m["max_grad_norm"] = 5e-324.into(), |_, _| {}),
        "invalid max_grad_norm = 5e-324: must be finite and at least 1.1754944e-38",
    );
    let groups = serde_json::json!([{"params": [0, 1], "lr": 0.001, "max_grad_norm": 5e-324}]);
    let md = HashMap::from([("param_groups".to_string(), groups.to_string())]);
    let none: Vec<(String, TensorView<'_>)> = Vec::new();
    let e = opt
        .load_torch_state_bytes(&safetensors::serialize(none, Some(md)).unwrap())
        .unwrap_err();
    assert!(
        e.to_string().contains("invalid max_grad_norm = 5e-324"),
        "{e}"
    );

    // Just inside: a gradient of norm up to 1 is clipped to that norm with a normal f32
    // factor, and steps.
    opt.set_max_grad_norm(Some(min)).unwrap();
    let mut p = params();
    let report = step(&mut opt, &mut p, 0.3).unwrap();
    assert!(report.applied, "{report:?}");
    assert!(report.grad_scale > 0.0 && report.grad_scale.is_normal());
    opt.load_checkpoint_bytes(&edit(
        &bytes,
        |m| m["max_grad_norm"] = min.into(),
        |_, _| {},
    ))
    .unwrap();
    assert_eq!(opt.max_grad_norm(), Some(min));
}
