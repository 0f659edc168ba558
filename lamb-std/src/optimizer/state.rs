//! [`LayerState`]: everything the optimizer keeps for one layer between steps, and the
//! only way to it.
//!
//! A layer's state is its moments m and v in the group's [`StateFormat`] (f32, bf16, or
//! 8-bit codes with per-block absmax scales), the f32 master copy of half-precision
//! parameters once a step made it, and the parameters' storage once an applied step fixed
//! it. The step borrows the moments as lamb-core's [`Moments`] view ([`LayerState::lend`]),
//! [`Lamb::layer`](crate::Lamb::layer) as a [`StateView`], and a checkpoint load replaces
//! them whole ([`LayerState::replace_from`]) after checking everything; nothing else
//! reaches the buffers.

use lamb_core::codec::QBLOCK;
use lamb_core::half::bf16;
use lamb_core::layer::{Moments, Rounding};

use super::group::{Precision, StateFormat};
use super::views::{ParamStorage, ParamsIn, StateView};
use crate::buffer::{Aligned, AlignedBuf, AllocError, Element};

/// One layer's optimizer state. The buffers of the formats other than `format` are empty.
pub(crate) struct LayerState {
    format: StateFormat,
    /// f32 moments ([`StateFormat::F32`]).
    m: AlignedBuf,
    v: AlignedBuf,
    /// bf16 moments ([`StateFormat::Bf16`]).
    m_bf16: Aligned<bf16>,
    v_bf16: Aligned<bf16>,
    /// 8-bit codes and their per-block scales ([`StateFormat::Q8`]).
    m_q8: Aligned<u8>,
    v_q8: Aligned<u8>,
    m_absmax: AlignedBuf,
    v_absmax: AlignedBuf,
    /// The f32 master copy of bf16/f16 parameters, made by the first step that needs it.
    master: Option<AlignedBuf>,
    /// The parameters' storage, fixed by the first applied step (see [`ParamStorage`]).
    storage: Option<ParamStorage>,
}

/// A layer's moments as little-endian bytes in the layer's own [`StateFormat`], checked by
/// the checkpoint reader (lengths, values) before [`LayerState::replace_from`] copies them.
/// `m_absmax` and `v_absmax` are empty except for [`StateFormat::Q8`].
pub(crate) struct StateBytes<'a> {
    pub(crate) m: &'a [u8],
    pub(crate) v: &'a [u8],
    pub(crate) m_absmax: &'a [u8],
    pub(crate) v_absmax: &'a [u8],
}

impl LayerState {
    /// Zeroed state of a layer of `len` elements in `precision`'s format (f32 below
    /// `compact_min_len`), or the failed allocation's size (the buffers allocated before it
    /// are freed).
    pub(crate) fn new(len: usize, precision: &Precision) -> Result<LayerState, AllocError> {
        let format = if len < precision.compact_min_len {
            StateFormat::F32
        } else {
            precision.moments
        };
        fn zeroed<T: Element>(len: usize, used: bool) -> Result<Aligned<T>, AllocError> {
            Aligned::try_zeroed(if used { len } else { 0 })
        }
        let (f32s, halves, q8) = (
            format == StateFormat::F32,
            format == StateFormat::Bf16,
            format == StateFormat::Q8,
        );
        let q = len.div_ceil(QBLOCK);
        Ok(LayerState {
            format,
            m: zeroed(len, f32s)?,
            v: zeroed(len, f32s)?,
            m_bf16: zeroed(len, halves)?,
            v_bf16: zeroed(len, halves)?,
            m_q8: zeroed(len, q8)?,
            v_q8: zeroed(len, q8)?,
            m_absmax: zeroed(q, q8)?,
            v_absmax: zeroed(q, q8)?,
            master: None,
            storage: None,
        })
    }

    /// A deep copy (every buffer, the master copy, the fixed storage), or the size of the
    /// allocation that failed.
    pub(crate) fn try_clone(&self) -> Result<LayerState, AllocError> {
        fn dup<T: Element>(a: &Aligned<T>) -> Result<Aligned<T>, AllocError> {
            let mut b = Aligned::try_zeroed(a.len())?;
            b.copy_from_slice(a);
            Ok(b)
        }
        Ok(LayerState {
            format: self.format,
            m: dup(&self.m)?,
            v: dup(&self.v)?,
            m_bf16: dup(&self.m_bf16)?,
            v_bf16: dup(&self.v_bf16)?,
            m_q8: dup(&self.m_q8)?,
            v_q8: dup(&self.v_q8)?,
            m_absmax: dup(&self.m_absmax)?,
            v_absmax: dup(&self.v_absmax)?,
            master: self.master.as_ref().map(dup).transpose()?,
            storage: self.storage,
        })
    }

    /// Zero moments, no master copy, the parameter storage free again.
    pub(crate) fn reset(&mut self) {
        self.m.fill(0.0);
        self.v.fill(0.0);
        self.m_bf16.fill(bf16::ZERO);
        self.v_bf16.fill(bf16::ZERO);
        self.m_q8.fill(0);
        self.v_q8.fill(0);
        self.m_absmax.fill(0.0);
        self.v_absmax.fill(0.0);
        self.master = None;
        self.storage = None;
    }

