//! One module per instruction set: each is a [`Simd`](super::simd::Simd) impl plus the entry
//! points that [`entry_points!`] declares over the generic algorithms of
//! [`simd`](super::simd) (f32 buffers) and [`compact`](super::compact) (compact storage), in
//! the manner of memchr's `arch` modules.

// Where `wide` has SIMD registers (`wide_simd`, set by build.rs); anywhere else its vectors
// are arrays of scalars.
#[cfg(wide_simd)]
pub(crate) mod portable;

/// Without SIMD registers (Cortex-M, RISC-V without V, ...), the portable backend is the
/// scalar kernels themselves: the same functions in the dispatch table, no second copy.
#[cfg(not(wide_simd))]
pub(crate) use super::scalar as portable;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;

/// Declares a backend module's six entry points over the generic algorithms, compiled with
/// the given target features (none for the portable backend), so that each ISA module is
/// only its [`Simd`](super::simd::Simd) impl. They are the functions the dispatch table
/// holds; every generic function below them is `#[inline(always)]`, so the whole loop is
/// compiled with these features.
// Unused where no SIMD module is compiled (e.g. Cortex-M).
#[allow(unused_macros, unused_imports)]
macro_rules! entry_points {
    ($simd:ty $(, $feature:literal)*) => {
        /// Phase 1 of one block.
        ///
        /// # Safety
        /// The CPU must support the enabled features; the slices must have equal lengths.
        $(#[target_feature(enable = $feature)])*
        pub(crate) unsafe fn block_norms(
            s: &$crate::scalars::StepScalars,
            p: &[f32],
            g: &[f32],
            m: &[f32],
            v: &[f32],
        ) -> $crate::scalars::LayerNorms {
            // SAFETY: forwarded from this function's contract.
            unsafe { $crate::kernels::simd::block_norms::<$simd>(s, p, g, m, v) }
        }

        /// Phase 2.
        ///
        /// # Safety
        /// The CPU must support the enabled features; the slices must have equal lengths.
        $(#[target_feature(enable = $feature)])*
        pub(crate) unsafe fn apply(
            s: &$crate::scalars::StepScalars,
            step: f32,
            p: &mut [f32],
            g: &[f32],
            m: &mut [f32],
            v: &mut [f32],
        ) {
            // SAFETY: forwarded from this function's contract.
            unsafe { $crate::kernels::simd::apply::<$simd>(s, step, p, g, m, v) }
        }

        /// Σx² of one block.
        ///
        /// # Safety
        /// The CPU must support the enabled features.
        $(#[target_feature(enable = $feature)])*
        pub(crate) unsafe fn block_sum_squares(x: &[f32]) -> f64 {
            // SAFETY: forwarded from this function's contract.
            unsafe { $crate::kernels::simd::block_sum_squares::<$simd>(x) }
        }

        /// Phase 1 of one block in compact storage.
        ///
        /// # Safety
        /// The CPU must support the enabled features; the range must be in bounds.
        $(#[target_feature(enable = $feature)])*
        pub(crate) unsafe fn compact_block_norms(
            s: &$crate::scalars::StepScalars,
            p: &$crate::layer::Params,
            g: &$crate::layer::Grads,
            mo: &$crate::layer::Moments,
            at: usize,
            n: usize,
        ) -> $crate::scalars::LayerNorms {
            // SAFETY: forwarded from this function's contract.
            unsafe { $crate::kernels::compact::block_norms::<$simd>(s, p, g, mo, at, n) }
        }

        /// Phase 2 in compact storage.
        ///
        /// # Safety
        /// The CPU must support the enabled features; the buffers must match in length.
        $(#[target_feature(enable = $feature)])*
        pub(crate) unsafe fn compact_apply(
            s: &$crate::scalars::StepScalars,
            step: f32,
            p: &mut $crate::layer::Params,
            g: &$crate::layer::Grads,
            mo: &mut $crate::layer::Moments,
            index0: usize,
        ) {
            // SAFETY: forwarded from this function's contract.
            unsafe { $crate::kernels::compact::apply::<$simd>(s, step, p, g, mo, index0) }
        }

        /// Σg² of one block of gradients in any storage.
        ///
        /// # Safety
        /// The CPU must support the enabled features; the range must be in bounds.
        $(#[target_feature(enable = $feature)])*
        pub(crate) unsafe fn compact_block_sum_squares(
            g: &$crate::layer::Grads,
            at: usize,
            n: usize,
        ) -> f64 {
            // SAFETY: forwarded from this function's contract.
            unsafe { $crate::kernels::compact::block_sum_squares::<$simd>(g, at, n) }
        }
    };
}
#[allow(unused_imports)]
use entry_points;
