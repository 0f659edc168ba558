//! The floating-point mode the arithmetic runs in, whatever mode the caller's thread is in.
//!
//! The bits every backend and thread count agree on are those of IEEE arithmetic with
//! round to nearest and subnormals kept. A thread can be in another mode: flush-to-zero
//! and denormals-are-zero (which `torch.set_flush_denormal(True)` sets in a host process),
//! another rounding direction, or unmasked exceptions. That mode is per thread, and worker
//! threads do not share it, so 1 and 2 threads would give different bits, and ε = 1e-45
//! would flush to 0. So every entry point of this crate that computes sets the default
//! mode on entry and restores the caller's on exit: [`StepScalars::new`], [`LayerReport::plan`],
//! [`LambConfig::validate`], [`Schedule::factor`] and [`Schedule::validate`], and the
//! [`Backend`] methods that run kernels (phases, whole steps, sums of squares). That covers
//! every floating-point operation of a step, including in threads that call the `Backend`
//! methods (lamb-std also enters the mode for the whole of its step). What is not
//! covered: the building blocks that are public for tests and references (the codecs of
//! [`codec`]) and the `+` of [`LayerNorms`] run in the caller's mode; enter
//! [`DefaultFpMode`] around them to get the same bits.
//!
//! | target | register | what is set on entry |
//! |---|---|---|
//! | x86-64, x86 with SSE | MXCSR | FTZ (15) and DAZ (6) off, rounding (13–14) to nearest, all exceptions masked (7–12) |
//! | aarch64 | FPCR | FZ (24), FZ16 (19), DN (25), AHP (26), FIZ/AH/NEP (0–2) off, RMode (22–23) to nearest, traps (8–12, 15) off |
//! | others (32-bit Arm, wasm, x86 without SSE, ...) | — | nothing: the caller must leave the default mode (32-bit Arm's FPSCR has the same FZ and RMode fields; startup code leaves them at their reset values, which are the default) |
//!
//! The cost is one read of the control register per entry point (per layer piece, never per
//! row), and two writes only where the caller's mode is not the default.
//!
//! Rust has no way to tell the compiler that arithmetic depends on the mode, so the
//! computation is fenced: inputs that are plain values and the result pass through
//! [`core::hint::black_box`] between the mode switches, which the compiler keeps in order
//! with them; the kernels are called through function pointers that read memory after the
//! switch.
//!
//! [`StepScalars::new`]: crate::StepScalars::new
//! [`LayerReport::plan`]: crate::LayerReport::plan
//! [`LambConfig::validate`]: crate::LambConfig::validate
//! [`Schedule::factor`]: crate::Schedule::factor
//! [`Schedule::validate`]: crate::Schedule::validate
//! [`Backend`]: crate::Backend
//! [`codec`]: crate::codec
//! [`LayerNorms`]: crate::LayerNorms

use core::marker::PhantomData;

/// While alive, the calling thread computes in the default floating-point mode; dropping it
/// restores the mode the thread had. Not `Send`: the mode belongs to a thread.
///
/// ```
/// use lamb_core::fpenv::DefaultFpMode;
/// let _mode = DefaultFpMode::enter();
/// // Arithmetic here rounds to nearest and keeps subnormals.
/// assert!(core::hint::black_box(f32::MIN_POSITIVE) / 2.0 > 0.0);
/// ```
#[must_use = "the mode is restored when the guard is dropped"]
pub struct DefaultFpMode {
    /// The caller's control register, if it had to be changed.
    saved: Option<imp::Register>,
    not_send: PhantomData<*const ()>,
}

impl DefaultFpMode {
    /// Sets the default mode on this thread, remembering the current one.
    #[inline]
    pub fn enter() -> DefaultFpMode {
        DefaultFpMode {
            saved: imp::enter(),
            not_send: PhantomData,
        }
    }

    /// Whether the calling thread is in the default mode now (always `true` on targets
    /// whose mode this module does not handle).
    pub fn is_current() -> bool {
        imp::is_default()
    }
}

impl Drop for DefaultFpMode {
    #[inline]
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            imp::restore(saved);
        }
    }
}

/// Runs `f(args)` in the default mode. `args` and the result pass through `black_box`
/// inside the guarded region, so the arithmetic on them cannot be moved out of it.
#[inline(always)]
pub(crate) fn in_default_mode<A, T>(args: A, f: impl FnOnce(A) -> T) -> T {
    let mode = DefaultFpMode::enter();
    let out = core::hint::black_box(f(core::hint::black_box(args)));
    drop(mode);
    out
}

