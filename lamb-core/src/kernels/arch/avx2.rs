//! AVX2: a row (and the 16 lane partials of a sum) is two `__m256`. No FMA instructions, by
//! the bit-exact rule, so this runs on every AVX2 CPU.

use core::arch::x86_64::*;

use super::entry_points;
use super::x86::HalfVector;
use crate::kernels::simd::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Avx2;

macro_rules! each {
    ($f:ident, $($a:ident),+) => {
        [$f($($a[0]),+), $f($($a[1]),+)]
    };
}

// SAFETY: every method uses AVX/AVX2 instructions only; callers are `#[target_feature(enable
// = "avx2")]` functions reached only after detection found AVX2 and OS-enabled YMM state.
unsafe impl Simd for Avx2 {
    type V = [__m256; 2];

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        // SAFETY: AVX is available (trait contract).
        unsafe { [_mm256_set1_ps(x); 2] }
    }
    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self::V {
        // SAFETY: the caller guarantees 16 readable f32 at `ptr`; loadu needs no alignment.
        unsafe { [_mm256_loadu_ps(ptr), _mm256_loadu_ps(ptr.add(8))] }
    }
    #[inline(always)]
    unsafe fn store(ptr: *mut f32, v: Self::V) {
        // SAFETY: the caller guarantees 16 writable f32 at `ptr`; storeu needs no alignment.
        unsafe {
            _mm256_storeu_ps(ptr, v[0]);
            _mm256_storeu_ps(ptr.add(8), v[1]);
        }
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        // SAFETY: AVX is available (trait contract).
        unsafe { each!(_mm256_add_ps, a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        // SAFETY: AVX is available (trait contract).
        unsafe { each!(_mm256_sub_ps, a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        // SAFETY: AVX is available (trait contract).
        unsafe { each!(_mm256_mul_ps, a, b) }
    }
    #[inline(always)]
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V {
        // SAFETY: AVX is available (trait contract).
        unsafe { each!(_mm256_div_ps, a, b) }
    }
    #[inline(always)]
    unsafe fn sqrt(a: Self::V) -> Self::V {
        // SAFETY: AVX is available (trait contract).
        unsafe { each!(_mm256_sqrt_ps, a) }
    }
}

// SAFETY: F16C is enabled with AVX2 (detection requires both).
unsafe impl HalfVector for Avx2 {
    const WIDTH: usize = 8;

    #[inline(always)]
    unsafe fn widen(src: *const half::f16, out: *mut f32) {
        // SAFETY: the caller guarantees 8 readable f16 at `src` and 8 writable f32 at `out`;
        // loadu/storeu need no alignment.
        unsafe { _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(src.cast()))) }
    }

    #[inline(always)]
    unsafe fn narrow(src: *const f32, out: *mut half::f16) {
        // SAFETY: the caller guarantees 8 readable f32 at `src` and 8 writable f16 at `out`;
        // loadu/storeu need no alignment.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src));
            _mm_storeu_si128(out.cast(), h);
        }
    }
}

entry_points!(Avx2, "avx2", "f16c");
