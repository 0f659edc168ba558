//! The scalar reference: one element at a time, written to be obviously right. Every other
//! backend is tested bit for bit against it.

use super::compact::{
    Chunk, decode_grads, decode_moments, decode_params, encode_moments, encode_params,
};
use super::simd::Soft;
use super::{LANES, fold_lanes, sqrtf};
use crate::codec::QBLOCK;
use crate::layer::{Grads, Moments, ParamFormat, Params};
use crate::scalars::{LayerNorms, StepScalars, ZERO_KEY, from_order_key, order_key};

/// New m, v and the update u of one element, in the canonical order of operations.
#[inline(always)]
pub(crate) fn update(s: &StepScalars, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
    let (m, v, u, _) = update_and_denom(s, p, g, m, v);
    (m, v, u)
}

/// [`update`] and the denominator `√v̂ + ε` it divided by.
#[inline(always)]
fn update_and_denom(s: &StepScalars, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32, f32) {
    let g = g * s.grad_scale;
    let m = s.beta1 * m + s.beta3 * g;
    let v = s.beta2 * v + s.one_minus_beta2 * (g * g);
    let m_hat = m * s.inv_bias1;
    let v_hat = v * s.inv_bias2;
    let denom = if s.eps_inside_sqrt {
        sqrtf(v_hat + s.eps)
    } else {
        sqrtf(v_hat) + s.eps
    };
    let u = m_hat / denom + s.weight_decay * p;
    (m, v, u, denom)
}

/// The value whose square phase 1 adds to ‖u‖²: `u + (d − d)` with `d` the denominator.
/// `d − d` is 0 when `d` is finite and NaN when it is infinite, so an infinite `v` (which
/// would make `u` a harmless-looking 0 forever) poisons the sum and the step is refused.
#[inline(always)]
#[allow(clippy::eq_op)] // `denom - denom` is the point: 0, or NaN for an infinite denom
pub(crate) fn checked_update(s: &StepScalars, p: f32, g: f32, m: f32, v: f32) -> f32 {
    let (_, _, u, denom) = update_and_denom(s, p, g, m, v);
    u + (denom - denom)
}

/// Phase 1 of one block (`p.len() <= BLOCK`; all slices of equal length).
pub(crate) fn block_norms(
    s: &StepScalars,
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
) -> LayerNorms {
    let mut lp = [0.0f32; LANES];
    let mut lu = [0.0f32; LANES];
    for i in 0..p.len() {
        let u = checked_update(s, p[i], g[i], m[i], v[i]);
        lp[i % LANES] += p[i] * p[i];
        lu[i % LANES] += u * u;
    }
    LayerNorms {
        param_sq: fold_lanes(lp),
        update_sq: fold_lanes(lu),
        ..LayerNorms::default()
    }
}

/// Phase 2 over a slice (all slices of equal length).
pub(crate) fn apply(
    s: &StepScalars,
    step: f32,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    for i in 0..p.len() {
        let (mi, vi, u) = update(s, p[i], g[i], m[i], v[i]);
        m[i] = mi;
        v[i] = vi;
        p[i] -= step * u;
    }
}

/// Σx² of one block.
pub(crate) fn block_sum_squares(x: &[f32]) -> f64 {
    let mut l = [0.0f32; LANES];
    for (i, &xi) in x.iter().enumerate() {
        l[i % LANES] += xi * xi;
    }
    fold_lanes(l)
}

/// Phase 1 in compact storage: decode (the shared codecs), then this module's per-element
/// math. The range `[at, at + n)` is one block (`at` a multiple of `BLOCK`).
pub(crate) fn compact_block_norms(
    s: &StepScalars,
    p: &Params,
    g: &Grads,
    mo: &Moments,
    at: usize,
    n: usize,
) -> LayerNorms {
    let mut lp = [0.0f32; LANES];
    let mut lu = [0.0f32; LANES];
    // The ranges of p and u as order keys, including 0, for half-precision parameters.
    let format = p.format();
    let mut keys = [ZERO_KEY; 4];
    let mut c = Chunk::new();
    let mut off = 0;
    while off < n {
        let len = QBLOCK.min(n - off);
        decode_params(p, at + off, &mut c.p[..len]);
        // SAFETY: `Soft` needs no instruction set.
        unsafe { decode_grads::<Soft>(g, at + off, &mut c.g[..len]) };
        decode_moments(mo, at + off, &mut c.m[..len], &mut c.v[..len]);
        for i in 0..len {
            let u = checked_update(s, c.p[i], c.g[i], c.m[i], c.v[i]);
            lp[(off + i) % LANES] += c.p[i] * c.p[i];
            lu[(off + i) % LANES] += u * u;
            if format != ParamFormat::F32 {
                let (kp, ku) = (order_key(c.p[i]), order_key(u));
                keys = [
                    keys[0].min(kp),
                    keys[1].max(kp),
                    keys[2].min(ku),
                    keys[3].max(ku),
                ];
            }
        }
        off += len;
    }
    LayerNorms {
        param_sq: fold_lanes(lp),
        update_sq: fold_lanes(lu),
        param_min: from_order_key(keys[0]),
        param_max: from_order_key(keys[1]),
        update_min: from_order_key(keys[2]),
        update_max: from_order_key(keys[3]),
        param_format: format,
    }
}

/// Phase 2 in compact storage, chunk by chunk (8-bit moments need a chunk's absmax).
pub(crate) fn compact_apply(
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
    while at < n {
        let len = QBLOCK.min(n - at);
        decode_params(p, at, &mut c.p[..len]);
        // SAFETY: `Soft` needs no instruction set.
        unsafe { decode_grads::<Soft>(g, at, &mut c.g[..len]) };
        decode_moments(mo, at, &mut c.m[..len], &mut c.v[..len]);
        apply(
            s,
            step,
            &mut c.p[..len],
            &c.g[..len],
            &mut c.m[..len],
            &mut c.v[..len],
        );
        // SAFETY: `Soft` needs no instruction set.
        unsafe { encode_params::<Soft>(p, at, &c.p[..len], index0) };
        encode_moments(mo, at, &c.m[..len], &c.v[..len], index0);
        at += len;
    }
}

/// Σg² of one block of gradients in any storage.
pub(crate) fn compact_block_sum_squares(g: &Grads, at: usize, n: usize) -> f64 {
    let mut l = [0.0f32; LANES];
    let mut buf = [0.0f32; QBLOCK];
    let mut off = 0;
    while off < n {
        let len = QBLOCK.min(n - off);
        // SAFETY: `Soft` needs no instruction set.
        unsafe { decode_grads::<Soft>(g, at + off, &mut buf[..len]) };
        for (i, &x) in buf[..len].iter().enumerate() {
            l[(off + i) % LANES] += x * x;
        }
        off += len;
    }
    fold_lanes(l)
}
