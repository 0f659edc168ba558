//! Dispatch: which backend runs, and [`Backend`]'s whole API.
//!
//! - `backend.rs`: the [`Backend`] enum and its names (a leaf, so errors can name one).
//! - this file: detection and the [`Kernels`] table of a supported backend.
//! - `phases.rs`: the two phases of a layer (and sums of squares), for f32 buffers and for
//!   layers in compact storage, block by block over the kernels.
//! - `step.rs`: a whole step of one layer (phase 1, [`LayerReport::plan`], phase 2).
//!
//! Detection is modelled on BLAKE3's `platform.rs`: it runs once and is cached in an atomic;
//! every backend can be asked for explicitly, and an unsupported one is refused with an
//! error rather than run. x86-64 detection checks the CPUID feature bits *and* XCR0 (via
//! `xgetbv`) so that a CPU whose OS did not enable YMM/ZMM state is not sent AVX code.
//!
//! [`LayerReport::plan`]: crate::LayerReport::plan

mod backend;
mod phases;
mod step;

pub use backend::Backend;
pub use step::step_layer;

use core::sync::atomic::{AtomicU8, Ordering};

use crate::error::LambError;
use crate::kernels::{arch, scalar};
use crate::layer::{Grads, Moments, Params};
use crate::scalars::{LayerNorms, StepScalars};

/// The entry points of one supported backend. Only [`Backend::kernels`] makes one, after
/// checking support, which is what makes calling these `unsafe fn`s sound.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    pub(crate) block_norms: BlockNormsFn,
    pub(crate) apply: ApplyFn,
    pub(crate) block_sum_squares: unsafe fn(&[f32]) -> f64,
    pub(crate) compact_block_norms: CompactNormsFn,
    pub(crate) compact_apply: CompactApplyFn,
    pub(crate) compact_block_sum_squares: unsafe fn(&Grads, usize, usize) -> f64,
}

/// Phase 1 of one block in compact storage: `(scalars, p, g, moments, at, n) -> sums`.
type CompactNormsFn =
    unsafe fn(&StepScalars, &Params, &Grads, &Moments, usize, usize) -> LayerNorms;
/// Phase 2 in compact storage: `(scalars, step_size, p, g, moments, index0)`.
type CompactApplyFn = unsafe fn(&StepScalars, f32, &mut Params, &Grads, &mut Moments, usize);

/// The [`Kernels`] of a backend module.
macro_rules! kernels_of {
    ($($m:ident)::+) => {
        Kernels {
            block_norms: $($m)::+::block_norms,
            apply: $($m)::+::apply,
            block_sum_squares: $($m)::+::block_sum_squares,
            compact_block_norms: $($m)::+::compact_block_norms,
            compact_apply: $($m)::+::compact_apply,
            compact_block_sum_squares: $($m)::+::compact_block_sum_squares,
        }
    };
}

/// Phase 1 of one block: `(scalars, p, g, m, v) -> sums`.
type BlockNormsFn = unsafe fn(&StepScalars, &[f32], &[f32], &[f32], &[f32]) -> LayerNorms;
/// Phase 2: `(scalars, step_size, p, g, m, v)`.
type ApplyFn = unsafe fn(&StepScalars, f32, &mut [f32], &[f32], &mut [f32], &mut [f32]);

const UNKNOWN: u8 = 0xff;
const NONE: u8 = 0xfe;
/// Bit `b` set: backend `b` is supported. `UNKNOWN` until the first detection.
static SUPPORTED: AtomicU8 = AtomicU8::new(UNKNOWN);
/// The backend [`Backend::detect`] returns if set (`NONE` otherwise).
static DEFAULT: AtomicU8 = AtomicU8::new(NONE);

impl Backend {
    /// The backend to use: the one set with [`Backend::set_default`], else the fastest this
    /// CPU supports. Detection runs once; later calls are an atomic load.
    pub fn detect() -> Backend {
        let forced = DEFAULT.load(Ordering::Relaxed);
        if forced != NONE {
            return Backend::ALL[forced as usize];
        }
        let bits = supported_bits();
        let best = Backend::ALL
            .iter()
            .rev()
            .find(|b| bits & (1 << **b as u8) != 0);
        // Scalar is always supported, so `find` always succeeds.
        best.copied().unwrap_or(Backend::Scalar)
    }

