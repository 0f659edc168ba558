//! The step domain: the settings and the state from which a step can be taken.
//!
//! Every way in applies the same rules, through the same functions: [`Lamb::add_group`],
//! [`Lamb::set_group`] and [`Lamb::set_max_grad_norm`] when a setting is made, each step
//! before it runs, [`Lamb::save`] before it writes, and [`Lamb::load`] (and the other
//! loaders, PyTorch's included) before anything is replaced. So no accepted setting and no
//! loaded checkpoint leaves an optimizer on which every step errs or is skipped. The rules:
//!
//! - **Step counter**: at most [`MAX_STEP`] = 2^53, the largest integer below which every
//!   integer is an exact `f64` (the schedule and the bias corrections compute with the step
//!   as an `f64`; PyTorch keeps it as a float). A checkpoint with a larger step is refused;
//!   a step on an optimizer whose counter is at `MAX_STEP` is [`Error::StepLimit`], with
//!   nothing changed. The increment never wraps or panics.
//! - **Learning rate**: the configuration validates ([`LambConfig::validate`]), `lr_scale`
//!   is finite and ≥ 0, and `lr × lr_scale` (in `f64`, as the step computes it) is finite
//!   once rounded to `f32` ([`Error::LrScaleOverflow`] otherwise). Every schedule's factor
//!   lies in [0, 1], so every learning rate a step uses, `lr × lr_scale × factor`, is then
//!   finite in `f32`; otherwise each step at the schedule's full rate would err.
//! - **Clipping**: `max_grad_norm` is `None` or finite and at least `f32::MIN_POSITIVE`
//!   (2^-126, the smallest normal `f32`). The clipping factor `max_grad_norm / ‖g‖` goes to
//!   the kernels as an `f32`: below that threshold, a gradient of norm 1 already gets a
//!   factor outside f32's normal range, and at `5e-324` every gradient of norm above about
//!   1e-278 gets a factor that rounds to 0, which skips the step.
//! - **Moments**: for every element, the next step `t` with a **zero gradient**, in the
//!   kernels' own `f32` arithmetic (the scalar reference, `Backend::Scalar`), gives a finite
//!   bias-corrected first moment `m̂ = (β1·m)·c1` and a finite denominator `√v̂ + ε` (or
//!   `√(v̂ + ε)` with ε inside) of `v̂ = (β2·v)·c2`, where `c1`, `c2` are step `t`'s bias
//!   corrections `1 / (1 − β^t)`. The rule is exact: a state it refuses can take no step at
//!   all, whatever the gradient and the parameters. A gradient only adds `(1 − β2)·g² ≥ 0`
//!   to `v` and `f32` rounding is monotone, so the zero gradient gives the smallest
//!   denominator: if it overflows, it overflows for every gradient. And `m̂` overflows only
//!   if `|β1·m| ≥ 2^102` (the corrections are at most 2^25), where one unit in the last
//!   place is at least 2^79, while any gradient whose square is finite (otherwise `v`
//!   overflows) adds less than 2^64: `β1·m + β3·g` rounds back to `β1·m`. A skipped step
//!   does not advance `t`, so every later step would be skipped too. Loads check the
//!   stored moments (decoded, for bf16 and 8-bit ones) against the loaded configuration
//!   and step; [`Lamb::set_group`] checks the group's moments when it changes a field the
//!   rule reads (β1, β2, ε, where ε enters, bias correction).
//!
//! What the domain cannot promise: a step also depends on the gradients and the parameters
//! the caller passes (an overflowing update, a parameter norm beyond `f32`), which are
//! checked by each step, not here.
//!
//! [`Lamb::add_group`]: crate::Lamb::add_group
//! [`Lamb::set_group`]: crate::Lamb::set_group
//! [`Lamb::set_max_grad_norm`]: crate::Lamb::set_max_grad_norm
//! [`Lamb::save`]: crate::Lamb::save
//! [`Lamb::load`]: crate::Lamb::load
//! [`LambConfig::validate`]: lamb_core::LambConfig::validate

