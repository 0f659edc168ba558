//! Phases 1 and 2 over compact storage ([`crate::layer`]), generic over the backend.
//!
//! Work goes in chunks of [`QBLOCK`] elements: decode the chunk of p, g, m and v into f32
//! stack buffers (f32 buffers are used in place, see the views below), run the very same
//! f32 row code as the all-f32 kernels over them ([`NormAcc::add`], [`simd::apply`]), then
//! encode the results back with the codecs of [`crate::codec`]. Which codec runs is a
//! `match` per chunk, not per element, so one instantiation per backend serves every
//! combination of storage types. The codecs are exact integer/bit operations (or exactly
//! rounded conversions), so the bits do not depend on the backend.

use super::simd::{self, HalfConv, NormAcc, Simd};
use crate::codec::{
    M_STREAM, QBLOCK, V_STREAM, bf16_to_f32, f32_to_bf16, f32_to_bf16_stochastic, q8_m_decode,
    q8_m_encode_block, q8_v_decode, q8_v_encode_block, stochastic_bits,
};
use crate::layer::{Grads, HalfMut, Moments, ParamFormat, Params, Rounding};
use crate::scalars::{LayerNorms, StepScalars};
use half::bf16;

/// One chunk of a layer, decoded to f32.
pub(crate) struct Chunk {
    pub(crate) p: [f32; QBLOCK],
    pub(crate) g: [f32; QBLOCK],
    pub(crate) m: [f32; QBLOCK],
    pub(crate) v: [f32; QBLOCK],
}

impl Chunk {
    #[inline(always)]
    pub(crate) fn new() -> Chunk {
        Chunk {
            p: [0.0; QBLOCK],
            g: [0.0; QBLOCK],
            m: [0.0; QBLOCK],
            v: [0.0; QBLOCK],
        }
    }
}

/// Decodes elements `[at, at + n)` of the parameters into `out[..n]`.
#[inline(always)]
pub(crate) fn decode_params(p: &Params, at: usize, out: &mut [f32]) {
    let n = out.len();
    match p {
        Params::F32(x) => out.copy_from_slice(&x[at..at + n]),
        Params::Master { master, .. } => out.copy_from_slice(&master[at..at + n]),
        Params::Bf16 { data, .. } => {
            for (o, x) in out.iter_mut().zip(&data[at..at + n]) {
                *o = bf16_to_f32(x.to_bits());
            }
        }
    }
}

/// Decodes gradients; f16 through `S` (F16C where the backend has it).
#[inline(always)]
pub(crate) unsafe fn decode_grads<S: HalfConv>(g: &Grads, at: usize, out: &mut [f32]) {
    let n = out.len();
    match g {
        Grads::F32(x) => out.copy_from_slice(&x[at..at + n]),
        Grads::Bf16(x) => {
            for (o, x) in out.iter_mut().zip(&x[at..at + n]) {
                *o = bf16_to_f32(x.to_bits());
            }
        }
        // SAFETY: S's instruction set is available (caller); `x[at..at + n]` is in bounds
        // (checked by the slice index) and `out` has n elements.
        Grads::F16(x) => unsafe { S::f16_to_f32(&x[at..at + n], out) },
    }
}

/// Decodes the moments of elements `[at, at + n)`; for 8-bit moments `at` is a multiple
/// of `QBLOCK` and the chunk lies in block `at / QBLOCK`.
#[inline(always)]
pub(crate) fn decode_moments(mo: &Moments, at: usize, m_out: &mut [f32], v_out: &mut [f32]) {
    let n = m_out.len();
    match mo {
        Moments::F32 { m, v } => {
            m_out.copy_from_slice(&m[at..at + n]);
            v_out.copy_from_slice(&v[at..at + n]);
        }
        Moments::Bf16 { m, v, .. } => {
            // Zipped exact slices: no bounds checks, so the loops vectorize.
            for (o, x) in m_out.iter_mut().zip(&m[at..at + n]) {
                *o = bf16_to_f32(x.to_bits());
            }
            for (o, x) in v_out.iter_mut().zip(&v[at..at + n]) {
                *o = bf16_to_f32(x.to_bits());
            }
        }
        Moments::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => {
            let (am, av) = (m_absmax[at / QBLOCK], v_absmax[at / QBLOCK]);
            for (o, &c) in m_out.iter_mut().zip(&m[at..at + n]) {
                *o = q8_m_decode(c, am);
            }
            for (o, &c) in v_out.iter_mut().zip(&v[at..at + n]) {
                *o = q8_v_decode(c, av);
            }
        }
    }
}

