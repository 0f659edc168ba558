//! One generic algorithm for every SIMD backend.
//!
//! The unit of work is a *row* of 16 f32 elements, which is exactly one round of the 16
//! reduction lanes: element `i` of a block lands in lane `i % 16` whatever the register
//! width. Each ISA module implements [`Simd`] for its own 16-lane bundle (one AVX-512
//! register, two AVX2 registers, four SSE2/NEON registers) and wraps these `#[inline(always)]`
//! functions in `#[target_feature]` entry points, in the manner of memchr's `arch` modules.
//!
//! Tails shorter than a row go through [`Simd::load_partial`] / [`Simd::store_partial`]:
//! zero padding that never touches memory outside the slices. Padding elements are all zero,
//! so their u is `0/ε + λ·0 = 0` and they add `+0.0` to lanes that hold `+0.0` or more:
//! the sums are bit-identical to the scalar reference, which never visits them.

use super::{LANES, fold_lanes};
use crate::scalars::{LayerNorms, StepScalars, ZERO_KEY, from_order_key, order_key};

/// A bundle of 16 f32 lanes (which also serve as the 16 lane partials of a sum of squares).
///
/// # Safety
/// Implementations may only be used where their instruction set is available; the
/// methods are `unsafe` for that reason, and pointer arguments must be valid as documented.
pub(crate) unsafe trait Simd: Copy + HalfConv {
    /// 16 f32 lanes.
    type V: Copy;

    unsafe fn splat(x: f32) -> Self::V;
    /// Loads 16 elements. `ptr` must be valid for reading 16 f32 (no alignment needed).
    unsafe fn load(ptr: *const f32) -> Self::V;
    /// Stores 16 elements. `ptr` must be valid for writing 16 f32 (no alignment needed).
    unsafe fn store(ptr: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sqrt(a: Self::V) -> Self::V;

    /// `acc[j] + x[j]·x[j]` for every lane j: a multiply, then an add (never fused).
    #[inline(always)]
    unsafe fn add_square(acc: Self::V, x: Self::V) -> Self::V {
        // SAFETY: S's instruction set is available (caller).
        unsafe { Self::add(acc, Self::mul(x, x)) }
    }

    /// The 16 lanes as an array.
    #[inline(always)]
    unsafe fn lanes(x: Self::V) -> [f32; LANES] {
        let mut out = [0.0f32; LANES];
        // SAFETY: `out` holds 16 f32; S's instruction set is available (caller).
        unsafe { Self::store(out.as_mut_ptr(), x) };
        out
    }

    /// Per lane, `lo[j] = min(lo[j], key(x[j]))` and `hi[j] = max(hi[j], key(x[j]))` with
    /// [`order_key`]: the range of the values seen, exact and order-independent. Only the
    /// half-precision paths of phase 1 use it, so a store and an integer loop, which the
    /// compiler vectorizes within the entry point's features, serve every backend.
    #[inline(always)]
    unsafe fn min_max_keys(lo: &mut [u32; LANES], hi: &mut [u32; LANES], x: Self::V) {
        let mut buf = [0.0f32; LANES];
        // SAFETY: `buf` holds 16 f32; S's instruction set is available (caller).
        unsafe { Self::store(buf.as_mut_ptr(), x) };
        for j in 0..LANES {
            let k = order_key(buf[j]);
            lo[j] = lo[j].min(k);
            hi[j] = hi[j].max(k);
        }
    }

    /// Loads `n < 16` elements, the rest zero. `ptr` must be valid for reading `n` f32.
    #[inline(always)]
    unsafe fn load_partial(ptr: *const f32, n: usize) -> Self::V {
        let mut buf = [0.0f32; LANES];
        // SAFETY: the caller guarantees `n` readable elements at `ptr`; `buf` holds 16 >= n.
        unsafe {
            core::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), n);
            Self::load(buf.as_ptr())
        }
    }

    /// Stores the first `n < 16` lanes. `ptr` must be valid for writing `n` f32.
    #[inline(always)]
    unsafe fn store_partial(ptr: *mut f32, n: usize, v: Self::V) {
        let mut buf = [0.0f32; LANES];
        // SAFETY: `buf` holds 16 elements; the caller guarantees `n` writable at `ptr`.
        unsafe {
            Self::store(buf.as_mut_ptr(), v);
            core::ptr::copy_nonoverlapping(buf.as_ptr(), ptr, n);
        }
    }
}

