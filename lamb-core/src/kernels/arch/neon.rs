//! NEON (baseline on aarch64): a row (and the 16 lane partials of a sum) is four
//! `float32x4_t`. AArch64 NEON is IEEE (denormals kept unless FPCR.FZ is set, which Linux
//! and bare-metal startup code leave clear).

use core::arch::aarch64::*;

use super::entry_points;
use crate::kernels::simd::{HalfConv, Simd};

#[derive(Clone, Copy)]
pub(crate) struct Neon;

macro_rules! each {
    ($f:ident, $($a:ident),+) => {
        [$f($($a[0]),+), $f($($a[1]),+), $f($($a[2]),+), $f($($a[3]),+)]
    };
}

// SAFETY: NEON is part of the aarch64 baseline; every method uses NEON instructions only.
unsafe impl Simd for Neon {
    type V = [float32x4_t; 4];

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        // SAFETY: NEON is available (trait contract).
        unsafe { [vdupq_n_f32(x); 4] }
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self::V {
        // SAFETY: the caller guarantees 16 readable f32 at `ptr`; vld1q needs no alignment
        // beyond f32's.
        unsafe {
            [
                vld1q_f32(ptr),
                vld1q_f32(ptr.add(4)),
                vld1q_f32(ptr.add(8)),
                vld1q_f32(ptr.add(12)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn store(ptr: *mut f32, v: Self::V) {
        // SAFETY: the caller guarantees 16 writable f32 at `ptr`.
        unsafe {
            for (k, x) in v.iter().enumerate() {
                vst1q_f32(ptr.add(4 * k), *x);
            }
        }
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        // SAFETY: NEON is available (trait contract).
        unsafe { each!(vaddq_f32, a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        // SAFETY: NEON is available (trait contract).
        unsafe { each!(vsubq_f32, a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        // SAFETY: NEON is available (trait contract).
        unsafe { each!(vmulq_f32, a, b) }
    }
    #[inline(always)]
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V {
        // SAFETY: NEON is available (trait contract).
        unsafe { each!(vdivq_f32, a, b) }
    }
    #[inline(always)]
    unsafe fn sqrt(a: Self::V) -> Self::V {
        // SAFETY: NEON is available (trait contract).
        unsafe { each!(vsqrtq_f32, a) }
    }
}

// f16 in software: the NEON conversion intrinsics need Rust's unstable `f16` support.
impl HalfConv for Neon {}

entry_points!(Neon, "neon");
