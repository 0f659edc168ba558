//! The per-layer LAMB step, split into its two phases.
//!
//! Phase 1, [`Backend::norms`]: reads g, m, v, p and accumulates ‖p‖² and ‖u‖² (the new
//! moments and u are computed in registers, never stored). Phase 2, [`Backend::apply`]:
//! recomputes the same m, v, u bit for bit and writes m, v and p.
//!
//! DESIGN.md writes the moments in phase 1 (40 B/element). Here phase 1 writes nothing
//! (16 B read, then 16 B read + 12 B written = 44 B/element). The default non-finite policy
//! must refuse a step *before* writing anything, which DESIGN's plan can only do with an
//! extra read of g (also 44 B); writing nothing in phase 1 gets the same traffic and also
//! catches what a gradient check cannot see: a NaN already in m, v or p, or an update that
//! overflows. A layer is never half-applied.

use crate::config::{BiasCorrection, EpsMode, LambConfig, NonFinite, RatioRule};
use crate::dispatch::Backend;
use crate::error::{Buffer, Field, LambError};
use crate::fpenv::{DefaultFpMode, in_default_mode};
use crate::layer::{Grads, Moments, ParamFormat, Params};
use core::hint::black_box;

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
    /// for mixed precision.
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
        let inv_bias = |beta: f64| -> f32 {
            match config.bias_correction {
                BiasCorrection::Off => 1.0,
                BiasCorrection::F64 => (1.0 / (1.0 - libm::pow(beta, t))) as f32,
                BiasCorrection::F32 => {
                    // f32(β)^t rounded to f32 (f64 pow of an f32 base is exact to well under
                    // half an f32 ulp), then 1 − that in f32, as optax's f32 arithmetic does.
                    let pow = libm::pow(beta as f32 as f64, t) as f32;
                    1.0 / (1.0 - pow)
                }
            }
        };
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

/// Sums of squares of one layer (or one block), accumulated in f64, and for parameters
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

/// What a layer's step did (or will do, from [`LayerReport::plan`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerReport {
    /// ‖p‖ before the step.
    pub param_norm: f32,
    /// ‖u‖.
    pub update_norm: f32,
    /// The trust ratio r used (1 where adaptation is off or a norm is zero).
    pub trust_ratio: f32,
    /// `lr · r`, the factor applied to u.
    pub step_size: f32,
    /// The step was refused for a non-finite value; nothing was written.
    pub skipped: bool,
}

impl LayerReport {
    /// Decides the trust ratio and step size from phase 1's sums. A non-finite norm or step
    /// size marks the layer skipped, and so does a step that could take a new parameter
    /// past the range of f32 or of the format it is stored in ([`LayerNorms::param_format`]).
    ///
    /// ```
    /// use lamb_core::{LambConfig, LayerNorms, LayerReport};
    /// let cfg = LambConfig { lr: 0.5, ..LambConfig::paper() };
    /// let norms = LayerNorms { param_sq: 16.0, update_sq: 4.0, ..LayerNorms::default() };
    /// let r = LayerReport::plan(&cfg, norms);
    /// assert_eq!((r.trust_ratio, r.step_size, r.skipped), (2.0, 1.0, false));
    /// let zero = LayerReport::plan(&cfg, LayerNorms { param_sq: 0.0, ..norms });
    /// assert_eq!(zero.trust_ratio, 1.0);
    /// ```
    pub fn plan(config: &LambConfig, norms: LayerNorms) -> LayerReport {
        in_default_mode((config, norms), |(c, n)| Self::compute(c, n))
    }