/// f16 ⇄ f32 conversion of a run of elements. The defaults are the `half` crate's exact
/// software conversions (round to nearest even); x86 backends override them with F16C,
/// which gives the same bits.
pub(crate) trait HalfConv {
    /// `out[i] = f32(src[i])` (exact). Equal lengths.
    ///
    /// # Safety
    /// The implementation's instruction set must be available.
    #[inline(always)]
    unsafe fn f16_to_f32(src: &[half::f16], out: &mut [f32]) {
        for (o, h) in out.iter_mut().zip(src) {
            *o = crate::codec::f16_to_f32(h.to_bits());
        }
    }

    /// `out[i] = f16(src[i])`, round to nearest even. Equal lengths.
    ///
    /// # Safety
    /// The implementation's instruction set must be available.
    #[inline(always)]
    unsafe fn f32_to_f16(src: &[f32], out: &mut [half::f16]) {
        for (o, &x) in out.iter_mut().zip(src) {
            *o = half::f16::from_bits(crate::codec::f32_to_f16(x));
        }
    }
}

/// The software conversions, for the scalar reference.
pub(crate) struct Soft;
impl HalfConv for Soft {}

/// The per-step scalars, splatted once.
#[derive(Clone, Copy)]
struct Splat<S: Simd> {
    grad_scale: S::V,
    beta1: S::V,
    beta3: S::V,
    beta2: S::V,
    one_minus_beta2: S::V,
    inv_bias1: S::V,
    inv_bias2: S::V,
    eps: S::V,
    eps_inside_sqrt: bool,
    /// `grad_scale != 1`. A step without clipping or loss scaling multiplies every gradient
    /// by exactly 1, which changes no f32 (a NaN stays a NaN), so the rows skip it: one
    /// multiplication fewer per row in both phases (the compiler hoists the test out of the
    /// loop, like `eps_inside_sqrt`). The scalar reference always multiplies.
    scaled: bool,
    weight_decay: S::V,
}

impl<S: Simd> Splat<S> {
    #[inline(always)]
    unsafe fn new(s: &StepScalars) -> Self {
        // SAFETY: the caller runs on a CPU with S's instruction set.
        unsafe {
            Splat {
                grad_scale: S::splat(s.grad_scale),
                beta1: S::splat(s.beta1),
                beta3: S::splat(s.beta3),
                beta2: S::splat(s.beta2),
                one_minus_beta2: S::splat(s.one_minus_beta2),
                inv_bias1: S::splat(s.inv_bias1),
                inv_bias2: S::splat(s.inv_bias2),
                eps: S::splat(s.eps),
                eps_inside_sqrt: s.eps_inside_sqrt,
                scaled: s.grad_scale != 1.0,
                weight_decay: S::splat(s.weight_decay),
            }
        }
    }

    /// [`super::scalar::update`] on 16 lanes, operation for operation; also returns the
    /// denominator for the overflow check of phase 1.
    #[inline(always)]
    unsafe fn update(&self, p: S::V, g: S::V, m: S::V, v: S::V) -> (S::V, S::V, S::V, S::V) {
        // SAFETY: the caller runs on a CPU with S's instruction set.
        unsafe {
            let g = if self.scaled {
                S::mul(g, self.grad_scale)
            } else {
                g
            };
            let m = S::add(S::mul(self.beta1, m), S::mul(self.beta3, g));
            let v = S::add(
                S::mul(self.beta2, v),
                S::mul(self.one_minus_beta2, S::mul(g, g)),
            );
            let m_hat = S::mul(m, self.inv_bias1);
            let v_hat = S::mul(v, self.inv_bias2);
            let denom = if self.eps_inside_sqrt {
                S::sqrt(S::add(v_hat, self.eps))
            } else {
                S::add(S::sqrt(v_hat), self.eps)
            };
            let u = S::add(S::div(m_hat, denom), S::mul(self.weight_decay, p));
            (m, v, u, denom)
        }
    }
}

