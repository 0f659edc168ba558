//! The values the parts of one step hand each other: [`StepScalars`] (the configuration of
//! one step, rounded to f32 once, into the kernels) and [`LayerNorms`] (what phase 1 of the
//! kernels returns, summed over blocks, into [`LayerReport::plan`](crate::LayerReport::plan)).
//!
//! Every backend uses exactly these values, which is half of why they agree bit for bit; the
//! other half is the kernels' order of operations ([`crate::kernels`]).

use crate::config::{BiasCorrection, EpsMode, LambConfig};
use crate::error::{Field, LambError};
use crate::fpenv::in_default_mode;
use crate::layer::ParamFormat;

/// The per-step scalars of the element-wise update, rounded to f32 once. Every backend
/// uses exactly these values, which is half of why they agree bit for bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepScalars {
    /// Factor applied to every gradient element (global clipping × 1/loss scale).
    pub grad_scale: f32,
    /// β1.
    pub beta1: f32,
    /// Weight of g in m: `1 − β1`, or 1 without grad averaging.
    pub beta3: f32,
    /// β2.
    pub beta2: f32,
    /// `1 − β2`, computed in f64 then rounded (as PyTorch and optax do).
    pub one_minus_beta2: f32,
    /// `1 / (1 − β1^t)`.
    pub inv_bias1: f32,
    /// `1 / (1 − β2^t)`.
    pub inv_bias2: f32,
    /// ε.
    pub eps: f32,
    /// ε inside the square root.
    pub eps_inside_sqrt: bool,
    /// Decoupled weight decay λ.
    pub weight_decay: f32,
}

impl StepScalars {
    /// The scalars of step `step` (counted from 1). `grad_scale` multiplies every gradient
    /// element: 1 for none, `1/max(1, ‖g‖/max_norm)` for global clipping, `1/loss_scale`
    /// for loss scaling.
    ///
    /// ```
    /// use lamb_core::{LambConfig, StepScalars};
    /// let s = StepScalars::new(&LambConfig::paper(), 1, 1.0).unwrap();
    /// assert_eq!(s.beta3, 0.1);
    /// assert!(StepScalars::new(&LambConfig::paper(), 0, 1.0).is_err());
    /// ```
    pub fn new(config: &LambConfig, step: u64, grad_scale: f32) -> Result<Self, LambError> {
        in_default_mode((config, step, grad_scale), |(c, t, s)| {
            Self::compute(c, t, s)
        })
    }

    /// [`StepScalars::new`], in the default floating-point mode.
    fn compute(config: &LambConfig, step: u64, grad_scale: f32) -> Result<Self, LambError> {
        config.validate()?;
        if step == 0 {
            return Err(LambError::StepZero);
        }
        if !(grad_scale.is_finite() && grad_scale > 0.0) {
            return Err(LambError::InvalidHyperparameter {
                field: Field::GradScale,
                value: grad_scale as f64,
                expected: "finite and > 0",
            });
        }
        let t = step as f64;
        let inv_bias = |beta: f64| inv_bias_correction(config.bias_correction, beta, t);
        Ok(StepScalars {
            grad_scale,
            beta1: config.beta1 as f32,
            beta3: if config.grad_averaging {
                (1.0 - config.beta1) as f32
            } else {
                1.0
            },
            beta2: config.beta2 as f32,
            one_minus_beta2: (1.0 - config.beta2) as f32,
            inv_bias1: inv_bias(config.beta1),
            inv_bias2: inv_bias(config.beta2),
            eps: config.eps as f32,
            eps_inside_sqrt: config.eps_mode == EpsMode::InsideSqrt,
            weight_decay: config.weight_decay as f32,
        })
    }
}

/// `1 / (1 − β^t)` rounded to f32 as `mode` says. Not inlined, so that the (large) software
/// `pow` of targets without an f64 FPU is called from one place.
#[inline(never)]
fn inv_bias_correction(mode: BiasCorrection, beta: f64, t: f64) -> f32 {
    match mode {
        BiasCorrection::Off => 1.0,
        BiasCorrection::F64 => (1.0 / (1.0 - libm::pow(beta, t))) as f32,
        BiasCorrection::F32 => {
            // f32(β)^t rounded to f32 (f64 pow of an f32 base is exact to well under half
            // an f32 ulp), then 1 − that in f32, as optax's f32 arithmetic does.
            let pow = libm::pow(beta as f32 as f64, t) as f32;
            1.0 / (1.0 - pow)
        }
    }
}

/// Step `t` of a configuration, ready to step layers: the configuration and its
/// [`StepScalars`], validated and rounded once. Build it once per step and step every layer
/// with it ([`Step::layer`], [`Backend::step_layer_with`](crate::Backend::step_layer_with),
/// [`Backend::step_layer_compact_with`](crate::Backend::step_layer_compact_with)): the
/// bias corrections' `pow` and the validation then run once per step, not once per layer
/// (on a microcontroller without an f64 FPU they cost ~20,000 instructions). Stepping
/// with it gives exactly the bits of [`step_layer`](crate::step_layer) with the same
/// configuration and step.
///
/// ```
/// use lamb_core::{LambConfig, Step};
/// let config = LambConfig::optax();
/// let (mut w, mut b) = ([0.5f32; 8], [0.0f32; 2]);
/// let (gw, gb) = ([0.1f32; 8], [0.2f32; 2]);
/// let (mut mw, mut vw, mut mb, mut vb) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 2], [0.0f32; 2]);
/// for t in 1..=3 {
///     let step = Step::new(&config, t)?; // once per step
///     step.layer(&mut w, &gw, &mut mw, &mut vw)?; // per layer
///     step.layer(&mut b, &gb, &mut mb, &mut vb)?;
/// }
/// assert!(w[0] < 0.5 && b[0] < 0.0);
/// # Ok::<(), lamb_core::LambError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step<'c> {
    config: &'c LambConfig,
    scalars: StepScalars,
}