/// Encodes new parameter values for elements `[at, at + n)`; `index0` is the index of the
/// layer's element 0 within the whole layer (stochastic rounding hashes `index0 + at + i`).
#[inline(always)]
pub(crate) unsafe fn encode_params<S: HalfConv>(
    p: &mut Params,
    at: usize,
    vals: &[f32],
    index0: usize,
) {
    let n = vals.len();
    match p {
        Params::F32(x) => x[at..at + n].copy_from_slice(vals),
        Params::Bf16 { data, rounding } => match *rounding {
            Rounding::Nearest => {
                for (d, &x) in data[at..at + n].iter_mut().zip(vals) {
                    *d = bf16::from_bits(f32_to_bf16(x));
                }
            }
            Rounding::Stochastic { seed } => {
                for (i, (d, &x)) in data[at..at + n].iter_mut().zip(vals).enumerate() {
                    let r = stochastic_bits(seed, (index0 + at + i) as u64);
                    *d = bf16::from_bits(f32_to_bf16_stochastic(x, r));
                }
            }
        },
        Params::Master { master, model } => {
            master[at..at + n].copy_from_slice(vals);
            // SAFETY: S's instruction set is available (caller).
            unsafe { write_model::<S>(model, at, vals) };
        }
    }
}

/// Rewrites elements `[at, at + vals.len())` of a model copy from master values (RNE).
///
/// # Safety
/// The CPU must support `S`'s instruction set.
#[inline(always)]
unsafe fn write_model<S: HalfConv>(model: &mut HalfMut, at: usize, vals: &[f32]) {
    let n = vals.len();
    match model {
        HalfMut::Bf16(h) => {
            for (d, &x) in h[at..at + n].iter_mut().zip(vals) {
                *d = bf16::from_bits(f32_to_bf16(x));
            }
        }
        // SAFETY: S's instruction set is available (caller); both ranges have n elements.
        HalfMut::F16(h) => unsafe { S::f32_to_f16(vals, &mut h[at..at + n]) },
    }
}

/// Encodes new moments; for 8-bit moments, computes the chunk's absmax first. `index0` as
/// for [`encode_params`].
#[inline(always)]
pub(crate) fn encode_moments(
    mo: &mut Moments,
    at: usize,
    m_new: &[f32],
    v_new: &[f32],
    index0: usize,
) {
    let n = m_new.len();
    match mo {
        Moments::F32 { m, v } => {
            m[at..at + n].copy_from_slice(m_new);
            v[at..at + n].copy_from_slice(v_new);
        }
        Moments::Bf16 { m, v, rounding } => match *rounding {
            Rounding::Nearest => {
                for (d, &x) in m[at..at + n].iter_mut().zip(m_new) {
                    *d = bf16::from_bits(f32_to_bf16(x));
                }
                for (d, &x) in v[at..at + n].iter_mut().zip(v_new) {
                    *d = bf16::from_bits(f32_to_bf16(x));
                }
            }
            Rounding::Stochastic { seed } => {
                let first = (index0 + at) as u64;
                for (i, (d, &x)) in m[at..at + n].iter_mut().zip(m_new).enumerate() {
                    let r = stochastic_bits(seed ^ M_STREAM, first + i as u64);
                    *d = bf16::from_bits(f32_to_bf16_stochastic(x, r));
                }
                for (i, (d, &x)) in v[at..at + n].iter_mut().zip(v_new).enumerate() {
                    let r = stochastic_bits(seed ^ V_STREAM, first + i as u64);
                    *d = bf16::from_bits(f32_to_bf16_stochastic(x, r));
                }
            }
        },
        Moments::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => {
            m_absmax[at / QBLOCK] = q8_m_encode_block(m_new, &mut m[at..at + n]);
            v_absmax[at / QBLOCK] = q8_v_encode_block(v_new, &mut v[at..at + n]);
        }
    }
}

