//! AVX2: a row is two `__m256`, the 16 f64 lanes four `__m256d`. No FMA instructions, by
//! the bit-exact rule, so this runs on every AVX2 CPU.

use core::arch::x86_64::*;

use super::entry_points;
use super::x86::HalfVector;
use crate::kernels::LANES;
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
    type Acc = [__m256d; 4];

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
    #[inline(always)]
    unsafe fn acc_zero() -> Self::Acc {
        // SAFETY: AVX is available (trait contract).
        unsafe { [_mm256_setzero_pd(); 4] }
    }
    #[inline(always)]
    unsafe fn acc_add_squares(acc: Self::Acc, x: Self::V) -> Self::Acc {
        // SAFETY: AVX is available (trait contract).
        unsafe {
            let sq = |h: __m128| {
                let d = _mm256_cvtps_pd(h);
                _mm256_mul_pd(d, d)
            };
            [
                _mm256_add_pd(acc[0], sq(_mm256_castps256_ps128(x[0]))),
                _mm256_add_pd(acc[1], sq(_mm256_extractf128_ps::<1>(x[0]))),
                _mm256_add_pd(acc[2], sq(_mm256_castps256_ps128(x[1]))),
                _mm256_add_pd(acc[3], sq(_mm256_extractf128_ps::<1>(x[1]))),
            ]
        }
    }
    #[inline(always)]
    unsafe fn acc_lanes(acc: Self::Acc) -> [f64; LANES] {
        let mut out = [0.0; LANES];
        // SAFETY: `out` has 16 f64, four stores of 4 each.
        unsafe {
            for (k, a) in acc.iter().enumerate() {
                _mm256_storeu_pd(out.as_mut_ptr().add(4 * k), *a);
            }
        }
        out
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
