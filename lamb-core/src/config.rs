//! Hyperparameters, presets and their validation.
//!
//! Hyperparameters are `f64`, as they are Python floats in PyTorch and optax; the kernels
//! compute in `f32` with scalars rounded once, in [`StepScalars::new`](crate::StepScalars::new).
//! Keeping the f64 value is what lets a preset reproduce a framework's arithmetic exactly
//! (timm computes `1 - beta2**t` from the double `0.999`, optax from the f32 `0.999`).

use crate::error::{Field, LambError};

/// Where ε enters the Adam denominator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum EpsMode {
    /// `m̂ / (√v̂ + ε)`: optax, timm, apex, the paper.
    #[default]
    OutsideSqrt,
    /// `m̂ / √(v̂ + ε)`: some TensorFlow ports.
    InsideSqrt,
}

/// How the bias corrections `1 − β^t` are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum BiasCorrection {
    /// No bias correction (`m̂ = m`, `v̂ = v`).
    Off,
    /// `1 − β^t` in f64 from the f64 β, as PyTorch optimizers (timm) do in Python.
    #[default]
    F64,
    /// `1 − f32(β)^t` in f32, as optax does (`1 - decay**count` on an f32 array).
    F32,
}

/// Which layers get the layer-wise trust ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Adaptation {
    /// Every layer (optax, NVLAMB, the paper).
    #[default]
    Always,
    /// Only layers with `weight_decay != 0` (timm's and apex's default, `always_adapt=False` /
    /// `use_nvlamb=False`).
    WhenDecayed,
    /// None: `r = 1`, which makes the step AdamW.
    Never,
}

/// The formula of the trust ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum RatioRule {
    /// `r = φ(‖p‖) / ‖u‖`, and `r = 1` where `‖p‖ = 0` or `‖u‖ = 0` (every real implementation).
    #[default]
    ZeroNormIsOne,
    /// `r = φ(‖p‖) / (‖u‖ + ε)`, no zero-norm rule: a zero tensor never moves
    /// ([`LambConfig::seed`]).
    EpsDenominator,
}

/// What a step does when a gradient, moment, parameter or update is NaN or infinite.
/// Either way nothing is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum NonFinite {
    /// Return `Ok` with the report marked skipped (the loss-scaling convention).
    #[default]
    Skip,
    /// Return [`LambError::NonFinite`].
    Error,
}

/// LAMB hyperparameters for one layer or parameter group.
///
/// The step (per element, f32, in this order; see
/// [the crate docs](crate#same-bits-everywhere)):
/// ```text
/// g  = g·c                       c: grad_scale (clipping × 1/loss_scale), 1 by default
/// m  = β1·m + β3·g               β3 = 1−β1, or 1 with grad_averaging off
/// v  = β2·v + (1−β2)·g²
/// u  = (m/bc1) / (√(v/bc2) + ε) + λ·p
/// r  = clamp(φ(‖p‖)/‖u‖, ratio_min, ratio_max),  φ(z) = clamp(z, param_norm_min, param_norm_max)
/// p  = p − (η·r)·u
/// ```
///
/// ```
/// use lamb_core::LambConfig;
/// let cfg = LambConfig { lr: 2e-3, weight_decay: 0.01, ..LambConfig::default() };
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LambConfig {
    /// Learning rate η, `>= 0`.
    pub lr: f64,
    /// First-moment decay β1 in `[0, 1)`, and below 1 once rounded to f32.
    pub beta1: f64,
    /// Second-moment decay β2 in `[0, 1)`, and below 1 once rounded to f32.
    pub beta2: f64,
    /// ε, `> 0` (and not 0 once rounded to f32).
    pub eps: f64,
    /// Where ε enters the denominator.
    pub eps_mode: EpsMode,
    /// Decoupled weight decay λ, `>= 0`, added to the update before the trust ratio.
    pub weight_decay: f64,
    /// How `1 − β^t` is computed, or off.
    pub bias_correction: BiasCorrection,
    /// `true`: `m = β1·m + (1−β1)·g`; `false`: `m = β1·m + g` (apex/timm `grad_averaging`).
    pub grad_averaging: bool,
    /// Which layers get the trust ratio.
    pub adaptation: Adaptation,
    /// The trust-ratio formula.
    pub ratio_rule: RatioRule,
    /// Lower bound of φ, the clamp applied to ‖p‖ (0 = none).
    pub param_norm_min: f64,
    /// Upper bound of φ (`f64::INFINITY` = none).
    pub param_norm_max: f64,
    /// Lower clamp of the ratio itself (0 = none).
    pub ratio_min: f64,
    /// Upper clamp of the ratio itself (`f64::INFINITY` = none; timm's `trust_clip` is 1).
    pub ratio_max: f64,
    /// What to do with non-finite values.
    pub non_finite: NonFinite,
}

