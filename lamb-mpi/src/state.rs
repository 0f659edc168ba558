//! [`PieceState`]: the optimizer state of one rank's piece of one layer (moments in the
//! layer's format, 8-bit scales, master copy), laid out as lamb-std lays out the whole
//! layer's, so that a piece's buffers are the layer's buffers from the piece's start.

use lamb_std::lamb_core::codec::QBLOCK;
use lamb_std::lamb_core::half::bf16;
use lamb_std::lamb_core::layer::{Moments, Rounding};
use lamb_std::{Precision, StateFormat, StateView};

/// A piece's moments, in its layer's format.
#[derive(Debug)]
pub(crate) enum PieceMoments {
    F32 {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    Bf16 {
        m: Vec<bf16>,
        v: Vec<bf16>,
    },
    Q8 {
        m: Vec<u8>,
        v: Vec<u8>,
        m_absmax: Vec<f32>,
        v_absmax: Vec<f32>,
    },
}

/// One piece's state.
#[derive(Debug)]
pub(crate) struct PieceState {
    pub(crate) moments: PieceMoments,
    /// The f32 master copy of the piece's half-precision parameters, once a step made it.
    pub(crate) master: Option<Vec<f32>>,
}

/// The format lamb-std keeps a layer of `layer_len` elements in (f32 below
/// `compact_min_len`).
pub(crate) fn layer_format(layer_len: usize, precision: &Precision) -> StateFormat {
    if layer_len < precision.compact_min_len {
        StateFormat::F32
    } else {
        precision.moments
    }
}

/// `len` zeros, or the bytes that could not be allocated.
pub(crate) fn zeros<T: Clone + Default>(len: usize) -> Result<Vec<T>, usize> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| len.saturating_mul(size_of::<T>()))?;
    v.resize(len, T::default());
    Ok(v)
}

impl PieceState {
    /// Zeroed state of `len` elements in `format`, or the bytes that could not be
    /// allocated.
    pub(crate) fn new(format: StateFormat, len: usize) -> Result<PieceState, usize> {
        let moments = match format {
            StateFormat::F32 => PieceMoments::F32 {
                m: zeros(len)?,
                v: zeros(len)?,
            },
            StateFormat::Bf16 => PieceMoments::Bf16 {
                m: zeros(len)?,
                v: zeros(len)?,
            },
            StateFormat::Q8 => PieceMoments::Q8 {
                m: zeros(len)?,
                v: zeros(len)?,
                m_absmax: zeros(len.div_ceil(QBLOCK))?,
                v_absmax: zeros(len.div_ceil(QBLOCK))?,
            },
        };
        Ok(PieceState {
            moments,
            master: None,
        })
    }

    /// Bytes of state held (moments, scales, master copy), counted as lamb-std counts them.
    pub(crate) fn bytes(&self) -> usize {
        let moments = match &self.moments {
            PieceMoments::F32 { m, v } => 4 * (m.len() + v.len()),
            PieceMoments::Bf16 { m, v } => 2 * (m.len() + v.len()),
            PieceMoments::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => m.len() + v.len() + 4 * (m_absmax.len() + v_absmax.len()),
        };
        moments + 4 * self.master.as_ref().map_or(0, Vec::len)
    }

    /// The moments as lamb-core's view (`rounding` for bf16 moments) and the master copy.
    pub(crate) fn lend(&mut self, rounding: Rounding) -> (Moments<'_>, Option<&mut [f32]>) {
        let moments = match &mut self.moments {
            PieceMoments::F32 { m, v } => Moments::F32 { m, v },
            PieceMoments::Bf16 { m, v } => Moments::Bf16 { m, v, rounding },
            PieceMoments::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => Moments::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            },
        };
        (moments, self.master.as_deref_mut())
    }

    /// Replaces the moments with elements `start..start + len` of a whole layer's (`start`
    /// a multiple of [`QBLOCK`]; the caller checked the format and lengths).
    pub(crate) fn copy_from_layer(&mut self, layer: StateView<'_>, start: usize) {
        let q = start / QBLOCK;
        match (&mut self.moments, layer) {
            (PieceMoments::F32 { m, v }, StateView::F32 { m: lm, v: lv }) => {
                let n = m.len();
                m.copy_from_slice(&lm[start..start + n]);
                let n = v.len();
                v.copy_from_slice(&lv[start..start + n]);
            }
            (PieceMoments::Bf16 { m, v }, StateView::Bf16 { m: lm, v: lv }) => {
                let n = m.len();
                m.copy_from_slice(&lm[start..start + n]);
                let n = v.len();
                v.copy_from_slice(&lv[start..start + n]);
            }
            (
                PieceMoments::Q8 {
                    m,
                    v,
                    m_absmax,
                    v_absmax,
                },
                StateView::Q8 {
                    m: lm,
                    v: lv,
                    m_absmax: lma,
                    v_absmax: lva,
                },
            ) => {
                let n = m.len();
                m.copy_from_slice(&lm[start..start + n]);
                let n = v.len();
                v.copy_from_slice(&lv[start..start + n]);
                let n = m_absmax.len();
                m_absmax.copy_from_slice(&lma[q..q + n]);
                let n = v_absmax.len();
                v_absmax.copy_from_slice(&lva[q..q + n]);
            }
            // The formats follow from the same model on both sides.
            _ => debug_assert!(false, "state formats differ"),
        }
    }
}