/// The 16 f32 lane partials of ‖p‖² and ‖u‖² for one block; with `RANGE`, also the
/// lane ranges of p and u (for parameters stored in a half-precision format: see
/// [`crate::LayerNorms::param_max`]). `RANGE = false` compiles to exactly the sums.
pub(crate) struct NormAcc<S: Simd, const RANGE: bool = false> {
    p: S::V,
    u: S::V,
    /// Lane minima and maxima of p and u as [`order_key`]s, starting at +0 (which the zero
    /// padding of a partial row also adds: the ranges always include 0).
    keys: [[u32; LANES]; 4],
}

impl<S: Simd, const RANGE: bool> NormAcc<S, RANGE> {
    #[inline(always)]
    pub(crate) unsafe fn new() -> Self {
        // SAFETY: the caller runs on a CPU with S's instruction set.
        unsafe {
            NormAcc {
                p: S::splat(0.0),
                u: S::splat(0.0),
                keys: [[ZERO_KEY; LANES]; 4],
            }
        }
    }

    /// Adds the elements of the slices (equal lengths). Element `i` goes to lane `i % 16`,
    /// so a caller that feeds one block in several calls must start each call (but the
    /// last) at a multiple of 16 elements into the block.
    #[inline(always)]
    pub(crate) unsafe fn add(
        &mut self,
        s: &StepScalars,
        p: &[f32],
        g: &[f32],
        m: &[f32],
        v: &[f32],
    ) {
        let n = p.len();
        debug_assert!(g.len() == n && m.len() == n && v.len() == n);
        // SAFETY: S's instruction set is available (caller); every load reads 16 elements
        // starting at `i` with `i + 16 <= n`, or `n - i` elements through `load_partial`, so
        // all reads stay inside the four slices, which have length `n`.
        unsafe {
            let k = Splat::<S>::new(s);
            let (mut acc_p, mut acc_u) = (self.p, self.u);
            let [mut p_lo, mut p_hi, mut u_lo, mut u_hi] = self.keys;
            // A macro, not a closure: a closure is a function of its own, compiled without
            // the entry point's target features, and its intrinsics would not inline.
            macro_rules! row {
                ($pv:expr, $gv:expr, $mv:expr, $vv:expr) => {{
                    let pv = $pv;
                    let (_, _, u, denom) = k.update(pv, $gv, $mv, $vv);
                    let u = S::add(u, S::sub(denom, denom));
                    acc_p = S::add_square(acc_p, pv);
                    acc_u = S::add_square(acc_u, u);
                    if RANGE {
                        S::min_max_keys(&mut p_lo, &mut p_hi, pv);
                        S::min_max_keys(&mut u_lo, &mut u_hi, u);
                    }
                }};
            }
            let mut i = 0;
            while i + LANES <= n {
                row!(
                    S::load(p.as_ptr().add(i)),
                    S::load(g.as_ptr().add(i)),
                    S::load(m.as_ptr().add(i)),
                    S::load(v.as_ptr().add(i))
                );
                i += LANES;
            }
            if i < n {
                let r = n - i;
                row!(
                    S::load_partial(p.as_ptr().add(i), r),
                    S::load_partial(g.as_ptr().add(i), r),
                    S::load_partial(m.as_ptr().add(i), r),
                    S::load_partial(v.as_ptr().add(i), r)
                );
            }
            (self.p, self.u) = (acc_p, acc_u);
            self.keys = [p_lo, p_hi, u_lo, u_hi];
        }
    }

