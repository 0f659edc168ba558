//! Portable SIMD through `wide`, chosen at compile time: SSE2 on x86, simd128 on wasm, NEON
//! on aarch64. Needs no runtime detection. Compiled only where `wide` has SIMD; elsewhere
//! (Cortex-M, RISC-V without V, ...) `wide` would be plain arrays, slower and bigger than
//! the scalar kernels, which serve as the portable backend there (`arch/mod.rs`).

use wide::f32x4;

use crate::kernels::simd::{HalfConv, Simd};

#[derive(Clone, Copy)]
pub(crate) struct Portable;

type V = [f32x4; 4];

#[inline(always)]
fn map2(a: V, b: V, f: impl Fn(f32x4, f32x4) -> f32x4) -> V {
    [f(a[0], b[0]), f(a[1], b[1]), f(a[2], b[2]), f(a[3], b[3])]
}

// SAFETY: needs no instruction set beyond the compile target's; pointer contracts as in the
// trait.
unsafe impl Simd for Portable {
    type V = V;

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
        // One IEEE square-root instruction per 4 lanes on every target this module is for.
        a.map(|x| x.sqrt())
    }
}

impl HalfConv for Portable {}

// No runtime features: the entry points are `unsafe` only for the dispatch table's sake.
super::entry_points!(Portable);