    /// [`LayerReport::plan`], in the default floating-point mode.
    fn compute(config: &LambConfig, norms: LayerNorms) -> LayerReport {
        let pn = libm::sqrt(norms.param_sq);
        let un = libm::sqrt(norms.update_sq);
        let ratio = if !config.adapts() {
            1.0
        } else {
            let phi = pn.max(config.param_norm_min).min(config.param_norm_max);
            let r = match config.ratio_rule {
                RatioRule::ZeroNormIsOne if pn == 0.0 || un == 0.0 => 1.0,
                RatioRule::ZeroNormIsOne => phi / un,
                RatioRule::EpsDenominator => phi / (un + config.eps),
            };
            r.max(config.ratio_min).min(config.ratio_max)
        };
        let step_size = (config.lr * ratio) as f32;
        // Every new parameter is |p − s·u| ≤ ‖p‖ + s·‖u‖; if that bound (with room for the
        // f32 roundings) is finite in f32, no parameter can overflow. Otherwise the step
        // would write ±inf: refuse it like any other non-finite step.
        let bound = pn + step_size as f64 * un;
        let fits = bound <= f32::MAX as f64 * (1.0 - 1.0 / 65536.0);
        let skipped = !(pn.is_finite()
            && un.is_finite()
            && step_size.is_finite()
            && fits
            && fits_format(&norms, step_size));
        LayerReport {
            param_norm: pn as f32,
            update_norm: un as f32,
            trust_ratio: ratio as f32,
            step_size,
            skipped,
        }
    }
}

/// Whether every new parameter `p − s·u`, computed in f32 and rounded to the layer's
/// storage format, is finite there. A bound on the L2 norm would refuse big half-precision
/// layers of small weights, so this uses the ranges of p and u: the kernel computes
/// `fl(p − fl(s·u))` with `s >= 0`, and since rounding to nearest is monotonic, that lies
/// between `fl(min p − fl(s·max u))` and `fl(max p − fl(s·min u))`, computed here with the
/// same f32 operations. If both are within the format's finite range, so is every new
/// value. (The signed ranges, unlike a bound on |p| + s·|u|, let weights at the top of
/// the range that weight decay pulls down keep stepping.)
fn fits_format(norms: &LayerNorms, step_size: f32) -> bool {
    match norms.param_format.finite_limit() {
        None => true,
        Some(limit) => {
            let high = norms.param_max - step_size * norms.update_min;
            let low = norms.param_min - step_size * norms.update_max;
            // NaN (from a NaN in p or u) compares false.
            high <= limit && low >= -limit
        }
    }
}

/// Checks that the four buffers of a layer have the parameter's length.
pub(crate) fn check_lengths(p: usize, g: usize, m: usize, v: usize) -> Result<(), LambError> {
    for (buffer, len) in [
        (Buffer::Grad, g),
        (Buffer::ExpAvg, m),
        (Buffer::ExpAvgSq, v),
    ] {
        if len != p {
            return Err(LambError::LengthMismatch {
                layer: 0,
                buffer,
                expected: p,
                found: len,
            });
        }
    }
    Ok(())
}

/// One LAMB step of one layer on the fastest backend of this CPU.
///
/// On any `Err`, and on a skipped step, `param`, `m` and `v` are untouched.
///
/// ```
/// use lamb_core::{step_layer, LambConfig};
/// let cfg = LambConfig::paper();
/// let mut p = [1.0f32, -2.0, 3.0];
/// let g = [0.1f32, 0.2, -0.3];
/// let (mut m, mut v) = ([0.0f32; 3], [0.0f32; 3]);
/// let report = step_layer(&cfg, 1, &mut p, &g, &mut m, &mut v).unwrap();
/// assert!(!report.skipped);
/// assert!(p[0] < 1.0 && p[2] > 3.0 - 1e-2);
///
/// // A NaN gradient skips the step and writes nothing.
/// let before = p;
/// let report = step_layer(&cfg, 2, &mut p, &[f32::NAN, 0.0, 0.0], &mut m, &mut v).unwrap();
/// assert!(report.skipped);
/// assert_eq!(p, before);
/// ```
pub fn step_layer(
    config: &LambConfig,
    step: u64,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) -> Result<LayerReport, LambError> {
    Backend::detect().step_layer(config, step, 1.0, param, grad, m, v)
}

