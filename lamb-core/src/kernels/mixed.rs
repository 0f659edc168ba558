//! Phases 1 and 2 over compact storage ([`crate::precision`]), generic over the backend.
//!
//! Work goes in chunks of [`QBLOCK`] elements: decode the chunk of p, g, m and v into f32
//! stack buffers, run the very same f32 row code as the all-f32 kernels over them
//! ([`NormAcc::add`], [`simd::apply`]), then encode the results back. Which codec runs is a
//! `match` per chunk, not per element, so one instantiation per backend serves every
//! combination of storage types. The codecs are exact integer/bit operations (or exactly
//! rounded conversions), so the bits do not depend on the backend.

use super::simd::{self, HalfConv, NormAcc, Simd};
use crate::precision::{
    Grads, HalfMut, M_STREAM, Moments, Params, QBLOCK, Rounding, V_STREAM, bf16_to_f32,
    f32_to_bf16, f32_to_bf16_stochastic, q8_m_decode, q8_m_encode, q8_v_decode, q8_v_encode,
    stochastic_bits,
};
use crate::step::{LayerNorms, StepScalars};
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
            for i in 0..n {
                m_out[i] = bf16_to_f32(m[at + i].to_bits());
                v_out[i] = bf16_to_f32(v[at + i].to_bits());
            }
        }
        Moments::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => {
            let (am, av) = (m_absmax[at / QBLOCK], v_absmax[at / QBLOCK]);
            for i in 0..n {
                m_out[i] = q8_m_decode(m[at + i], am);
                v_out[i] = q8_v_decode(v[at + i], av);
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
                for i in 0..n {
                    m[at + i] = bf16::from_bits(f32_to_bf16(m_new[i]));
                    v[at + i] = bf16::from_bits(f32_to_bf16(v_new[i]));
                }
            }
            Rounding::Stochastic { seed } => {
                for i in 0..n {
                    let index = (index0 + at + i) as u64;
                    let rm = stochastic_bits(seed ^ M_STREAM, index);
                    let rv = stochastic_bits(seed ^ V_STREAM, index);
                    m[at + i] = bf16::from_bits(f32_to_bf16_stochastic(m_new[i], rm));
                    v[at + i] = bf16::from_bits(f32_to_bf16_stochastic(v_new[i], rv));
                }
            }
        },
        Moments::Q8 {
            m,
            v,
            m_absmax,
            v_absmax,
        } => {
            let am = m_new.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            let av = v_new.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            m_absmax[at / QBLOCK] = am;
            v_absmax[at / QBLOCK] = av;
            for i in 0..n {
                m[at + i] = q8_m_encode(m_new[i], am);
                v[at + i] = q8_v_encode(v_new[i], av);
            }
        }
    }
}

/// Phase 1 of elements `[at, at + n)` (`n <= BLOCK`, `at` a multiple of `BLOCK`).
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
    let mut c = Chunk::new();
    // SAFETY: S's instruction set is available (caller); every chunk is in bounds.
    unsafe {
        let mut acc = NormAcc::<S>::new();
        let mut off = 0;
        while off < n {
            let len = QBLOCK.min(n - off);
            decode_params(p, at + off, &mut c.p[..len]);
            decode_grads::<S>(g, at + off, &mut c.g[..len]);
            decode_moments(mo, at + off, &mut c.m[..len], &mut c.v[..len]);
            acc.add(s, &c.p[..len], &c.g[..len], &c.m[..len], &c.v[..len]);
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
            decode_params(p, at, &mut c.p[..len]);
            decode_grads::<S>(g, at, &mut c.g[..len]);
            decode_moments(mo, at, &mut c.m[..len], &mut c.v[..len]);
            simd::apply::<S>(
                s,
                step,
                &mut c.p[..len],
                &c.g[..len],
                &mut c.m[..len],
                &mut c.v[..len],
            );
            encode_params::<S>(p, at, &c.p[..len], index0);
            encode_moments(mo, at, &c.m[..len], &c.v[..len], index0);
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
        let mut acc = S::acc_zero();
        while off < n {
            let len = QBLOCK.min(n - off);
            decode_grads::<S>(g, at + off, &mut buf[..len]);
            acc = simd::add_squares::<S>(acc, &buf[..len]);
            off += len;
        }
        total += super::fold_lanes(S::acc_lanes(acc));
    }
    total
}
