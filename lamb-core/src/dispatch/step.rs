//! A whole LAMB step of one layer: [`StepScalars::new`], phase 1, [`LayerReport::plan`],
//! phase 2 (see `phases.rs`). On any `Err`, and on a skipped step, nothing is written.

use super::Backend;
use crate::config::{LambConfig, NonFinite};
use crate::error::LambError;
use crate::fpenv::DefaultFpMode;
use crate::layer::{CompactLayer, F32Layer};
use crate::plan::LayerReport;
use crate::scalars::{LayerNorms, Step, StepScalars};

/// One LAMB step of one layer on the fastest backend of this CPU.
///
/// It builds the step's [`Step`] (the configuration validated, its scalars rounded) in
/// every call; to step several layers, build the `Step` once and call [`Step::layer`],
/// which gives the same bits.
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
    let mut layer = F32Layer { param, grad, m, v };
    Backend::detect().step_layer(config, step, 1.0, &mut layer)
}

impl Step<'_> {
    /// One LAMB step of one layer on the fastest backend of this CPU, with this step's
    /// configuration and scalars; see [`Step`] for an example. The same bits as
    /// [`step_layer`]; on any `Err`, and on a skipped step, nothing is written.
    pub fn layer(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) -> Result<LayerReport, LambError> {
        let mut layer = F32Layer { param, grad, m, v };
        Backend::detect().step_layer_with(self, &mut layer)
    }
}

impl Backend {
    /// One LAMB step of one layer of f32 buffers on this backend, with gradients scaled by
    /// `grad_scale` (1 for none). See [`step_layer`].
    ///
    /// ```
    /// use lamb_core::{Backend, LambConfig, layer::F32Layer};
    /// let (mut p, g, mut m, mut v) = ([1.0f32; 4], [0.5f32; 4], [0.0f32; 4], [0.0f32; 4]);
    /// let mut layer = F32Layer { param: &mut p, grad: &g, m: &mut m, v: &mut v };
    /// for step in 1..=3 {
    ///     let report = Backend::Scalar.step_layer(&LambConfig::paper(), step, 1.0, &mut layer)?;
    ///     assert!(!report.skipped);
    /// }
    /// assert!(p[0] < 1.0);
    /// # Ok::<(), lamb_core::LambError>(())
    /// ```
    pub fn step_layer(
        self,
        config: &LambConfig,
        step: u64,
        grad_scale: f32,
        layer: &mut F32Layer<'_>,
    ) -> Result<LayerReport, LambError> {
        let step = Step::with_grad_scale(config, step, grad_scale)?;
        self.step(&step, layer)
    }

    /// One LAMB step of one layer of f32 buffers on this backend, with a [`Step`] built
    /// once for every layer of the step. The same bits as [`Backend::step_layer`].
    ///
    /// ```
    /// use lamb_core::{Backend, LambConfig, Step, layer::F32Layer};
    /// let (mut p, g, mut m, mut v) = ([1.0f32; 4], [0.5f32; 4], [0.0f32; 4], [0.0f32; 4]);
    /// let config = LambConfig::paper();
    /// let step = Step::new(&config, 1)?;
    /// let mut layer = F32Layer { param: &mut p, grad: &g, m: &mut m, v: &mut v };
    /// assert!(!Backend::Scalar.step_layer_with(&step, &mut layer)?.skipped);
    /// assert!(p[0] < 1.0);
    /// # Ok::<(), lamb_core::LambError>(())
    /// ```
    pub fn step_layer_with(
        self,
        step: &Step<'_>,
        layer: &mut F32Layer<'_>,
    ) -> Result<LayerReport, LambError> {
        self.step(step, layer)
    }

    /// One LAMB step of a layer in compact storage with a prepared [`Step`]; see
    /// [`Backend::step_layer_compact`] and [`Backend::step_layer_with`].
    ///
    /// ```
    /// use half::bf16;
    /// use lamb_core::{Backend, LambConfig, Step};
    /// use lamb_core::layer::{CompactLayer, Grads, Moments, Params, Rounding};
    /// let (mut p, g) = ([bf16::ONE; 4], [bf16::from_f32(0.5); 4]);
    /// let (mut m, mut v) = ([bf16::ZERO; 4], [bf16::ZERO; 4]);
    /// let mut layer = CompactLayer {
    ///     params: Params::Bf16 { data: &mut p, rounding: Rounding::Nearest },
    ///     grads: Grads::Bf16(&g),
    ///     moments: Moments::Bf16 { m: &mut m, v: &mut v, rounding: Rounding::Nearest },
    /// };
    /// let config = LambConfig { lr: 0.1, ..LambConfig::paper() };
    /// let step = Step::new(&config, 1)?;
    /// assert!(!Backend::Scalar.step_layer_compact_with(&step, &mut layer)?.skipped);
    /// assert!(p[0] < bf16::ONE);
    /// # Ok::<(), lamb_core::LambError>(())
    /// ```
    pub fn step_layer_compact_with(
        self,
        step: &Step<'_>,
        layer: &mut CompactLayer<'_>,
    ) -> Result<LayerReport, LambError> {
        self.step(step, layer)
    }

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
        layer: &mut CompactLayer<'_>,
    ) -> Result<LayerReport, LambError> {
        let step = Step::with_grad_scale(config, step, grad_scale)?;
        self.step(&step, layer)
    }

    /// Phase 1, the plan, phase 2 (unless the plan refuses the step).
    fn step(self, step: &Step<'_>, layer: &mut impl Phases) -> Result<LayerReport, LambError> {
        let _mode = DefaultFpMode::enter();
        let (config, scalars) = (step.config(), step.scalars());
        let report = LayerReport::plan(config, layer.norms(self, scalars)?);
        if report.skipped {
            return match config.non_finite {
                NonFinite::Skip => Ok(report),
                NonFinite::Error => Err(LambError::NonFinite {}),
            };
        }
        layer.apply(self, scalars, report.step_size)?;
        Ok(report)
    }
}

/// A view of a whole layer, as the two phases take it.
trait Phases {
    /// Phase 1 of the whole layer.
    fn norms(&self, backend: Backend, s: &StepScalars) -> Result<LayerNorms, LambError>;
    /// Phase 2 of the whole layer.
    fn apply(&mut self, backend: Backend, s: &StepScalars, step_size: f32)
    -> Result<(), LambError>;
}

impl Phases for F32Layer<'_> {
    fn norms(&self, backend: Backend, s: &StepScalars) -> Result<LayerNorms, LambError> {
        backend.norms(s, self.param, self.grad, self.m, self.v)
    }
    fn apply(&mut self, backend: Backend, s: &StepScalars, size: f32) -> Result<(), LambError> {
        backend.apply(s, size, self.param, self.grad, self.m, self.v)
    }
}

impl Phases for CompactLayer<'_> {
    fn norms(&self, backend: Backend, s: &StepScalars) -> Result<LayerNorms, LambError> {
        backend.norms_compact(s, self)
    }
    fn apply(&mut self, backend: Backend, s: &StepScalars, size: f32) -> Result<(), LambError> {
        backend.apply_compact(s, size, self, 0)
    }
}
