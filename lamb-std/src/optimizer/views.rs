//! Borrowed views: [`ParamsIn`] (the model's parameters, as a step takes them) and
//! [`LayerView`] / [`StateView`] (a layer's state, as [`Lamb::layer`](crate::Lamb::layer)
//! shows it), [`StepReport`] (what a step did), and the slots through which one generic
//! step reads the tensors of every entry point. Views hold no state of their own.

use lamb_core::LayerReport;
use lamb_core::half::{bf16, f16};
use lamb_core::layer::Grads;

use super::group::{GroupId, StateFormat};

/// A layer's parameters as the model holds them.
#[derive(Debug)]
pub enum ParamsIn<'a> {
    /// f32, updated in place.
    F32(&'a mut [f32]),
    /// bf16: updated through the f32 master copy, or in place (see [`Precision::master`]).
    Bf16(&'a mut [bf16]),
    /// f16: updated through the f32 master copy.
    F16(&'a mut [f16]),
}

impl ParamsIn<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            ParamsIn::F32(p) => p.len(),
            ParamsIn::Bf16(p) => p.len(),
            ParamsIn::F16(p) => p.len(),
        }
    }

    /// The storage these parameters come in.
    pub fn storage(&self) -> ParamStorage {
        match self {
            ParamsIn::F32(_) => ParamStorage::F32,
            ParamsIn::Bf16(_) => ParamStorage::Bf16,
            ParamsIn::F16(_) => ParamStorage::F16,
        }
    }
}

/// How a layer's parameters are stored by the model: the variant of [`ParamsIn`].
///
/// A layer's storage is fixed by its first applied step (after registration, [`Lamb::reset`]
/// or a checkpoint load): a later step that passes the layer in another storage is refused
/// with [`Error::StorageChanged`], and nothing is written. The optimizer's state for the
/// layer (an f32 master copy of bf16/f16 parameters above all) describes the parameters in
/// that storage; stepping f32 parameters in between would leave the master copy behind, and
/// a later half-precision step would continue from it instead of from the model.
///
/// ```
/// use lamb_std::{Error, Lamb, LayerId, ParamStorage, ParamsIn, lamb_core::{LambConfig, half::bf16, layer::Grads}};
/// let mut opt = Lamb::new(LambConfig::paper())?;
/// opt.add_layer("w", 4)?;
/// assert_eq!(opt.layer(LayerId(0))?.storage, None); // free until the first step
/// let mut w = vec![bf16::from_f32(0.5); 4];
/// let g = vec![bf16::from_f32(0.01); 4];
/// opt.step_mixed(&mut [ParamsIn::Bf16(&mut w)], &[Grads::Bf16(&g)])?;
/// assert_eq!(opt.layer(LayerId(0))?.storage, Some(ParamStorage::Bf16));
///
/// let mut w32 = vec![0.5f32; 4];
/// let e = opt.step(&mut [&mut w32], &[&[0.01; 4]]).unwrap_err();
/// assert!(matches!(e, Error::StorageChanged { fixed: ParamStorage::Bf16, found: ParamStorage::F32, .. }));
/// assert_eq!(w32, [0.5; 4]);
/// # Ok::<(), lamb_std::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamStorage {
    /// [`ParamsIn::F32`].
    F32,
    /// [`ParamsIn::Bf16`].
    Bf16,
    /// [`ParamsIn::F16`].
    F16,
}

impl std::fmt::Display for ParamStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParamStorage::F32 => "f32",
            ParamStorage::Bf16 => "bf16",
            ParamStorage::F16 => "f16",
        })
    }
}

/// A layer's moments as stored, from [`Lamb::layer`].
#[derive(Clone, Copy, Debug)]
pub enum StateView<'a> {
    /// f32.
    F32 {
        /// First moment.
        m: &'a [f32],
        /// Second moment.
        v: &'a [f32],
    },
    /// bf16.
    Bf16 {
        /// First moment.
        m: &'a [bf16],
        /// Second moment.
        v: &'a [bf16],
    },
    /// 8-bit codes and per-block absmax.
    Q8 {
        /// First-moment codes.
        m: &'a [u8],
        /// Second-moment codes.
        v: &'a [u8],
        /// First-moment absmax per block.
        m_absmax: &'a [f32],
        /// Second-moment absmax per block.
        v_absmax: &'a [f32],
    },
}

