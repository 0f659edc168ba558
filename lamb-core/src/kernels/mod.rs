//! The element-wise math and the reduction order shared by every backend.
//!
//! Bit-exact rule: every backend computes each element with the operations of
//! [`scalar::update`] in the same order, with separate multiplies and adds (never FMA) and
//! IEEE `sqrt` and `/` (never the approximate reciprocals). Sums of squares are f32 products
//! added into 16 f32 lanes (element `i` of a block goes to lane `i % 16`), the lanes folded
//! by [`fold_lanes`] into one f32 per block, and the blocks of [`BLOCK`] elements added in
//! f64, in index order, by the caller.
//!
//! Why f32 lanes. f64 lanes (exact products, no overflow) cost nothing measurable on x86
//! with data from DRAM, but they are half of a step's instructions on a Cortex-M4F, whose
//! FPU has no f64: every f64 product and sum is a software routine. The f32 lanes hold at
//! most 64 terms each, so a block sum is within ~64 f32 roundings of the exact sum; the f64
//! sum over blocks keeps that error from growing with the layer. A lane that overflows f32
//! (‖p‖ or ‖u‖ of a block above ~1.8e19) makes the sum infinite, and the step is refused
//! like any other non-finite value ([`crate::LayerReport::plan`]). At the other end, the
//! square of an element below ~1e-19 is subnormal in f32 (fewer significant bits), and
//! below ~4e-23 it is 0: only norms that small lose accuracy (a layer of such tiny
//! values gets ‖p‖ = 0 and the zero-norm rule). Every backend adds the same f32 values in
//! the same order, so the bits are still the same everywhere.

pub(crate) mod arch;
// Where no SIMD backend is compiled (`not(wide_simd)`: build.rs, `arch/mod.rs`), only the scalar kernels' share of
// these two modules (the codecs' chunk helpers, the software f16 conversions) is used.
#[cfg_attr(not(wide_simd), allow(dead_code))]
pub(crate) mod compact;
pub(crate) mod scalar;
#[cfg_attr(not(wide_simd), allow(dead_code))]
pub(crate) mod simd;

/// Elements per reduction block. Threads split layers on multiples of this.
pub const BLOCK: usize = 1024;

/// Lanes of the partial sums inside a block.
pub const LANES: usize = 16;

/// Folds 16 f32 lane partials in the fixed tree `l[j] += l[j + w]` for `w = 8, 4, 2, 1`,
/// in f32; the block's sum, exactly widened to f64 for the sum over blocks.
#[inline(always)]
pub(crate) fn fold_lanes(mut l: [f32; LANES]) -> f64 {
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            l[j] += l[j + w];
        }
        w /= 2;
    }
    l[0] as f64
}

/// IEEE single-precision square root, correctly rounded on every target: one instruction
/// where the FPU has one. `core` has no `f32::sqrt`; libm's `sqrtf` is one instruction on
/// x86-64 (SSE) and aarch64, but a software loop on 32-bit Arm, whose hard-float targets
/// (`eabihf`: VFPv2 and later, the Cortex-M4F's FPv4-SP included) all have `vsqrt.f32`
/// (five instructions here with the register moves, against ~75 for libm's loop).
/// Both are correctly rounded, so the bits are the same.
#[inline(always)]
pub(crate) fn sqrtf(x: f32) -> f32 {
    #[cfg(all(target_arch = "arm", target_abi = "eabihf"))]
    {
        let mut bits = x.to_bits();
        // SAFETY: the hard-float ABI guarantees a VFP unit with `vsqrt.f32` (VFPv2 and
        // later). Stable Rust cannot name VFP registers in asm operands on these targets
        // (the `sreg` class needs the unstable `vfp2` feature), so the value travels in a
        // core register and the asm borrows s0, restoring it before it ends: no register
        // the compiler uses changes but `bits` and the scratch `saved`. No memory, stack
        // or flags are touched (FPSCR's cumulative exception bits are not state Rust
        // tracks).
        unsafe {
            core::arch::asm!(
                "vmov {saved}, s0",
                "vmov s0, {bits}",
                "vsqrt.f32 s0, s0",
                "vmov {bits}, s0",
                "vmov s0, {saved}",
                bits = inout(reg) bits,
                saved = out(reg) _,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        f32::from_bits(bits)
    }
    #[cfg(not(all(target_arch = "arm", target_abi = "eabihf")))]
    {
        libm::sqrtf(x)
    }
}