impl<'c> Step<'c> {
    /// Step `step` (counted from 1) of `config`, gradients unscaled. Errors as
    /// [`StepScalars::new`]: an invalid configuration or step 0.
    ///
    /// ```
    /// use lamb_core::{LambConfig, LambError, Step};
    /// assert_eq!(Step::new(&LambConfig::paper(), 0), Err(LambError::StepZero));
    /// assert_eq!(Step::new(&LambConfig::paper(), 1)?.scalars().beta3, 0.1);
    /// # Ok::<(), LambError>(())
    /// ```
    pub fn new(config: &'c LambConfig, step: u64) -> Result<Step<'c>, LambError> {
        Step::with_grad_scale(config, step, 1.0)
    }

    /// Step `step` of `config` with every gradient element multiplied by `grad_scale`
    /// (global clipping, 1/loss scale; finite and > 0).
    ///
    /// ```
    /// use lamb_core::{LambConfig, Step};
    /// let config = LambConfig::paper();
    /// let step = Step::with_grad_scale(&config, 1, 0.5)?;
    /// assert_eq!(step.scalars().grad_scale, 0.5);
    /// assert!(Step::with_grad_scale(&LambConfig::paper(), 1, f32::NAN).is_err());
    /// # Ok::<(), lamb_core::LambError>(())
    /// ```
    pub fn with_grad_scale(
        config: &'c LambConfig,
        step: u64,
        grad_scale: f32,
    ) -> Result<Step<'c>, LambError> {
        Ok(Step {
            config,
            scalars: StepScalars::new(config, step, grad_scale)?,
        })
    }

    /// The configuration (validated).
    pub fn config(&self) -> &'c LambConfig {
        self.config
    }

    /// The scalars the kernels use.
    pub fn scalars(&self) -> &StepScalars {
        &self.scalars
    }
}

/// Sums of squares of one layer (or one block): per block 16 f32 lane partials folded into
/// one f32, blocks added in f64 (`kernels` module docs); and for parameters
/// stored in a half-precision format the ranges of p and u, which bound the new values.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct LayerNorms {
    /// Σ p².
    pub param_sq: f64,
    /// Σ u².
    pub update_sq: f64,
    /// `min(0, min p)`. Computed only where `param_format` is not f32 (0 otherwise: the f32
    /// kernels do no extra work for it). A NaN p makes this or `param_max` NaN.
    pub param_min: f32,
    /// `max(0, max p)`, under the same condition.
    pub param_max: f32,
    /// `min(0, min u)`, under the same condition.
    pub update_min: f32,
    /// `max(0, max u)`, under the same condition.
    pub update_max: f32,
    /// The format the new parameters are stored in.
    pub param_format: ParamFormat,
}

/// Component-wise sum of the sums, union of the ranges. Blocks are always added in index
/// order; the ranges are exact and do not depend on the order.
impl core::ops::Add for LayerNorms {
    type Output = LayerNorms;
    #[inline]
    fn add(self, other: LayerNorms) -> LayerNorms {
        if self.param_format == ParamFormat::F32 && other.param_format == ParamFormat::F32 {
            // f32 parameters carry no ranges (both are +0, see the field docs), and their
            // union is +0 again: the f32 step, which adds one of these per block, skips
            // the key arithmetic.
            return LayerNorms {
                param_sq: self.param_sq + other.param_sq,
                update_sq: self.update_sq + other.update_sq,
                ..self
            };
        }
        let min = |a: f32, b: f32| from_order_key(order_key(a).min(order_key(b)));
        let max = |a: f32, b: f32| from_order_key(order_key(a).max(order_key(b)));
        LayerNorms {
            param_sq: self.param_sq + other.param_sq,
            update_sq: self.update_sq + other.update_sq,
            param_min: min(self.param_min, other.param_min),
            param_max: max(self.param_max, other.param_max),
            update_min: min(self.update_min, other.update_min),
            update_max: max(self.update_max, other.update_max),
            param_format: self.param_format.tighter(other.param_format),
        }
    }
}

/// Maps f32 bits to integers in the same order as the values, with −NaN below −∞ and +NaN
/// above +∞ (the order of `f32::total_cmp`), so that integer min/max, which vectorize and
/// are exact, find the range of a set of floats.
#[inline(always)]
pub(crate) fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    b ^ (((b as i32) >> 31) as u32 | 0x8000_0000)
}

/// The inverse of [`order_key`].
#[inline(always)]
pub(crate) fn from_order_key(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k ^ 0x8000_0000
    } else {
        !k
    })
}

/// The [`order_key`] of +0.
pub(crate) const ZERO_KEY: u32 = 0x8000_0000;

#[cfg(test)]
mod tests {
    use super::{ZERO_KEY, from_order_key, order_key};

    /// The keys order floats as their values (−NaN < −∞ < … < −0 < +0 < … < +∞ < +NaN, the
    /// order of `total_cmp`) and map back to the same bits.
    #[test]
    fn order_keys_sort_like_the_values() {
        let special = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            1e-45,
        ];
        let mut s = 0x9e37_79b9u32;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            f32::from_bits(s)
        };
        for k in 0..200_000 {
            let a = if k < special.len() {
                special[k]
            } else {
                next()
            };
            let b = next();
            assert_eq!(
                order_key(a).cmp(&order_key(b)),
                a.total_cmp(&b),
                "{a:e} {b:e}"
            );
            assert_eq!(from_order_key(order_key(a)).to_bits(), a.to_bits());
        }
        assert_eq!(order_key(0.0), ZERO_KEY);
        assert!(order_key(-0.0) < ZERO_KEY);
    }
}
