//! The calling thread's floating-point mode, set with the platform's own means
//! (`_mm_setcsr` on x86-64, `msr fpcr` on aarch64), and subnormal test values: what the
//! fp-mode tests of lamb-core and lamb-std share (each `tests/fp_mode.rs` includes this
//! file with `#[path]`; the crates' packages do not ship their tests).

// Each including test uses part of this file.
#![allow(dead_code)]

#[cfg(target_arch = "x86_64")]
pub mod mode {
    #[allow(deprecated)]
    use core::arch::x86_64::{_mm_getcsr, _mm_setcsr};
    /// The control bits of MXCSR (the rest are sticky exception flags).
    pub const CONTROL: u64 = 0xffc0;
    /// Flush-to-zero, denormals-are-zero and round toward zero, exceptions masked.
    pub const HOSTILE: u64 = 0x1f80 | 1 << 15 | 1 << 6 | 0b11 << 13;
    /// Invalid, divide-by-zero and overflow exceptions unmasked (they would trap).
    pub const TRAPPING: u64 = 0x1f80 & !(1 << 7 | 1 << 9 | 1 << 10);
    pub fn get() -> u64 {
        // SAFETY: SSE is baseline on x86-64.
        #[allow(deprecated)]
        unsafe {
            _mm_getcsr() as u64
        }
    }
    pub fn set(x: u64) {
        // SAFETY: as above; the values have no reserved bit set.
        #[allow(deprecated)]
        unsafe {
            _mm_setcsr(x as u32)
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub mod mode {
    /// The bits of FPCR this test sets.
    pub const CONTROL: u64 = 1 << 24 | 0b11 << 22 | 1 << 19 | 0b1_1111 << 8;
    /// FZ, FZ16 and round toward zero (RMode 0b11).
    pub const HOSTILE: u64 = 1 << 24 | 0b11 << 22 | 1 << 19;
    /// Invalid, divide-by-zero and overflow traps enabled (ignored by CPUs without
    /// trapping support).
    pub const TRAPPING: u64 = 1 << 8 | 1 << 9 | 1 << 10;
    pub fn get() -> u64 {
        let x: u64;
        // SAFETY: reading FPCR has no side effect.
        unsafe { core::arch::asm!("mrs {}, fpcr", out(reg) x) };
        x
    }
    pub fn set(x: u64) {
        // SAFETY: writes valid FPCR control bits.
        unsafe { core::arch::asm!("msr fpcr, {}", in(reg) x) };
    }
}

/// Sets `bits` on this thread until dropped (restoring the mode found), so a failed
/// assertion does not leave the test thread in the mode.
pub struct Mode {
    old: u64,
    /// The control bits as read back after setting them (a CPU may ignore some, e.g.
    /// trap enables or FZ16 on aarch64 cores without them).
    pub now: u64,
}
impl Mode {
    pub fn set(bits: u64) -> Mode {
        let old = mode::get();
        mode::set(old & !mode::CONTROL | bits);
        Mode {
            old,
            now: mode::get() & mode::CONTROL,
        }
    }
}
impl Drop for Mode {
    fn drop(&mut self) {
        mode::set(self.old);
    }
}

/// Subnormal values mixed into ordinary ones.
pub fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let u = (x >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
            match i % 4 {
                0 => f32::from_bits(1 + x % 0x7f_ffff) * u.signum(), // subnormal
                1 => u * 1e-40,                                      // subnormal
                _ => u * scale,
            }
        })
        .collect()
}