/// A whole layer's state assembled from pieces (on the rank that saves a checkpoint).
pub(crate) struct LayerAssembly {
    pub(crate) moments: PieceMoments,
    pub(crate) master: Option<Vec<f32>>,
}

impl LayerAssembly {
    /// An empty assembly of a layer of `len` elements in `format`.
    pub(crate) fn new(format: StateFormat, len: usize) -> Result<LayerAssembly, usize> {
        let s = PieceState::new(format, len)?;
        Ok(LayerAssembly {
            moments: s.moments,
            master: None,
        })
    }

    /// Writes a piece's state (serialized by [`PieceState::to_bytes`]) at element `start`;
    /// returns the bytes read.
    pub(crate) fn put(&mut self, start: usize, len: usize, bytes: &[u8]) -> Result<usize, usize> {
        let q = start / QBLOCK;
        let mut at = 1;
        let mut take = |n: usize| {
            let s = &bytes[at..at + n];
            at += n;
            s
        };
        match &mut self.moments {
            PieceMoments::F32 { m, v } => {
                read_f32s(&mut m[start..start + len], take(4 * len));
                read_f32s(&mut v[start..start + len], take(4 * len));
            }
            PieceMoments::Bf16 { m, v } => {
                for (d, s) in m[start..start + len]
                    .iter_mut()
                    .zip(take(2 * len).chunks_exact(2))
                {
                    *d = bf16::from_le_bytes([s[0], s[1]]);
                }
                for (d, s) in v[start..start + len]
                    .iter_mut()
                    .zip(take(2 * len).chunks_exact(2))
                {
                    *d = bf16::from_le_bytes([s[0], s[1]]);
                }
            }
            PieceMoments::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => {
                let nq = len.div_ceil(QBLOCK);
                m[start..start + len].copy_from_slice(take(len));
                v[start..start + len].copy_from_slice(take(len));
                read_f32s(&mut m_absmax[q..q + nq], take(4 * nq));
                read_f32s(&mut v_absmax[q..q + nq], take(4 * nq));
            }
        }
        if bytes[0] == 1 {
            let total = match &self.moments {
                PieceMoments::F32 { m, .. } => m.len(),
                PieceMoments::Bf16 { m, .. } => m.len(),
                PieceMoments::Q8 { m, .. } => m.len(),
            };
            if self.master.is_none() {
                self.master = Some(zeros(total)?);
            }
            if let Some(master) = &mut self.master {
                read_f32s(&mut master[start..start + len], take(4 * len));
            }
        }
        Ok(at)
    }

    /// The assembled moments as lamb-std's view.
    pub(crate) fn view(&self) -> StateView<'_> {
        match &self.moments {
            PieceMoments::F32 { m, v } => StateView::F32 { m, v },
            PieceMoments::Bf16 { m, v } => StateView::Bf16 { m, v },
            PieceMoments::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => StateView::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            },
        }
    }
}

impl PieceState {
    /// The state as bytes: a master flag (0 or 1), m, v, the 8-bit scales, the master
    /// copy; little-endian. [`LayerAssembly::put`] reads it back.
    pub(crate) fn to_bytes(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.master.is_some()));
        let f32s =
            |out: &mut Vec<u8>, x: &[f32]| out.extend(x.iter().flat_map(|x| x.to_le_bytes()));
        match &self.moments {
            PieceMoments::F32 { m, v } => {
                f32s(out, m);
                f32s(out, v);
            }
            PieceMoments::Bf16 { m, v } => {
                out.extend(m.iter().flat_map(|x| x.to_le_bytes()));
                out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
            PieceMoments::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => {
                out.extend_from_slice(m);
                out.extend_from_slice(v);
                f32s(out, m_absmax);
                f32s(out, v_absmax);
            }
        }
        if let Some(master) = &self.master {
            f32s(out, master);
        }
    }
}

fn read_f32s(dst: &mut [f32], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

/// The error of a failed allocation of `bytes` for layer `name`'s shard.
pub(crate) fn oom(name: &str, bytes: usize) -> lamb_std::Error {
    lamb_std::Error::OutOfMemory {
        name: name.to_string(),
        what: "sharded state",
        bytes,
    }
}

/// The step's buffers, kept from one step to the next.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Reduce-scatter: N chunks of the largest shard, and this rank's chunk.
    pub(crate) send: Vec<f32>,
    pub(crate) recv: Vec<f32>,
    /// The parameters' all-gather, in 16-bit units (an f32 is two).
    pub(crate) out: Vec<u16>,
    pub(crate) all_params: Vec<u16>,
}