    /// Makes `backend` what [`Backend::detect`] returns (`None`: back to the fastest).
    /// The environment-free override for `no_std`; lamb-std reads `LAMB_BACKEND` into it.
    ///
    /// ```
    /// use lamb_core::Backend;
    /// Backend::set_default(Some(Backend::Scalar)).unwrap();
    /// assert_eq!(Backend::detect(), Backend::Scalar);
    /// Backend::set_default(None).unwrap();
    /// ```
    pub fn set_default(backend: Option<Backend>) -> Result<(), LambError> {
        let v = match backend {
            None => NONE,
            Some(b) => b.checked().ok_or(LambError::Unsupported { backend: b })? as u8,
        };
        DEFAULT.store(v, Ordering::Relaxed);
        Ok(())
    }

    /// `Some(self)` if this CPU and OS support it, else `None`.
    pub fn checked(self) -> Option<Backend> {
        (supported_bits() & (1 << self as u8) != 0).then_some(self)
    }

    /// The backends this CPU supports, slowest first.
    pub fn available() -> impl Iterator<Item = Backend> {
        Backend::ALL.into_iter().filter(|b| b.checked().is_some())
    }

    /// The entry points, if this CPU supports the backend.
    pub(crate) fn kernels(self) -> Result<Kernels, LambError> {
        if self.checked().is_none() {
            return Err(LambError::Unsupported { backend: self });
        }
        Ok(match self {
            Backend::Scalar => kernels_of!(scalar),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => kernels_of!(arch::avx2),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => kernels_of!(arch::avx512),
            #[cfg(target_arch = "aarch64")]
            Backend::Neon => kernels_of!(arch::neon),
            // Portable, and any backend not compiled for this architecture (whose support
            // bit is never set, so it was refused above).
            _ => kernels_of!(arch::portable),
        })
    }
}

fn supported_bits() -> u8 {
    let bits = SUPPORTED.load(Ordering::Relaxed);
    if bits != UNKNOWN {
        return bits;
    }
    let bits = detect_bits();
    SUPPORTED.store(bits, Ordering::Relaxed);
    bits
}

// `mut` is unused on targets with no runtime-detected backend (e.g. Cortex-M).
#[allow(unused_mut)]
fn detect_bits() -> u8 {
    let mut bits = 1 << Backend::Scalar as u8 | 1 << Backend::Portable as u8;
    #[cfg(target_arch = "x86_64")]
    {
        let f = x86::features();
        if f.avx2 {
            bits |= 1 << Backend::Avx2 as u8;
        }
        if f.avx512f {
            bits |= 1 << Backend::Avx512 as u8;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // NEON (Advanced SIMD) is mandatory in the aarch64 ABI that Rust targets.
        bits |= 1 << Backend::Neon as u8;
    }
    bits
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};

    pub(super) struct Features {
        pub(super) avx2: bool,
        pub(super) avx512f: bool,
    }

    /// XCR0 bits: SSE and AVX (YMM) state; opmask, ZMM_Hi256 and Hi16_ZMM state.
    const XCR0_YMM: u64 = 0b110;
    const XCR0_ZMM: u64 = 0b1110_0110;

    pub(super) fn features() -> Features {
        let none = Features {
            avx2: false,
            avx512f: false,
        };
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU.
        let (max_leaf, leaf1) = unsafe { (__cpuid(0).eax, __cpuid(1)) };
        let osxsave = leaf1.ecx & (1 << 27) != 0;
        let avx = leaf1.ecx & (1 << 28) != 0;
        // The avx2 backend converts f16 with F16C (every AVX2 CPU has it, but check).
        let f16c = leaf1.ecx & (1 << 29) != 0;
        if !(osxsave && avx) || max_leaf < 7 {
            return none;
        }
        // SAFETY: OSXSAVE is set, so XGETBV is enabled and XCR0 readable.
        let xcr0 = unsafe { xcr0() };
        #[allow(unused_unsafe)]
        // SAFETY: leaf 7 exists (max_leaf >= 7).
        let leaf7 = unsafe { __cpuid_count(7, 0) };
        Features {
            avx2: xcr0 & XCR0_YMM == XCR0_YMM && leaf7.ebx & (1 << 5) != 0 && f16c,
            // F and DQ (DQ's 64-bit multiplies serve the stochastic-rounding hash). Every
            // AVX-512 CPU but the Xeon Phi has both.
            avx512f: xcr0 & XCR0_ZMM == XCR0_ZMM
                && leaf7.ebx & (1 << 16) != 0
                && leaf7.ebx & (1 << 17) != 0,
        }
    }

    /// # Safety
    /// CPUID.1:ECX.OSXSAVE must be set.
    #[target_feature(enable = "xsave")]
    unsafe fn xcr0() -> u64 {
        // SAFETY: the caller checked OSXSAVE, which makes XGETBV legal.
        unsafe { _xgetbv(0) }
    }
}