impl Default for LambConfig {
    /// The library default: [`LambConfig::paper`] with decoupled weight decay 0.01 and the
    /// zero-norm rule, so zero-initialised tensors (biases) move.
    fn default() -> Self {
        Self::paper()
    }
}

impl LambConfig {
    /// The LAMB paper (You et al. 2019, "Large Batch Optimization for Deep Learning",
    /// Algorithm 2): β = (0.9, 0.999), ε = 1e-6 outside the square root, λ = 0.01, exact
    /// bias correction, φ the identity, trust ratio on every layer. The paper leaves
    /// `0/0` undefined; like every implementation this uses `r = 1` there. `lr = 1e-3`.
    ///
    /// ```
    /// let cfg = lamb_core::LambConfig::paper();
    /// assert_eq!((cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay), (0.9, 0.999, 1e-6, 0.01));
    /// ```
    pub const fn paper() -> Self {
        LambConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            eps_mode: EpsMode::OutsideSqrt,
            weight_decay: 0.01,
            bias_correction: BiasCorrection::F64,
            grad_averaging: true,
            adaptation: Adaptation::Always,
            ratio_rule: RatioRule::ZeroNormIsOne,
            param_norm_min: 0.0,
            param_norm_max: f64::INFINITY,
            ratio_min: 0.0,
            ratio_max: f64::INFINITY,
            non_finite: NonFinite::Skip,
        }
    }

    /// `optax.lamb` (optax `_src/alias.py`: `scale_by_adam` → `add_decayed_weights` →
    /// `scale_by_trust_ratio` → `scale_by_learning_rate`), with its defaults
    /// `b1 = 0.9, b2 = 0.999, eps = 1e-6, eps_root = 0, weight_decay = 0`; trust ratio on
    /// every tensor, `r = 1` on a zero norm (`_src/transform.py`), bias correction
    /// `1 - decay**count` in f32 (`_src/numerics.py`/`transform.py`). optax has no default
    /// learning rate; this uses 1e-3.
    ///
    /// ```
    /// use lamb_core::{BiasCorrection, LambConfig};
    /// assert_eq!(LambConfig::optax().bias_correction, BiasCorrection::F32);
    /// ```
    pub const fn optax() -> Self {
        LambConfig {
            weight_decay: 0.0,
            bias_correction: BiasCorrection::F32,
            ..Self::paper()
        }
    }

    /// timm `Lamb` (`timm/optim/lamb.py`) with its defaults: `lr = 1e-3`,
    /// `betas = (0.9, 0.999)`, `eps = 1e-6`, `weight_decay = 0.01`, `grad_averaging = True`,
    /// `trust_clip = False`, `always_adapt = False` (so the trust ratio only on tensors with
    /// weight decay), bias correction in Python doubles. timm's `max_grad_norm = 1.0` global
    /// clipping is a whole-model operation: pass it as the `grad_scale` of
    /// [`StepScalars::new`](crate::StepScalars::new) (lamb-std does this for you).
    ///
    /// ```
    /// use lamb_core::{Adaptation, LambConfig};
    /// assert_eq!(LambConfig::timm().adaptation, Adaptation::WhenDecayed);
    /// ```
    pub const fn timm() -> Self {
        LambConfig {
            adaptation: Adaptation::WhenDecayed,
            ..Self::paper()
        }
    }

    /// NVLAMB, i.e. apex `FusedLAMB(..., use_nvlamb=True)` (`apex/optimizers/fused_lamb.py`,
    /// `csrc/multi_tensor_lamb.cu`): `lr = 1e-3`, `betas = (0.9, 0.999)`, `eps = 1e-6`,
    /// `weight_decay = 0.01`, `adam_w_mode = True`, `grad_averaging = True`, trust ratio on
    /// every tensor (`ratio = lr·‖p‖/‖u‖`, `lr` where a norm is 0). Its `max_grad_norm = 1.0`
    /// pre-normalisation is global, like timm's: pass it as `grad_scale`. The betas are the
    /// f32 roundings of 0.9 and 0.999, because apex passes them to its kernel as C++ `float`:
    /// `1 − β2` and `1 − β^t` are then computed from `f32(0.999)`.
    ///
    /// ```
    /// use lamb_core::{Adaptation, LambConfig};
    /// let cfg = LambConfig::nvlamb();
    /// assert_eq!(cfg.adaptation, Adaptation::Always);
    /// assert_eq!(cfg.beta2, 0.999f32 as f64);
    /// ```
    pub const fn nvlamb() -> Self {
        LambConfig {
            beta1: 0.9f32 as f64,
            beta2: 0.999f32 as f64,
            ..Self::paper()
        }
    }

    /// LAMB as first written down for this project: `r = ‖θ‖ / (‖Δ‖ + ε)` with Δ the
    /// bias-corrected Adam update, no weight decay, φ the identity and no zero-norm rule (a
    /// zero tensor never moves). Checked against a NumPy float64 reference of that formula.
    ///
    /// ```
    /// use lamb_core::{LambConfig, RatioRule};
    /// let cfg = LambConfig::seed();
    /// assert_eq!((cfg.ratio_rule, cfg.weight_decay), (RatioRule::EpsDenominator, 0.0));
    /// ```
    pub const fn seed() -> Self {
        LambConfig {
            weight_decay: 0.0,
            ratio_rule: RatioRule::EpsDenominator,
            ..Self::paper()
        }
    }

    /// AdamW on the same kernels: the trust ratio off (`r = 1`), everything else as given.
    ///
    /// ```
    /// let adamw = lamb_core::LambConfig::paper().adamw();
    /// assert_eq!(adamw.adaptation, lamb_core::Adaptation::Never);
    /// ```
    pub const fn adamw(self) -> Self {
        LambConfig {
            adaptation: Adaptation::Never,
            ..self
        }
    }

    /// Checks every hyperparameter; the error names the first bad one and its value.
    ///
    /// ```
    /// use lamb_core::LambConfig;
    /// let cfg = LambConfig { lr: f64::NAN, ..LambConfig::default() };
    /// assert_eq!(cfg.validate().unwrap_err().to_string(), "invalid lr = NaN: must be finite and >= 0");
    /// ```
    pub fn validate(&self) -> Result<(), LambError> {
        crate::fpenv::in_default_mode(self, Self::check)
    }

    /// [`LambConfig::validate`], in the default floating-point mode (`f64 as f32` depends
    /// on the rounding direction and flushing).
    fn check(&self) -> Result<(), LambError> {
        let bad = |field, value, expected| {
            Err(LambError::InvalidHyperparameter {
                field,
                value,
                expected,
            })
        };
        if !(finite_in_f32(self.lr) && self.lr >= 0.0) {
            return bad(Field::Lr, self.lr, "finite and >= 0");
        }
        for (field, beta) in [(Field::Beta1, self.beta1), (Field::Beta2, self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(field, beta, "in [0, 1)");
            }
            // The kernels use f32(β): 0.99999999 rounds to 1.0, the moments would never
            // forget and the f32 bias correction 1 − 1^t would be 0.
            if beta as f32 >= 1.0 {
                return bad(
                    field,
                    beta,
                    "in [0, 1) and below 1 once rounded to f32 (β <= 0.99999994)",
                );
            }
        }
        if !(finite_in_f32(self.eps) && self.eps as f32 > 0.0) {
            return bad(
                Field::Eps,
                self.eps,
                "finite and > 0 (at least 1.4e-45, f32's smallest)",
            );
        }
        if !(finite_in_f32(self.weight_decay) && self.weight_decay >= 0.0) {
            return bad(Field::WeightDecay, self.weight_decay, "finite and >= 0");
        }
        for (lo_field, lo, hi_field, hi) in [
            (
                Field::ParamNormMin,
                self.param_norm_min,
                Field::ParamNormMax,
                self.param_norm_max,
            ),
            (
                Field::RatioMin,
                self.ratio_min,
                Field::RatioMax,
                self.ratio_max,
            ),
        ] {
            if !(lo.is_finite() && lo >= 0.0) {
                return bad(lo_field, lo, "finite and >= 0");
            }
            if hi.is_nan() {
                return bad(hi_field, hi, "a number (infinity for no bound)");
            }
            if lo > hi {
                return Err(LambError::InvalidBounds {
                    lower_field: lo_field,
                    lower: lo,
                    upper: hi,
                });
            }
        }
        Ok(())
    }

    /// Whether this layer gets the trust ratio.
    pub fn adapts(&self) -> bool {
        match self.adaptation {
            Adaptation::Always => true,
            Adaptation::WhenDecayed => self.weight_decay != 0.0,
            Adaptation::Never => false,
        }
    }
}

/// Finite as f64 and still finite once rounded to f32.
fn finite_in_f32(x: f64) -> bool {
    x.is_finite() && (x as f32).is_finite()
}
