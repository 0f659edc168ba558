//! The scalar reference: one element at a time, written to be obviously right. Every other
//! backend is tested bit for bit against it.

use super::{LANES, fold_lanes};
use crate::step::{LayerNorms, StepScalars};

/// New m, v and the update u of one element, in the canonical order of operations.
#[inline(always)]
pub fn update(s: &StepScalars, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
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
        libm::sqrtf(v_hat + s.eps)
    } else {
        libm::sqrtf(v_hat) + s.eps
    };
    let u = m_hat / denom + s.weight_decay * p;
    (m, v, u, denom)
}

/// The value whose square phase 1 adds to ‖u‖²: `u + (d − d)` with `d` the denominator.
/// `d − d` is 0 when `d` is finite and NaN when it is infinite, so an infinite `v` (which
/// would make `u` a harmless-looking 0 forever) poisons the sum and the step is refused.
#[inline(always)]
#[allow(clippy::eq_op)] // `denom - denom` is the point: 0, or NaN for an infinite denom
pub fn checked_update(s: &StepScalars, p: f32, g: f32, m: f32, v: f32) -> f32 {
    let (_, _, u, denom) = update_and_denom(s, p, g, m, v);
    u + (denom - denom)
}

/// Phase 1 of one block (`p.len() <= BLOCK`; all slices of equal length).
pub fn block_norms(s: &StepScalars, p: &[f32], g: &[f32], m: &[f32], v: &[f32]) -> LayerNorms {
    let mut lp = [0.0f64; LANES];
    let mut lu = [0.0f64; LANES];
    for i in 0..p.len() {
        let u = checked_update(s, p[i], g[i], m[i], v[i]);
        lp[i % LANES] += p[i] as f64 * p[i] as f64;
        lu[i % LANES] += u as f64 * u as f64;
    }
    LayerNorms {
        param_sq: fold_lanes(lp),
        update_sq: fold_lanes(lu),
    }
}

/// Phase 2 over a slice (all slices of equal length).
pub fn apply(s: &StepScalars, step: f32, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for i in 0..p.len() {
        let (mi, vi, u) = update(s, p[i], g[i], m[i], v[i]);
        m[i] = mi;
        v[i] = vi;
        p[i] -= step * u;
    }
}

/// Σx² of one block.
pub fn block_sum_squares(x: &[f32]) -> f64 {
    let mut l = [0.0f64; LANES];
    for (i, &xi) in x.iter().enumerate() {
        l[i % LANES] += xi as f64 * xi as f64;
    }
    fold_lanes(l)
}