    #[inline(always)]
    pub(crate) unsafe fn finish(self) -> LayerNorms {
        // SAFETY: the caller runs on a CPU with S's instruction set.
        unsafe {
            LayerNorms {
                param_sq: fold_lanes(S::lanes(self.p)),
                update_sq: fold_lanes(S::lanes(self.u)),
                param_min: from_order_key(self.keys[0].into_iter().fold(ZERO_KEY, u32::min)),
                param_max: from_order_key(self.keys[1].into_iter().fold(ZERO_KEY, u32::max)),
                update_min: from_order_key(self.keys[2].into_iter().fold(ZERO_KEY, u32::min)),
                update_max: from_order_key(self.keys[3].into_iter().fold(ZERO_KEY, u32::max)),
                ..LayerNorms::default()
            }
        }
    }
}

/// Phase 1 of one block (`p.len() <= BLOCK`, all slices of equal length).
///
/// # Safety
/// The CPU must support `S`'s instruction set; the slices must have equal lengths.
#[inline(always)]
pub(crate) unsafe fn block_norms<S: Simd>(
    s: &StepScalars,
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
) -> LayerNorms {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        let mut acc = NormAcc::<S, false>::new();
        acc.add(s, p, g, m, v);
        acc.finish()
    }
}

/// Phase 2 over a slice (all slices of equal length).
///
/// # Safety
/// The CPU must support `S`'s instruction set; the slices must have equal lengths.
#[inline(always)]
pub(crate) unsafe fn apply<S: Simd>(
    s: &StepScalars,
    step: f32,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let n = p.len();
    debug_assert!(g.len() == n && m.len() == n && v.len() == n);
    // SAFETY: S's instruction set is available (caller). Full rows read and write 16
    // elements at `i` with `i + 16 <= n`; the tail reads and writes `n - i` elements through
    // the partial functions. All four slices have length `n`, and `p`, `m`, `v` are distinct
    // `&mut` borrows, so the writes cannot alias each other or `g`.
    unsafe {
        let k = Splat::<S>::new(s);
        let step = S::splat(step);
        let mut i = 0;
        while i + LANES <= n {
            let pv = S::load(p.as_ptr().add(i));
            let (mv, vv, u, _) = k.update(
                pv,
                S::load(g.as_ptr().add(i)),
                S::load(m.as_ptr().add(i)),
                S::load(v.as_ptr().add(i)),
            );
            S::store(m.as_mut_ptr().add(i), mv);
            S::store(v.as_mut_ptr().add(i), vv);
            S::store(p.as_mut_ptr().add(i), S::sub(pv, S::mul(step, u)));
            i += LANES;
        }
        if i < n {
            let r = n - i;
            let pv = S::load_partial(p.as_ptr().add(i), r);
            let (mv, vv, u, _) = k.update(
                pv,
                S::load_partial(g.as_ptr().add(i), r),
                S::load_partial(m.as_ptr().add(i), r),
                S::load_partial(v.as_ptr().add(i), r),
            );
            S::store_partial(m.as_mut_ptr().add(i), r, mv);
            S::store_partial(v.as_mut_ptr().add(i), r, vv);
            S::store_partial(p.as_mut_ptr().add(i), r, S::sub(pv, S::mul(step, u)));
        }
    }
}

/// Adds x² of every element of `x` to the lanes (element `i` to lane `i % 16`).
///
/// # Safety
/// The CPU must support `S`'s instruction set.
#[inline(always)]
pub(crate) unsafe fn add_squares<S: Simd>(mut acc: S::V, x: &[f32]) -> S::V {
    let n = x.len();
    // SAFETY: as in `NormAcc::add`: every read stays inside `x`.
    unsafe {
        let mut i = 0;
        while i + LANES <= n {
            acc = S::add_square(acc, S::load(x.as_ptr().add(i)));
            i += LANES;
        }
        if i < n {
            acc = S::add_square(acc, S::load_partial(x.as_ptr().add(i), n - i));
        }
        acc
    }
}

/// Σx² of one block.
///
/// # Safety
/// The CPU must support `S`'s instruction set.
#[inline(always)]
pub(crate) unsafe fn block_sum_squares<S: Simd>(x: &[f32]) -> f64 {
    // SAFETY: forwarded from this function's contract.
    unsafe { fold_lanes(S::lanes(add_squares::<S>(S::splat(0.0), x))) }
}