    /// The moments as stored.
    pub(crate) fn view(&self) -> StateView<'_> {
        match self.format {
            StateFormat::F32 => StateView::F32 {
                m: &self.m,
                v: &self.v,
            },
            StateFormat::Bf16 => StateView::Bf16 {
                m: &self.m_bf16,
                v: &self.v_bf16,
            },
            StateFormat::Q8 => StateView::Q8 {
                m: &self.m_q8,
                v: &self.v_q8,
                m_absmax: &self.m_absmax,
                v_absmax: &self.v_absmax,
            },
        }
    }

    /// The f32 moments (empty unless the format is f32).
    pub(crate) fn f32_moments(&self) -> (&[f32], &[f32]) {
        (&self.m, &self.v)
    }

    /// The f32 master copy, if the layer has one.
    pub(crate) fn master(&self) -> Option<&[f32]> {
        self.master.as_deref()
    }

    /// The parameters' storage, once fixed.
    pub(crate) fn storage(&self) -> Option<ParamStorage> {
        self.storage
    }

    /// Fixes the parameters' storage (after an applied step).
    pub(crate) fn fix_storage(&mut self, storage: ParamStorage) {
        self.storage = Some(storage);
    }

    /// Bytes of optimizer state this layer holds.
    pub(crate) fn bytes(&self) -> usize {
        4 * (self.m.len() + self.v.len() + self.m_absmax.len() + self.v_absmax.len())
            + 2 * (self.m_bf16.len() + self.v_bf16.len())
            + self.m_q8.len()
            + self.v_q8.len()
            + 4 * self.master.as_ref().map_or(0, |b| b.len())
    }

    /// Makes the f32 master copy of `params` (exact: bf16/f16 → f32). The master then
    /// equals the model, so making it changes nothing the next step reads. On an allocation
    /// failure nothing changes.
    pub(crate) fn make_master(&mut self, params: &ParamsIn<'_>) -> Result<(), AllocError> {
        let mut b = AlignedBuf::try_zeroed(params.len())?;
        match params {
            ParamsIn::F32(x) => b.copy_from_slice(x),
            ParamsIn::Bf16(x) => b
                .iter_mut()
                .zip(x.iter())
                .for_each(|(o, h)| *o = h.to_f32()),
            ParamsIn::F16(x) => b
                .iter_mut()
                .zip(x.iter())
                .for_each(|(o, h)| *o = h.to_f32()),
        }
        self.master = Some(b);
        Ok(())
    }

    /// Drops the master copy (one made for a step that was not applied: the next step must
    /// start from the model's values, not these).
    pub(crate) fn drop_master(&mut self) {
        self.master = None;
    }

    /// Lends the moments (as lamb-core's view; `rounding` applies to bf16 moments) and the
    /// master copy to one step.
    pub(crate) fn lend(&mut self, rounding: Rounding) -> (Moments<'_>, Option<&mut [f32]>) {
        let moments = match self.format {
            StateFormat::F32 => Moments::F32 {
                m: &mut self.m,
                v: &mut self.v,
            },
            StateFormat::Bf16 => Moments::Bf16 {
                m: &mut self.m_bf16,
                v: &mut self.v_bf16,
                rounding,
            },
            StateFormat::Q8 => Moments::Q8 {
                m: &mut self.m_q8,
                v: &mut self.v_q8,
                m_absmax: &mut self.m_absmax,
                v_absmax: &mut self.v_absmax,
            },
        };
        (moments, self.master.as_deref_mut())
    }

    /// Replaces the whole state with a checkpoint's: the moments from `moments` (zeros for
    /// `None`), the master copy with `master`; the parameter storage is free again, to be
    /// fixed by the next applied step (a checkpoint does not record it). The caller checked
    /// that `moments` has this layer's format and lengths. A master copy, if one is left,
    /// is of bf16 or f16 parameters, and a step then refuses f32 ones
    /// ([`Error::MasterNeedsHalf`](crate::Error::MasterNeedsHalf)).
    pub(crate) fn replace_from(
        &mut self,
        moments: Option<StateBytes<'_>>,
        master: Option<AlignedBuf>,
    ) {
        match moments {
            None => self.reset(),
            Some(src) => match self.format {
                StateFormat::F32 => {
                    self.m.copy_from_le_bytes(src.m);
                    self.v.copy_from_le_bytes(src.v);
                }
                StateFormat::Bf16 => {
                    self.m_bf16.copy_from_le_bytes(src.m);
                    self.v_bf16.copy_from_le_bytes(src.v);
                }
                StateFormat::Q8 => {
                    self.m_q8.copy_from_le_bytes(src.m);
                    self.v_q8.copy_from_le_bytes(src.v);
                    self.m_absmax.copy_from_le_bytes(src.m_absmax);
                    self.v_absmax.copy_from_le_bytes(src.v_absmax);
                }
            },
        }
        self.master = master;
        self.storage = None;
    }
}
