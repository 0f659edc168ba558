//! Learning-rate schedules: pure functions of the step, usable without std.

use crate::error::LambError;

/// A multiplier of the base learning rate as a function of the step (counted from 1).
///
/// ```
/// use lamb_core::Schedule;
/// // BERT: linear warmup over 10 steps, then linear decay to 0 at step 100.
/// let s = Schedule::WarmupPoly { warmup: 10, total: 100, power: 1.0, end: 0.0 };
/// assert_eq!(s.factor(5), 0.5);
/// assert_eq!(s.factor(10), 1.0);
/// assert_eq!(s.factor(55), 0.5);
/// assert_eq!(s.factor(100), 0.0);
/// assert_eq!(s.factor(1000), 0.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Schedule {
    /// Always 1.
    #[default]
    Constant,
    /// Linear warmup from 0 to 1 over `warmup` steps, then
    /// `end + (1 − end)·(1 − progress)^power` until `total`, then `end` (BERT's polynomial
    /// decay; `power = 1` is linear).
    WarmupPoly {
        /// Warmup steps (0 for none).
        warmup: u64,
        /// Step at which the decay reaches `end`.
        total: u64,
        /// Decay exponent (> 0).
        power: f64,
        /// Final factor in [0, 1].
        end: f64,
    },
    /// Linear warmup over `warmup` steps, then a half cosine from 1 down to `end` at `total`.
    WarmupCosine {
        /// Warmup steps (0 for none).
        warmup: u64,
        /// Step at which the cosine reaches `end`.
        total: u64,
        /// Final factor in [0, 1].
        end: f64,
    },
}

impl Schedule {
    /// Checks the parameters: `warmup <= total`, `power > 0` and finite, `end` in [0, 1].
    ///
    /// ```
    /// use lamb_core::Schedule;
    /// assert!(Schedule::WarmupCosine { warmup: 10, total: 5, end: 0.0 }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), LambError> {
        crate::fpenv::in_default_mode(self, Self::check)
    }

    /// [`Schedule::validate`], in the default floating-point mode (denormals-are-zero
    /// would compare a subnormal `power` as 0).
    fn check(&self) -> Result<(), LambError> {
        let bad = |what: &'static str, value: f64| Err(LambError::InvalidSchedule { what, value });
        match *self {
            Schedule::Constant => Ok(()),
            Schedule::WarmupPoly {
                warmup,
                total,
                power,
                end,
            } => {
                if warmup > total {
                    return bad("warmup (must be <= total)", warmup as f64);
                }
                if !(power.is_finite() && power > 0.0) {
                    return bad("power (must be finite and > 0)", power);
                }
                if !(0.0..=1.0).contains(&end) {
                    return bad("end (must be in [0, 1])", end);
                }
                Ok(())
            }
            Schedule::WarmupCosine { warmup, total, end } => {
                if warmup > total {
                    return bad("warmup (must be <= total)", warmup as f64);
                }
                if !(0.0..=1.0).contains(&end) {
                    return bad("end (must be in [0, 1])", end);
                }
                Ok(())
            }
        }
    }

    /// The multiplier at `step` (1-based; step 0 is treated as 1): `step / warmup` during
    /// warmup, then the decay with progress `(step − warmup) / (total − warmup)`.
    ///
    /// ```
    /// use lamb_core::Schedule;
    /// let s = Schedule::WarmupCosine { warmup: 10, total: 110, end: 0.1 };
    /// assert_eq!(s.factor(10), 1.0);
    /// assert!((s.factor(60) - 0.55).abs() < 1e-12);
    /// assert!((s.factor(110) - 0.1).abs() < 1e-12);
    /// assert!((s.factor(500) - 0.1).abs() < 1e-12);
    /// ```
    pub fn factor(&self, step: u64) -> f64 {
        crate::fpenv::in_default_mode((self, step), |(s, t)| s.compute(t))
    }

    /// [`Schedule::factor`], in the default floating-point mode.
    fn compute(&self, step: u64) -> f64 {
        let step = step.max(1);
        let warm =
            |warmup: u64| -> Option<f64> { (step <= warmup).then(|| step as f64 / warmup as f64) };
        // Progress through the decay: 0 at the end of warmup, 1 at `total` and after.
        let progress = |warmup: u64, total: u64| -> f64 {
            if total <= warmup {
                return 1.0;
            }
            ((step - warmup) as f64 / (total - warmup) as f64).min(1.0)
        };
        match *self {
            Schedule::Constant => 1.0,
            Schedule::WarmupPoly {
                warmup,
                total,
                power,
                end,
            } => warm(warmup).unwrap_or_else(|| {
                end + (1.0 - end) * libm::pow(1.0 - progress(warmup, total), power)
            }),
            Schedule::WarmupCosine { warmup, total, end } => warm(warmup).unwrap_or_else(|| {
                let c = 0.5 * (1.0 + libm::cos(core::f64::consts::PI * progress(warmup, total)));
                end + (1.0 - end) * c
            }),
        }
    }
}