// Views: the f32 rows a chunk's arithmetic runs on. An f32 buffer (f32 params, the master
// copy, f32 gradients or moments) is used in place; any other format is decoded into the
// chunk's stack buffer and, in phase 2, encoded back. Copying f32 data through the stack
// cost as much as the arithmetic on DRAM-resident layers.

/// The parameters of `[at, at + len)` for reading (phase 1).
#[inline(always)]
pub(crate) fn params_in<'c>(p: &'c Params, at: usize, buf: &'c mut [f32]) -> &'c [f32] {
    let len = buf.len();
    match p {
        Params::F32(x) => &x[at..at + len],
        Params::Master { master, .. } => &master[at..at + len],
        Params::Bf16 { .. } => {
            decode_params(p, at, buf);
            buf
        }
    }
}

/// The parameters of `[at, at + len)` for updating (phase 2); finish with [`params_out`].
#[inline(always)]
pub(crate) fn params_mut<'c>(p: &'c mut Params, at: usize, buf: &'c mut [f32]) -> &'c mut [f32] {
    let len = buf.len();
    match p {
        Params::F32(x) => &mut x[at..at + len],
        Params::Master { master, .. } => &mut master[at..at + len],
        Params::Bf16 { .. } => {
            decode_params(p, at, buf);
            buf
        }
    }
}

/// Stores what [`params_mut`] returned: bf16 parameters are encoded from `buf`, a master's
/// model copy is rewritten from the updated master, f32 parameters are already in place.
///
/// # Safety
/// The CPU must support `S`'s instruction set.
#[inline(always)]
pub(crate) unsafe fn params_out<S: HalfConv>(
    p: &mut Params,
    at: usize,
    buf: &[f32],
    index0: usize,
) {
    let len = buf.len();
    match p {
        Params::F32(_) => {}
        // SAFETY: S's instruction set is available (caller).
        Params::Master { master, model } => unsafe {
            write_model::<S>(model, at, &master[at..at + len])
        },
        // SAFETY: as above.
        Params::Bf16 { .. } => unsafe { encode_params::<S>(p, at, buf, index0) },
    }
}

/// The gradients of `[at, at + len)`.
///
/// # Safety
/// The CPU must support `S`'s instruction set.
#[inline(always)]
pub(crate) unsafe fn grads_in<'c, S: HalfConv>(
    g: &'c Grads,
    at: usize,
    buf: &'c mut [f32],
) -> &'c [f32] {
    match g {
        Grads::F32(x) => &x[at..at + buf.len()],
        _ => {
            // SAFETY: S's instruction set is available (caller).
            unsafe { decode_grads::<S>(g, at, buf) };
            buf
        }
    }
}

/// The moments of `[at, at + len)` for reading (phase 1).
#[inline(always)]
pub(crate) fn moments_in<'c>(
    mo: &'c Moments,
    at: usize,
    m_buf: &'c mut [f32],
    v_buf: &'c mut [f32],
) -> (&'c [f32], &'c [f32]) {
    let len = m_buf.len();
    match mo {
        Moments::F32 { m, v } => (&m[at..at + len], &v[at..at + len]),
        _ => {
            decode_moments(mo, at, m_buf, v_buf);
            (m_buf, v_buf)
        }
    }
}

/// The moments of `[at, at + len)` for updating; finish with [`moments_out`].
#[inline(always)]
pub(crate) fn moments_mut<'c>(
    mo: &'c mut Moments,
    at: usize,
    m_buf: &'c mut [f32],
    v_buf: &'c mut [f32],
) -> (&'c mut [f32], &'c mut [f32]) {
    let len = m_buf.len();
    match mo {
        Moments::F32 { m, v } => (&mut m[at..at + len], &mut v[at..at + len]),
        _ => {
            decode_moments(mo, at, m_buf, v_buf);
            (m_buf, v_buf)
        }
    }
}

/// Stores what [`moments_mut`] returned (f32 moments are already in place).
#[inline(always)]
pub(crate) fn moments_out(mo: &mut Moments, at: usize, m: &[f32], v: &[f32], index0: usize) {
    if !matches!(mo, Moments::F32 { .. }) {
        encode_moments(mo, at, m, v, index0);
    }
}

