//! Portable SIMD through `wide`, chosen at compile time: SSE2 on baseline x86-64, simd128 on
//! wasm, NEON on aarch64, plain arrays elsewhere. Needs no runtime detection.

use wide::{f32x4, f64x2};

use crate::kernels::LANES;
use crate::kernels::simd::{HalfConv, Simd};

#[derive(Clone, Copy)]
pub(crate) struct Portable;

type V = [f32x4; 4];

#[inline(always)]
fn map2(a: V, b: V, f: impl Fn(f32x4, f32x4) -> f32x4) -> V {
    [f(a[0], b[0]), f(a[1], b[1]), f(a[2], b[2]), f(a[3], b[3])]
}

/// IEEE square root: `wide`'s own where it is an instruction; elsewhere its fallback is a
/// software f64 square root whose rounding we do not rely on, so use libm's (exact) one.
#[inline(always)]
fn sqrt4(x: f32x4) -> f32x4 {
    #[cfg(any(
        target_feature = "sse",
        target_feature = "simd128",
        all(target_feature = "neon", target_arch = "aarch64")
    ))]
    {
        x.sqrt()
    }
    #[cfg(not(any(
        target_feature = "sse",
        target_feature = "simd128",
        all(target_feature = "neon", target_arch = "aarch64")
    )))]
    {
        f32x4::new(x.to_array().map(libm::sqrtf))
    }
}

// SAFETY: needs no instruction set beyond the compile target's; pointer contracts as in the
// trait.
unsafe impl Simd for Portable {
    type V = V;
    type Acc = [f64x2; 8];

    #[inline(always)]
    unsafe fn splat(x: f32) -> V {
        [f32x4::splat(x); 4]
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> V {
        // SAFETY: the caller guarantees 16 readable f32 at `ptr`; read_unaligned needs no
        // alignment.
        let a: [[f32; 4]; 4] = unsafe { core::ptr::read_unaligned(ptr.cast()) };
        a.map(f32x4::new)
    }
    #[inline(always)]
    unsafe fn store(ptr: *mut f32, v: V) {
        // SAFETY: the caller guarantees 16 writable f32 at `ptr`.
        unsafe { core::ptr::write_unaligned(ptr.cast::<[[f32; 4]; 4]>(), v.map(|x| x.to_array())) }
    }
    #[inline(always)]
    unsafe fn add(a: V, b: V) -> V {
        map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: V, b: V) -> V {
        map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn mul(a: V, b: V) -> V {
        map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn div(a: V, b: V) -> V {
        map2(a, b, |x, y| x / y)
    }
    #[inline(always)]
    unsafe fn sqrt(a: V) -> V {
        a.map(sqrt4)
    }
    #[inline(always)]
    unsafe fn acc_zero() -> Self::Acc {
        [f64x2::splat(0.0); 8]
    }
    #[inline(always)]
    unsafe fn acc_add_squares(acc: Self::Acc, x: V) -> Self::Acc {
        let mut out = acc;
        for k in 0..4 {
            let a = x[k].to_array().map(f64::from);
            let lo = f64x2::new([a[0], a[1]]);
            let hi = f64x2::new([a[2], a[3]]);
            out[2 * k] += lo * lo;
            out[2 * k + 1] += hi * hi;
        }
        out
    }
    #[inline(always)]
    unsafe fn acc_lanes(acc: Self::Acc) -> [f64; LANES] {
        let mut out = [0.0; LANES];
        for (k, a) in acc.iter().enumerate() {
            out[2 * k..2 * k + 2].copy_from_slice(&a.to_array());
        }
        out
    }
}

impl HalfConv for Portable {}

// No runtime features: the entry points are `unsafe` only for the dispatch table's sake.
super::entry_points!(Portable);
