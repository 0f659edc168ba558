//! The decision between the two phases of a layer's step: from phase 1's sums
//! ([`LayerNorms`]), the trust ratio, the step size, and whether the step is refused.
//!
//! Phase 1 writes nothing, so a refused step leaves the layer as it was: the plan refuses a
//! step whose norms are not finite (a NaN or infinity anywhere in g, m, v, p or u, or an
//! update that overflows) and a step that could take a parameter past the range of f32 or
//! of the format it is stored in.

use crate::config::{LambConfig, RatioRule};
use crate::fpenv::in_default_mode;
use crate::scalars::LayerNorms;

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