impl Backend {
    /// One LAMB step of one layer on this backend, with gradients scaled by `grad_scale`
    /// (1 for none). See [`step_layer`].
    #[allow(clippy::too_many_arguments)]
    pub fn step_layer(
        self,
        config: &LambConfig,
        step: u64,
        grad_scale: f32,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) -> Result<LayerReport, LambError> {
        let _mode = DefaultFpMode::enter();
        let scalars = StepScalars::new(config, step, grad_scale)?;
        let norms = self.norms(&scalars, param, grad, m, v)?;
        let report = LayerReport::plan(config, norms);
        if report.skipped {
            return match config.non_finite {
                NonFinite::Skip => Ok(report),
                NonFinite::Error => Err(LambError::NonFinite { layer: 0 }),
            };
        }
        self.apply(&scalars, report.step_size, param, grad, m, v)?;
        Ok(report)
    }

    /// Phase 1 over a whole layer: Σp² and Σu², block sums added in block order.
    ///
    /// ```
    /// use lamb_core::{Backend, LambConfig, StepScalars};
    /// let s = StepScalars::new(&LambConfig::paper(), 1, 1.0).unwrap();
    /// let n = Backend::Scalar.norms(&s, &[3.0, 4.0], &[1.0, 1.0], &[0.0; 2], &[0.0; 2]).unwrap();
    /// assert_eq!(n.param_sq, 25.0);
    /// ```
    pub fn norms(
        self,
        scalars: &StepScalars,
        param: &[f32],
        grad: &[f32],
        m: &[f32],
        v: &[f32],
    ) -> Result<LayerNorms, LambError> {
        let _mode = DefaultFpMode::enter();
        check_lengths(param.len(), grad.len(), m.len(), v.len())?;
        let k = self.kernels()?;
        let mut total = LayerNorms::default();
        for start in (0..param.len()).step_by(crate::BLOCK) {
            let r = start..(start + crate::BLOCK).min(param.len());
            // SAFETY: `kernels()` checked that this CPU supports the backend; the four
            // sub-slices have the same range of equal-length slices.
            let block = unsafe {
                (k.block_norms)(
                    scalars,
                    &param[r.clone()],
                    &grad[r.clone()],
                    &m[r.clone()],
                    &v[r],
                )
            };
            total = total + block;
        }
        Ok(black_box(total))
    }

    /// Phase 1 over a block-aligned chunk of a layer, one [`LayerNorms`] per block of
    /// [`BLOCK`](crate::BLOCK) elements written to `out` (which must hold
    /// `param.len().div_ceil(BLOCK)` entries). Adding `out` in order gives exactly
    /// [`Backend::norms`] of the whole layer, however the layer was cut into chunks,
    /// provided every chunk but the last has a multiple of `BLOCK` elements.
    pub fn norms_blocks(
        self,
        scalars: &StepScalars,
        param: &[f32],
        grad: &[f32],
        m: &[f32],
        v: &[f32],
        out: &mut [LayerNorms],
    ) -> Result<(), LambError> {
        let _mode = DefaultFpMode::enter();
        check_lengths(param.len(), grad.len(), m.len(), v.len())?;
        let blocks = param.len().div_ceil(crate::BLOCK);
        if out.len() < blocks {
            return Err(LambError::LengthMismatch {
                layer: 0,
                buffer: Buffer::Param,
                expected: out.len() * crate::BLOCK,
                found: param.len(),
            });
        }
        let k = self.kernels()?;
        for (b, slot) in out.iter_mut().take(blocks).enumerate() {
            let r = b * crate::BLOCK..((b + 1) * crate::BLOCK).min(param.len());
            // SAFETY: as in `norms`.
            *slot = unsafe {
                (k.block_norms)(
                    scalars,
                    &param[r.clone()],
                    &grad[r.clone()],
                    &m[r.clone()],
                    &v[r],
                )
            };
        }
        Ok(())
    }

    /// Phase 2: recomputes m, v and u exactly as phase 1 did and writes
    /// `m`, `v` and `p − step_size·u`.
    pub fn apply(
        self,
        scalars: &StepScalars,
        step_size: f32,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) -> Result<(), LambError> {
        let _mode = DefaultFpMode::enter();
        check_lengths(param.len(), grad.len(), m.len(), v.len())?;
        let k = self.kernels()?;
        // SAFETY: `kernels()` checked that this CPU supports the backend; the lengths are equal.
        unsafe { (k.apply)(scalars, step_size, param, grad, m, v) };
        Ok(())
    }