use lamb_core::codec::{QBLOCK, q8_m_decode, q8_v_decode};
use lamb_core::{LambConfig, StepScalars};

use crate::error::Error;
use crate::optimizer::{Group, ParamStorage, StateView};

/// The largest step counter an optimizer holds: 2^53. A checkpoint with a larger step is
/// refused at load, and a step on an optimizer at `MAX_STEP` is an [`Error::StepLimit`]
/// (see the [module docs](self)).
///
/// ```
/// assert_eq!(lamb_std::MAX_STEP, 1 << 53);
/// assert_eq!(lamb_std::MAX_STEP as f64 as u64, lamb_std::MAX_STEP);
/// ```
pub const MAX_STEP: u64 = 1 << 53;

/// A group's configuration at a step whose schedule gives `lr_factor`: `config.lr` scaled
/// by the group's `lr_scale` and by `lr_factor`, after the group's domain checks, validated.
/// [`Lamb`](crate::Lamb) and optimizers built on lamb-std (lamb-mpi) step with it.
///
/// ```
/// use lamb_std::{GroupId, Lamb, domain};
/// use lamb_std::lamb_core::LambConfig;
/// let opt = Lamb::new(LambConfig { lr: 0.01, ..LambConfig::paper() })?;
/// let config = domain::group_config(opt.group(GroupId(0))?, 0.5)?;
/// assert_eq!(config.lr, 0.005);
/// # Ok::<(), lamb_std::Error>(())
/// ```
pub fn group_config(group: &Group, lr_factor: f64) -> Result<LambConfig, Error> {
    validate_group(&group.name, &group.config, group.lr_scale)?;
    let config = LambConfig {
        lr: group.config.lr * group.lr_scale * lr_factor,
        ..group.config
    };
    config.validate().map_err(|source| Error::Config {
        group: Some(group.name.clone()),
        source,
    })?;
    Ok(config)
}