/// Phase 1 of elements `[at, at + n)` (`n <= BLOCK`, `at` a multiple of `BLOCK`). For
/// parameters stored in a half-precision format, also the ranges of p and u.
///
/// # Safety
/// The CPU must support `S`'s instruction set; the range must be inside every buffer.
#[inline(always)]
pub(crate) unsafe fn block_norms<S: Simd>(
    s: &StepScalars,
    p: &Params,
    g: &Grads,
    mo: &Moments,
    at: usize,
    n: usize,
) -> LayerNorms {
    let format = p.format();
    // SAFETY: forwarded from this function's contract.
    let norms = unsafe {
        if format == ParamFormat::F32 {
            block_norms_with::<S, false>(s, p, g, mo, at, n)
        } else {
            block_norms_with::<S, true>(s, p, g, mo, at, n)
        }
    };
    LayerNorms {
        param_format: format,
        ..norms
    }
}

/// [`block_norms`], with or without the ranges.
///
/// # Safety
/// As for [`block_norms`].
#[inline(always)]
unsafe fn block_norms_with<S: Simd, const RANGE: bool>(
    s: &StepScalars,
    p: &Params,
    g: &Grads,
    mo: &Moments,
    at: usize,
    n: usize,
) -> LayerNorms {
    let mut c = Chunk::new();
    // SAFETY: S's instruction set is available (caller); every chunk is in bounds.
    unsafe {
        let mut acc = NormAcc::<S, RANGE>::new();
        let mut off = 0;
        while off < n {
            let len = QBLOCK.min(n - off);
            let pv = params_in(p, at + off, &mut c.p[..len]);
            let gv = grads_in::<S>(g, at + off, &mut c.g[..len]);
            let (mv, vv) = moments_in(mo, at + off, &mut c.m[..len], &mut c.v[..len]);
            acc.add(s, pv, gv, mv, vv);
            off += len;
        }
        acc.finish()
    }
}

/// Phase 2 over the whole (equal-length) buffers. `index0` is the index of element 0 in
/// the layer, for stochastic rounding.
///
/// # Safety
/// The CPU must support `S`'s instruction set; the buffers must have equal lengths (and
/// `len.div_ceil(QBLOCK)` absmax entries for 8-bit moments).
#[inline(always)]
pub(crate) unsafe fn apply<S: Simd>(
    s: &StepScalars,
    step: f32,
    p: &mut Params,
    g: &Grads,
    mo: &mut Moments,
    index0: usize,
) {
    let n = p.len();
    let mut c = Chunk::new();
    let mut at = 0;
    // SAFETY: S's instruction set is available (caller); every chunk is in bounds.
    unsafe {
        while at < n {
            let len = QBLOCK.min(n - at);
            let Chunk {
                p: cp,
                g: cg,
                m: cm,
                v: cv,
            } = &mut c;
            let gv = grads_in::<S>(g, at, &mut cg[..len]);
            let pv = params_mut(p, at, &mut cp[..len]);
            let (mv, vv) = moments_mut(mo, at, &mut cm[..len], &mut cv[..len]);
            simd::apply::<S>(s, step, pv, gv, mv, vv);
            params_out::<S>(p, at, &cp[..len], index0);
            moments_out(mo, at, &cm[..len], &cv[..len], index0);
            at += len;
        }
    }
}

/// Σg² of elements `[at, at + n)` of gradients in any storage.
///
/// # Safety
/// The CPU must support `S`'s instruction set; the range must be inside the buffer.
#[inline(always)]
pub(crate) unsafe fn block_sum_squares<S: Simd>(g: &Grads, at: usize, n: usize) -> f64 {
    let mut buf = [0.0f32; QBLOCK];
    let mut total = 0.0;
    let mut off = 0;
    // Lane partials span the whole block, so decode chunk by chunk into the same lanes.
    // SAFETY: S's instruction set is available (caller); every chunk is in bounds.
    unsafe {
        let mut acc = S::splat(0.0);
        while off < n {
            let len = QBLOCK.min(n - off);
            decode_grads::<S>(g, at + off, &mut buf[..len]);
            acc = simd::add_squares::<S>(acc, &buf[..len]);
            off += len;
        }
        total += super::fold_lanes(S::lanes(acc));
    }
    total
}