impl StateView<'_> {
    /// The format the moments are stored in.
    pub fn format(&self) -> StateFormat {
        match self {
            StateView::F32 { .. } => StateFormat::F32,
            StateView::Bf16 { .. } => StateFormat::Bf16,
            StateView::Q8 { .. } => StateFormat::Q8,
        }
    }
}

/// A layer's registration and state, as [`Lamb::layer`](crate::Lamb::layer) shows it.
#[derive(Debug)]
pub struct LayerView<'a> {
    /// Registered name.
    pub name: &'a str,
    /// Number of elements.
    pub len: usize,
    /// Its group.
    pub group: GroupId,
    /// First moment in f32 (empty if the layer stores its state compactly: see `state`).
    pub m: &'a [f32],
    /// Second moment in f32 (empty if compact).
    pub v: &'a [f32],
    /// The moments as stored.
    pub state: StateView<'a>,
    /// The f32 master copy of half-precision parameters, once the first step made it.
    pub master: Option<&'a [f32]>,
    /// The parameters' storage, fixed by the first applied step (`None` before it; see
    /// [`ParamStorage`]).
    pub storage: Option<ParamStorage>,
    /// Norms and ratio of the last applied step (`None` before the first).
    pub last: Option<LayerReport>,
}

/// The layer that made a step skip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedLayer {
    /// Its index.
    pub index: usize,
    /// Its name.
    pub name: String,
}

/// What a call to [`Lamb::step`] did.
///
/// `#[must_use]`: a step can be skipped (`applied == false`, a non-finite value under
/// [`NonFinite::Skip`](lamb_core::NonFinite::Skip), or an overflow under loss
/// scaling) and still return `Ok`, so `opt.step(..)?;` alone would hide it. Read the
/// report, or drop it on purpose with `let _report = ..`.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// use lamb_std::{Lamb, lamb_core::LambConfig};
/// fn train(opt: &mut Lamb, w: &mut [f32], g: &[f32]) -> Result<(), lamb_std::Error> {
///     opt.step(&mut [w], &[g])?; // error: unused `StepReport` that must be used
///     Ok(())
/// }
/// ```
#[must_use = "a step may be skipped (`applied == false`) and still return Ok"]
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step number (1-based) this call took, or would have taken if skipped.
    pub step: u64,
    /// `false` if the step was skipped for a non-finite value; nothing was written then.
    pub applied: bool,
    /// The first layer with a non-finite value, if any.
    pub skipped: Option<SkippedLayer>,
    /// Global L2 norm of the (unscaled) gradients, computed when clipping is on.
    pub grad_norm: Option<f64>,
    /// The factor applied to every gradient element (clipping × inverse loss scale).
    pub grad_scale: f32,
    /// The schedule's learning-rate factor at this step.
    pub lr_factor: f64,
}

/// A layer's parameters as an entry point takes them.
pub(crate) trait ParamSlot {
    /// The parameters, reborrowed.
    fn params_in(&mut self) -> ParamsIn<'_>;
    /// Their storage.
    fn storage(&self) -> ParamStorage;
    /// Their element count.
    fn count(&self) -> usize;
}

impl ParamSlot for &mut [f32] {
    fn params_in(&mut self) -> ParamsIn<'_> {
        ParamsIn::F32(self)
    }
    fn storage(&self) -> ParamStorage {
        ParamStorage::F32
    }
    fn count(&self) -> usize {
        self.len()
    }
}

impl ParamSlot for ParamsIn<'_> {
    fn params_in(&mut self) -> ParamsIn<'_> {
        match self {
            ParamsIn::F32(x) => ParamsIn::F32(x),
            ParamsIn::Bf16(x) => ParamsIn::Bf16(x),
            ParamsIn::F16(x) => ParamsIn::F16(x),
        }
    }
    fn storage(&self) -> ParamStorage {
        ParamsIn::storage(self)
    }
    fn count(&self) -> usize {
        self.len()
    }
}

/// A layer's gradient as an entry point takes it; `None`: the layer is not stepped.
pub(crate) trait GradSlot {
    /// The gradient, if the layer is stepped.
    fn grads(&self) -> Option<Grads<'_>>;
}

impl GradSlot for &[f32] {
    fn grads(&self) -> Option<Grads<'_>> {
        Some(Grads::F32(self))
    }
}

impl GradSlot for Grads<'_> {
    fn grads(&self) -> Option<Grads<'_>> {
        Some(*self)
    }
}

impl GradSlot for Option<Grads<'_>> {
    fn grads(&self) -> Option<Grads<'_>> {
        *self
    }
}