    /// Σx² in f64 with the fixed block/lane order, e.g. for a global gradient norm.
    ///
    /// ```
    /// assert_eq!(lamb_core::Backend::Scalar.sum_squares(&[3.0, 4.0]), Ok(25.0));
    /// ```
    pub fn sum_squares(self, x: &[f32]) -> Result<f64, LambError> {
        let _mode = DefaultFpMode::enter();
        let k = self.kernels()?;
        Ok(black_box(x.chunks(crate::BLOCK).fold(0.0, |acc, block| {
            // SAFETY: `kernels()` checked that this CPU supports the backend.
            acc + unsafe { (k.block_sum_squares)(block) }
        })))
    }
}

/// Steps and phases of layers in compact storage ([`crate::layer`]).
impl Backend {
    /// One LAMB step of a layer in compact storage; see [`Backend::step_layer`]. The trust
    /// ratio is exact LAMB on the decoded values; on any `Err` or skip nothing is written.
    ///
    /// ```
    /// use half::bf16;
    /// use lamb_core::{Backend, LambConfig};
    /// use lamb_core::codec::QBLOCK;
    /// use lamb_core::layer::{CompactLayer, Grads, Moments, Params, Rounding};
    ///
    /// let n = 1000;
    /// let mut p = vec![bf16::from_f32(0.5); n];
    /// let g = vec![bf16::from_f32(0.01); n];
    /// let (mut m, mut v) = (vec![0u8; n], vec![0u8; n]);
    /// let (mut ms, mut vs) = (vec![0.0f32; n.div_ceil(QBLOCK)], vec![0.0f32; n.div_ceil(QBLOCK)]);
    /// let mut layer = CompactLayer {
    ///     params: Params::Bf16 { data: &mut p, rounding: Rounding::Stochastic { seed: 42 } },
    ///     grads: Grads::Bf16(&g),
    ///     moments: Moments::Q8 { m: &mut m, v: &mut v, m_absmax: &mut ms, v_absmax: &mut vs },
    /// };
    /// let cfg = LambConfig { lr: 0.01, ..LambConfig::paper() };
    /// let r = Backend::detect().step_layer_compact(&cfg, 1, 1.0, &mut layer)?;
    /// assert!(!r.skipped);
    /// assert!(p.iter().all(|x| x.to_f32() < 0.5));
    /// # Ok::<(), lamb_core::LambError>(())
    /// ```
    pub fn step_layer_compact(
        self,
        config: &LambConfig,
        step: u64,
        grad_scale: f32,
        layer: &mut crate::layer::CompactLayer<'_>,
    ) -> Result<LayerReport, LambError> {
        let _mode = DefaultFpMode::enter();
        let scalars = StepScalars::new(config, step, grad_scale)?;
        let norms = self.norms_compact(&scalars, layer)?;
        let report = LayerReport::plan(config, norms);
        if report.skipped {
            return match config.non_finite {
                NonFinite::Skip => Ok(report),
                NonFinite::Error => Err(LambError::NonFinite { layer: 0 }),
            };
        }
        self.apply_compact(&scalars, report.step_size, layer, 0)?;
        Ok(report)
    }

    /// Phase 1 of a compact layer: Σp² and Σu², blocks added in order.
    pub fn norms_compact(
        self,
        scalars: &StepScalars,
        layer: &crate::layer::CompactLayer<'_>,
    ) -> Result<LayerNorms, LambError> {
        let _mode = DefaultFpMode::enter();
        if let Some((p, g, m, v)) = all_f32(layer) {
            return self.norms(scalars, p, g, m, v);
        }
        let n = layer.check()?;
        let k = self.kernels()?;
        let mut total = LayerNorms::default();
        for at in (0..n).step_by(crate::BLOCK) {
            // SAFETY: `kernels()` checked CPU support; `check()` checked that every buffer
            // has `n` elements, so the block `[at, at + len)` is in bounds.
            total = total
                + unsafe {
                    (k.mixed_block_norms)(
                        scalars,
                        &layer.params,
                        &layer.grads,
                        &layer.moments,
                        at,
                        crate::BLOCK.min(n - at),
                    )
                };
        }
        Ok(black_box(total))
    }