#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "x86", target_feature = "sse")
))]
mod imp {
    use core::arch::asm;

    pub(super) type Register = u32;

    /// MXCSR's control bits: DAZ (6), the exception masks (7–12), rounding control (13–14)
    /// and FTZ (15). Bits 0–5 are the exception flags; 16–31 are reserved (zero).
    const CONTROL: u32 = 0xffc0;
    /// Their default (the power-on value): every exception masked, round to nearest, no
    /// flushing.
    const DEFAULT: u32 = 0x1f80;

    #[inline(always)]
    fn read() -> u32 {
        let mut csr = 0u32;
        // SAFETY: STMXCSR stores the 32-bit MXCSR at the address given, which is a live,
        // writable, aligned local u32. SSE is baseline on x86-64 (and the cfg requires it on
        // x86). The asm touches no other memory and no stack.
        unsafe {
            asm!(
                "stmxcsr [{}]",
                in(reg) &mut csr,
                options(nostack, preserves_flags)
            )
        };
        csr
    }

    #[inline(always)]
    fn write(csr: u32) {
        // SAFETY: LDMXCSR loads MXCSR from a live local u32. The value is either one read
        // from MXCSR or one with only control bits of a read value changed to their
        // defaults, so no reserved bit is set (which would fault). Not `readonly`/`nomem`:
        // the compiler must not move memory accesses (the kernels' loads and stores) across
        // the mode switch.
        unsafe {
            asm!(
                "ldmxcsr [{}]",
                in(reg) &csr,
                options(nostack, preserves_flags)
            )
        };
    }

    #[inline(always)]
    pub(super) fn enter() -> Option<u32> {
        let csr = read();
        if csr & CONTROL == DEFAULT {
            return None;
        }
        write(csr & !CONTROL | DEFAULT);
        Some(csr)
    }

    /// Restores the caller's MXCSR exactly (its exception flags included).
    #[inline(always)]
    pub(super) fn restore(saved: u32) {
        write(saved);
    }

    pub(super) fn is_default() -> bool {
        read() & CONTROL == DEFAULT
    }
}

#[cfg(target_arch = "aarch64")]
mod imp {
    use core::arch::asm;

    pub(super) type Register = u64;

    /// FPCR's bits that change results or trap: FIZ, AH, NEP (0–2, FEAT_AFP; RES0 without
    /// it, so writing 0 is harmless), the trap enables IOE, DZE, OFE, UFE, IXE (8–12) and
    /// IDE (15), FZ16 (19), RMode (22–23), FZ (24), DN (25), AHP (26). Their default is 0.
    const CONTROL: u64 = 0b111 | 0b1_1111 << 8 | 1 << 15 | 1 << 19 | 0b1_1111 << 22;

    #[inline(always)]
    fn read() -> u64 {
        let fpcr: u64;
        // SAFETY: FPCR is readable at EL0 and above whenever floating point is enabled,
        // which the kernels need anyway; MRS touches only the output register.
        unsafe { asm!("mrs {}, fpcr", out(reg) fpcr, options(nostack, preserves_flags)) };
        fpcr
    }

    #[inline(always)]
    fn write(fpcr: u64) {
        // SAFETY: the value is one read from FPCR, or one with only the control bits above
        // cleared (0 is a valid value of each; the FEAT_AFP bits are RES0 without the
        // feature). Writes to FPCR take effect for the instructions that follow. No
        // `nomem`: memory accesses must not move across the mode switch.
        unsafe { asm!("msr fpcr, {}", in(reg) fpcr, options(nostack, preserves_flags)) };
    }

    #[inline(always)]
    pub(super) fn enter() -> Option<u64> {
        let fpcr = read();
        if fpcr & CONTROL == 0 {
            return None;
        }
        write(fpcr & !CONTROL);
        Some(fpcr)
    }

    #[inline(always)]
    pub(super) fn restore(saved: u64) {
        write(saved);
    }

    pub(super) fn is_default() -> bool {
        read() & CONTROL == 0
    }
}

#[cfg(not(any(
    target_arch = "x86_64",
    all(target_arch = "x86", target_feature = "sse"),
    target_arch = "aarch64"
)))]
mod imp {
    /// No control register handled on this target (see the module docs).
    #[derive(Clone, Copy)]
    pub(super) struct Register;

    #[inline(always)]
    pub(super) fn enter() -> Option<Register> {
        None
    }

    #[inline(always)]
    pub(super) fn restore(_: Register) {}

    pub(super) fn is_default() -> bool {
        true
    }
}