/// The storage rule of a step, for layer `index` (`name`) whose parameters come in storage
/// `found`: f16 needs a group that keeps a master copy (`keeps_master`); the storage fixed by
/// the layer's first applied step (`fixed`) cannot change; a master copy that exists before
/// any step (`has_master`, loaded from a checkpoint) needs half-precision parameters.
/// [`Lamb`](crate::Lamb) and optimizers built on lamb-std (lamb-mpi) apply it alike.
///
/// ```
/// use lamb_std::{Error, ParamStorage, domain::check_storage};
/// use ParamStorage::{Bf16, F16, F32};
/// assert!(check_storage(Bf16, 0, "w", None, false, false).is_ok());
/// let changed = check_storage(F32, 0, "w", Some(Bf16), true, true);
/// assert!(matches!(changed, Err(Error::StorageChanged { .. })));
/// assert!(matches!(check_storage(F16, 0, "w", None, false, false), Err(Error::NeedsMaster(_))));
/// assert!(matches!(check_storage(F32, 0, "w", None, true, true), Err(Error::MasterNeedsHalf { .. })));
/// ```
pub fn check_storage(
    found: ParamStorage,
    index: usize,
    name: &str,
    fixed: Option<ParamStorage>,
    keeps_master: bool,
    has_master: bool,
) -> Result<(), Error> {
    if found == ParamStorage::F16 && !keeps_master {
        return Err(Error::NeedsMaster(name.to_string()));
    }
    match fixed {
        Some(fixed) if fixed != found => Err(Error::StorageChanged {
            index,
            name: name.to_string(),
            fixed,
            found,
        }),
        // Only a checkpoint load leaves a master copy with the storage free: the copy is of
        // bf16 or f16 parameters, and f32 ones would leave it stale.
        None if found == ParamStorage::F32 && has_master => Err(Error::MasterNeedsHalf {
            index,
            name: name.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The number of the step after `step`, or [`Error::StepLimit`] at [`MAX_STEP`]: the rule
/// every optimizer built on lamb-std applies before a step.
///
/// ```
/// use lamb_std::domain::next_step;
/// assert_eq!(next_step(41)?, 42);
/// assert!(next_step(lamb_std::MAX_STEP).is_err());
/// # Ok::<(), lamb_std::Error>(())
/// ```
pub fn next_step(step: u64) -> Result<u64, Error> {
    match step.checked_add(1) {
        Some(t) if t <= MAX_STEP => Ok(t),
        _ => Err(Error::StepLimit { step }),
    }
}

/// Checks a step counter that comes from outside (a checkpoint).
pub(crate) fn check_step(step: u64) -> Result<(), String> {
    if step > MAX_STEP {
        return Err(format!(
            "the step counter is {step}, beyond the largest lamb keeps: {MAX_STEP} \
             (2^53, lamb_std::MAX_STEP)"
        ));
    }
    Ok(())
}

/// Checks a group's configuration and lr multiplier (the learning-rate rule).
pub(crate) fn validate_group(name: &str, config: &LambConfig, lr_scale: f64) -> Result<(), Error> {
    if !(lr_scale.is_finite() && lr_scale >= 0.0) {
        return Err(Error::InvalidLrScale {
            group: name.to_string(),
            value: lr_scale,
        });
    }
    config.validate().map_err(|source| Error::Config {
        group: Some(name.to_string()),
        source,
    })?;
    // The product the step computes (before the schedule's factor, which is <= 1).
    if !((config.lr * lr_scale) as f32).is_finite() {
        return Err(Error::LrScaleOverflow {
            group: name.to_string(),
            lr: config.lr,
            lr_scale,
        });
    }
    Ok(())
}

/// Checks a clipping threshold (`None`: no clipping).
pub(crate) fn validate_max_grad_norm(max_norm: Option<f64>) -> Result<(), Error> {
    match max_norm {
        Some(x) if !(x.is_finite() && x >= f32::MIN_POSITIVE as f64) => {
            Err(Error::InvalidMaxGradNorm(x))
        }
        _ => Ok(()),
    }
}

/// The zero-gradient arithmetic of step `t` for one configuration: what the moment rule
/// evaluates, in lamb-core's order of operations (`LambConfig`'s docs).
pub(crate) struct NextStep {
    s: StepScalars,
    t: u64,
}

/// An element whose moment fails the rule.
#[derive(Debug)]
pub(crate) struct Unsteppable {
    which: &'static str,
    index: usize,
    value: f32,
    t: u64,
    /// The largest magnitude the rule accepts at step `t`.
    limit: f32,
    inside_sqrt: bool,
}

impl std::fmt::Display for Unsteppable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Unsteppable {
            which,
            index,
            value,
            t,
            limit,
            inside_sqrt,
        } = self;
        let what = if *which == "exp_avg" {
            "its bias-corrected m̂"
        } else if *inside_sqrt {
            "the denominator √(v̂ + ε)"
        } else {
            "its bias-corrected v̂"
        };
        write!(
            f,
            "{which}[{index}] = {value:?} can take no step: at step {t}, {what} overflows f32 \
             whatever the gradient, so every step would be skipped (at step {t} the largest \
             {which} that can step is {limit:?})"
        )
    }
}

impl NextStep {
    /// The rule for step `t` (>= 1) under `config` (which must validate: `None` otherwise).
    pub(crate) fn new(config: &LambConfig, t: u64) -> Option<NextStep> {
        let s = StepScalars::new(config, t, 1.0).ok()?;
        Some(NextStep { s, t })
    }

    /// `m̂` of a zero-gradient step.
    fn m_hat(&self, m: f32) -> f32 {
        let s = &self.s;
        let g = 0.0 * s.grad_scale;
        (s.beta1 * m + s.beta3 * g) * s.inv_bias1
    }

    /// The denominator of a zero-gradient step.
    fn denom(&self, v: f32) -> f32 {
        let s = &self.s;
        let g = 0.0 * s.grad_scale;
        let v_hat = (s.beta2 * v + s.one_minus_beta2 * (g * g)) * s.inv_bias2;
        if s.eps_inside_sqrt {
            (v_hat + s.eps).sqrt()
        } else {
            v_hat.sqrt() + s.eps
        }
    }

    fn m_ok(&self, m: f32) -> bool {
        self.m_hat(m).is_finite()
    }

    fn v_ok(&self, v: f32) -> bool {
        self.denom(v).is_finite()
    }

    /// The largest `x` in [0, f32::MAX] with `ok(x)` (`ok` is monotone: true up to a limit).
    fn limit(ok: impl Fn(f32) -> bool) -> f32 {
        let (mut lo, mut hi) = (0u32, f32::MAX.to_bits());
        if ok(f32::MAX) {
            return f32::MAX;
        }
        // ok(lo) holds (0 always steps), ok(hi) does not.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if ok(f32::from_bits(mid)) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        f32::from_bits(lo)
    }

    fn fault(&self, which: &'static str, index: usize, value: f32) -> Unsteppable {
        let limit = if which == "exp_avg" {
            Self::limit(|x| self.m_ok(x))
        } else {
            Self::limit(|x| self.v_ok(x))
        };
        Unsteppable {
            which,
            index,
            value,
            t: self.t,
            limit,
            inside_sqrt: self.s.eps_inside_sqrt,
        }
    }

    /// Checks first moments.
    pub(crate) fn check_m(&self, m: impl Iterator<Item = f32>) -> Result<(), Unsteppable> {
        for (k, x) in m.enumerate() {
            if !self.m_ok(x) {
                return Err(self.fault("exp_avg", k, x));
            }
        }
        Ok(())
    }

    /// Checks second moments.
    pub(crate) fn check_v(&self, v: impl Iterator<Item = f32>) -> Result<(), Unsteppable> {
        for (k, x) in v.enumerate() {
            if !self.v_ok(x) {
                return Err(self.fault("exp_avg_sq", k, x));
            }
        }
        Ok(())
    }

    /// Checks 8-bit moments: codes decoded with their block's scale, as the kernels do.
    pub(crate) fn check_q8(
        &self,
        m: &[u8],
        v: &[u8],
        m_absmax: &[f32],
        v_absmax: &[f32],
    ) -> Result<(), Unsteppable> {
        let scale = |absmax: &[f32], k: usize| absmax.get(k / QBLOCK).copied().unwrap_or(0.0);
        self.check_m(
            m.iter()
                .enumerate()
                .map(|(k, &c)| q8_m_decode(c, scale(m_absmax, k))),
        )?;
        self.check_v(
            v.iter()
                .enumerate()
                .map(|(k, &c)| q8_v_decode(c, scale(v_absmax, k))),
        )
    }

    /// Checks a layer's moments as the optimizer holds them.
    pub(crate) fn check_state(&self, state: &StateView<'_>) -> Result<(), Unsteppable> {
        match *state {
            StateView::F32 { m, v } => {
                self.check_m(m.iter().copied())?;
                self.check_v(v.iter().copied())
            }
            StateView::Bf16 { m, v } => {
                self.check_m(m.iter().map(|x| x.to_f32()))?;
                self.check_v(v.iter().map(|x| x.to_f32()))
            }
            StateView::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => self.check_q8(m, v, m_absmax, v_absmax),
        }
    }
}

/// For [`Lamb::set_group`]: whether `new` changes what the moment rule reads, and if so,
/// that every layer of the group (`states`: name and moments) can still step under it.
pub(crate) fn check_group_state<'a>(
    step: u64,
    old: &LambConfig,
    new: &LambConfig,
    states: impl Iterator<Item = (&'a str, StateView<'a>)>,
) -> Result<(), Error> {
    let key = |c: &LambConfig| {
        (
            c.beta1.to_bits(),
            c.beta2.to_bits(),
            c.eps.to_bits(),
            c.eps_mode,
            c.bias_correction,
        )
    };
    if key(old) == key(new) {
        return Ok(());
    }
    let Ok(t) = next_step(step) else {
        return Ok(()); // no next step to check
    };
    let Some(rule) = NextStep::new(new, t) else {
        return Ok(()); // `new` was validated first; unreachable
    };
    for (name, state) in states {
        rule.check_state(&state)
            .map_err(|e| Error::StateCannotStep {
                layer: name.to_string(),
                what: e.to_string(),
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamb_core::{BiasCorrection, EpsMode, NonFinite};

    /// The rule against the kernel itself, at the boundary it computes: the largest
    /// accepted v (and m) steps with a zero gradient and with a small one; one ulp more is
    /// skipped by the scalar kernel for every gradient tried. For each bias correction, eps
    /// mode and a few steps.
    #[test]
    fn the_moment_rule_is_the_kernels_boundary() {
        let grads = [0.0f32, 1e-3, -0.5, 3.0, 1e10, -1e18];
        let mut boundaries = 0;
        for bc in [
            BiasCorrection::F64,
            BiasCorrection::F32,
            BiasCorrection::Off,
        ] {
            for mode in [EpsMode::OutsideSqrt, EpsMode::InsideSqrt] {
                for (beta1, beta2, eps) in [(0.9, 0.999, 1e-6), (0.5, 0.99999994, 3e38)] {
                    let config = LambConfig {
                        beta1,
                        beta2,
                        eps,
                        eps_mode: mode,
                        bias_correction: bc,
                        non_finite: NonFinite::Skip,
                        weight_decay: 0.0,
                        ..LambConfig::paper()
                    };
                    for t in [1u64, 2, 10, 1000] {
                        let rule = NextStep::new(&config, t).unwrap();
                        let step = |m: f32, v: f32, g: f32| {
                            let (mut p, mut mm, mut vv) = ([0.5f32], [m], [v]);
                            lamb_core::Backend::Scalar
                                .step_layer(
                                    &config,
                                    t,
                                    1.0,
                                    &mut lamb_core::layer::F32Layer {
                                        param: &mut p,
                                        grad: &[g],
                                        m: &mut mm,
                                        v: &mut vv,
                                    },
                                )
                                .unwrap()
                        };
                        let v_max = NextStep::limit(|x| rule.v_ok(x));
                        if v_max < f32::MAX {
                            boundaries += 1;
                            assert!(!step(0.0, v_max, 0.0).skipped, "{config:?} t={t}");
                            for g in grads {
                                let r = step(0.0, v_max.next_up(), g);
                                assert!(r.skipped, "{config:?} t={t} v above the limit g={g}");
                            }
                        }
                        let m_max = NextStep::limit(|x| rule.m_ok(x));
                        if m_max < f32::MAX {
                            boundaries += 1;
                            // m̂ finite: the kernel's phase 1 may still overflow m̂ / denom,
                            // so check m̂ itself, and that one ulp more skips.
                            assert!(rule.m_hat(m_max).is_finite());
                            for g in grads {
                                for m in [m_max.next_up(), -m_max.next_up()] {
                                    let r = step(m, 1.0, g);
                                    assert!(r.skipped, "{config:?} t={t} m={m} g={g}");
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(boundaries >= 40, "{boundaries} boundaries checked");
    }

    #[test]
    fn the_step_counter_stops_at_max_step() {
        assert_eq!(next_step(0), Ok(1));
        assert_eq!(next_step(MAX_STEP - 1), Ok(MAX_STEP));
        assert_eq!(
            next_step(MAX_STEP),
            Err(Error::StepLimit { step: MAX_STEP })
        );
        assert_eq!(
            next_step(u64::MAX),
            Err(Error::StepLimit { step: u64::MAX })
        );
        assert!(check_step(MAX_STEP).is_ok());
        assert!(check_step(MAX_STEP + 1).is_err());
    }
}