    /// Phase 1 of a compact layer (or a block-aligned piece of one), one entry per block.
    /// See [`Backend::norms_blocks`].
    pub fn norms_blocks_compact(
        self,
        scalars: &StepScalars,
        layer: &crate::layer::CompactLayer<'_>,
        out: &mut [LayerNorms],
    ) -> Result<(), LambError> {
        let _mode = DefaultFpMode::enter();
        if let Some((p, g, m, v)) = all_f32(layer) {
            return self.norms_blocks(scalars, p, g, m, v, out);
        }
        let n = layer.check()?;
        let k = self.kernels()?;
        let blocks = n.div_ceil(crate::BLOCK);
        if out.len() < blocks {
            return Err(LambError::LengthMismatch {
                layer: 0,
                buffer: Buffer::Param,
                expected: out.len() * crate::BLOCK,
                found: n,
            });
        }
        for (b, slot) in out.iter_mut().take(blocks).enumerate() {
            let at = b * crate::BLOCK;
            // SAFETY: as in `norms_compact`.
            *slot = unsafe {
                (k.mixed_block_norms)(
                    scalars,
                    &layer.params,
                    &layer.grads,
                    &layer.moments,
                    at,
                    crate::BLOCK.min(n - at),
                )
            };
        }
        Ok(())
    }

    /// Phase 2 of a compact layer. `index0` is the index in the whole layer of this
    /// (piece of a) layer's element 0, used by stochastic rounding; 0 for a whole layer.
    pub fn apply_compact(
        self,
        scalars: &StepScalars,
        step_size: f32,
        layer: &mut crate::layer::CompactLayer<'_>,
        index0: usize,
    ) -> Result<(), LambError> {
        let _mode = DefaultFpMode::enter();
        if let crate::layer::CompactLayer {
            params: Params::F32(p),
            grads: Grads::F32(g),
            moments: Moments::F32 { m, v },
        } = layer
        {
            return self.apply(scalars, step_size, p, g, m, v);
        }
        layer.check()?;
        let k = self.kernels()?;
        // SAFETY: `kernels()` checked CPU support; `check()` checked all lengths.
        unsafe {
            (k.mixed_apply)(
                scalars,
                step_size,
                &mut layer.params,
                &layer.grads,
                &mut layer.moments,
                index0,
            )
        };
        Ok(())
    }

    /// Σg² of gradients in any storage, with the fixed block/lane order.
    ///
    /// ```
    /// use lamb_core::{Backend, layer::Grads};
    /// let g = [half::f16::from_f32(3.0), half::f16::from_f32(4.0)];
    /// assert_eq!(Backend::Scalar.sum_squares_grads(&Grads::F16(&g)), Ok(25.0));
    /// ```
    pub fn sum_squares_grads(self, grads: &crate::layer::Grads<'_>) -> Result<f64, LambError> {
        let _mode = DefaultFpMode::enter();
        let k = self.kernels()?;
        let n = grads.len();
        let mut total = 0.0;
        for at in (0..n).step_by(crate::BLOCK) {
            // SAFETY: `kernels()` checked CPU support; the block is inside `grads`.
            total += unsafe { (k.mixed_block_sum_squares)(grads, at, crate::BLOCK.min(n - at)) };
        }
        Ok(black_box(total))
    }
}

/// p, g, m, v of an all-f32 layer.
type F32Rows<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32]);

/// The buffers of an all-f32 compact layer: the f32 kernels serve it directly (the compact
/// path would compute the same bits, a few percent slower).
fn all_f32<'a>(layer: &'a crate::layer::CompactLayer<'_>) -> Option<F32Rows<'a>> {
    match layer {
        crate::layer::CompactLayer {
            params: Params::F32(p),
            grads: Grads::F32(g),
            moments: Moments::F32 { m, v },
        } => Some((p, g, m, v)),
        _ => None,
    }
}

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
