//! What must hold of an optimizer after a load that was accepted.

use super::*;

pub(crate) fn without_reports(mut s: State) -> State {
    s.layers.iter_mut().for_each(|l| l.last = None);
    s
}

/// The domain's moment rule: with a zero gradient, step `t`'s m̂ = (β1·m)·c1 and
/// denominator (√v̂ + ε, or √(v̂ + ε)) of v̂ = (β2·v)·c2 are finite in f32, for every
/// element. `None` where `config` does not validate (no step to check).
fn moments_can_step(config: &LambConfig, t: u64, m: &[f32], v: &[f32]) -> Option<bool> {
    let s = StepScalars::new(config, t, 1.0).ok()?;
    let m_ok = |m: f32| ((s.beta1 * m + s.beta3 * 0.0) * s.inv_bias1).is_finite();
    let v_ok = |v: f32| {
        let v_hat = (s.beta2 * v + s.one_minus_beta2 * 0.0) * s.inv_bias2;
        let denom = if s.eps_inside_sqrt {
            (v_hat + s.eps).sqrt()
        } else {
            v_hat.sqrt() + s.eps
        };
        denom.is_finite()
    };
    Some(m.iter().all(|&x| m_ok(x)) && v.iter().all(|&x| v_ok(x)))
}

/// Every group the load changed holds a valid configuration and an lr finite in f32.
/// `before`: the snapshot before the load (a group left as it was is not checked).
fn check_groups(opt: &Lamb, before: &State) {
    for g in 0..opt.group_count() {
        let group = opt.group(GroupId(g)).expect("group");
        if before.groups.get(g) == Some(&format!("{group:?}")) {
            continue;
        }
        assert_eq!(
            group.config.validate(),
            Ok(()),
            "loaded an invalid configuration: {group:?}"
        );
        assert!(
            group.lr_scale.is_finite()
                && group.lr_scale >= 0.0
                && ((group.config.lr * group.lr_scale) as f32).is_finite(),
            "loaded lr {} × lr_scale {}, not finite in f32",
            group.config.lr,
            group.lr_scale
        );
    }
}

/// The stored moments are finite (v ≥ 0; for 8-bit moments, the scales, with the lengths
/// the layer needs).
fn moments_finite(l: &LayerView<'_>) -> bool {
    let ok = |m: Vec<f32>, v: Vec<f32>| {
        m.iter().all(|x| x.is_finite()) && v.iter().all(|x| x.is_finite() && *x >= 0.0)
    };
    match l.state {
        StateView::F32 { m, v } => ok(m.to_vec(), v.to_vec()),
        StateView::Bf16 { m, v } => ok(
            m.iter().map(|x| x.to_f32()).collect(),
            v.iter().map(|x| x.to_f32()).collect(),
        ),
        StateView::Q8 {
            m_absmax,
            v_absmax,
            m,
            v,
        } => {
            m.len() == l.len
                && v.len() == l.len
                && m_absmax.len() == l.len.div_ceil(QBLOCK)
                && ok(vec![], [m_absmax, v_absmax].concat())
        }
    }
}

/// The moments' values as f32, whatever their storage.
fn decoded_moments(state: &StateView<'_>) -> (Vec<f32>, Vec<f32>) {
    match *state {
        StateView::F32 { m, v } => (m.to_vec(), v.to_vec()),
        StateView::Bf16 { m, v } => (
            m.iter().map(|x| x.to_f32()).collect(),
            v.iter().map(|x| x.to_f32()).collect(),
        ),
        StateView::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => (
            m.iter()
                .enumerate()
                .map(|(k, &c)| q8_m_decode(c, m_absmax[k / QBLOCK]))
                .collect(),
            v.iter()
                .enumerate()
                .map(|(k, &c)| q8_v_decode(c, v_absmax[k / QBLOCK]))
                .collect(),
        ),
    }
}

/// One loaded layer: finite moments that can take the next step, and a finite master copy.
fn check_layer(opt: &Lamb, l: &LayerView<'_>) {
    assert!(
        moments_finite(l),
        "layer '{}': loaded non-finite (or negative second) moments",
        l.name
    );
    // And they can take the next step.
    let (m, v) = decoded_moments(&l.state);
    let config = opt.group(l.group).expect("group").config;
    if opt.steps() < MAX_STEP {
        assert_ne!(
            moments_can_step(&config, opt.steps() + 1, &m, &v),
            Some(false),
            "layer '{}': loaded moments that can take no step at step {}",
            l.name,
            opt.steps() + 1
        );
    }
    // Known bug (lamb-std/tests/fuzz_regressions.rs,
    // a_checkpoint_with_a_non_finite_master_copy_is_refused): the load does not check
    // master copies. A model whose step overflowed its parameters (lamb-core's
    // an_applied_step_never_writes_a_non_finite_parameter) saves such a copy too.
    if let Some(master) = l.master
        && !known_bugs_skipped()
    {
        assert!(
            master.iter().all(|x| x.is_finite()),
            "layer '{}': loaded a non-finite master copy (every later step would be skipped)",
            l.name
        );
    }
}

/// Panics unless `opt` holds a state a load may produce. `before`: the snapshot before the
/// load; a group whose configuration the load left as it was (a PyTorch state leaves
/// groups it has no entry for) is not the load's doing and is not checked.
pub(crate) fn check_valid(opt: &Lamb, before: &State) {
    assert!(
        opt.steps() <= MAX_STEP,
        "loaded step {} > MAX_STEP",
        opt.steps()
    );
    check_groups(opt, before);
    if let Some(x) = opt.max_grad_norm() {
        assert!(
            x.is_finite() && x >= f32::MIN_POSITIVE as f64,
            "loaded max_grad_norm {x}"
        );
    }
    assert_eq!(
        opt.schedule().validate(),
        Ok(()),
        "loaded schedule {:?}",
        opt.schedule()
    );
    for i in 0..opt.layer_count() {
        check_layer(opt, &opt.layer(LayerId(i)).unwrap());
    }
}
