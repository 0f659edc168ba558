//! What the two x86 backends share: f16 ⇄ f32 conversion in hardware, one vector at a time
//! (8 elements with F16C for AVX2, 16 with AVX-512F), the tail in software. Both give the
//! bits of the software conversions in [`crate::codec`] (round to nearest even).

use crate::codec::{f16_to_f32, f32_to_f16};
use crate::kernels::simd::HalfConv;

/// The hardware conversion of one vector of [`HalfVector::WIDTH`] elements.
///
/// # Safety
/// Implementations may only be used where their instruction set is available (the
/// contract of [`Simd`](crate::kernels::simd::Simd)).
pub(super) unsafe trait HalfVector {
    /// Elements per conversion.
    const WIDTH: usize;

    /// Converts `WIDTH` f16 at `src` to f32 at `out`. Both must be valid for `WIDTH`
    /// elements (no alignment needed).
    unsafe fn widen(src: *const half::f16, out: *mut f32);

    /// Converts `WIDTH` f32 at `src` to f16 at `out`, rounding to nearest even. Both must be
    /// valid for `WIDTH` elements (no alignment needed).
    unsafe fn narrow(src: *const f32, out: *mut half::f16);
}

impl<H: HalfVector> HalfConv for H {
    #[inline(always)]
    unsafe fn f16_to_f32(src: &[half::f16], out: &mut [f32]) {
        let n = src.len().min(out.len());
        let mut i = 0;
        // SAFETY: H's instruction set is available (caller); i + WIDTH <= n for both slices.
        unsafe {
            while i + H::WIDTH <= n {
                H::widen(src.as_ptr().add(i), out.as_mut_ptr().add(i));
                i += H::WIDTH;
            }
        }
        for k in i..n {
            out[k] = f16_to_f32(src[k].to_bits());
        }
    }

    #[inline(always)]
    unsafe fn f32_to_f16(src: &[f32], out: &mut [half::f16]) {
        let n = src.len().min(out.len());
        let mut i = 0;
        // SAFETY: H's instruction set is available (caller); i + WIDTH <= n for both slices.
        unsafe {
            while i + H::WIDTH <= n {
                H::narrow(src.as_ptr().add(i), out.as_mut_ptr().add(i));
                i += H::WIDTH;
            }
        }
        for k in i..n {
            out[k] = half::f16::from_bits(f32_to_f16(src[k]));
        }
    }
}
