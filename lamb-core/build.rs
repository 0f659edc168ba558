//! Names one target condition once: `wide_simd`, set where the `wide` crate has SIMD
//! registers (SSE2, wasm simd128, aarch64 NEON; the same list gates `wide`'s own SIMD
//! paths). There the portable backend is `wide`'s vectors; elsewhere (Cortex-M, RISC-V
//! without V) its vectors would be arrays of scalars, and the portable backend is the
//! scalar kernels themselves (`src/kernels/arch/mod.rs`).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(wide_simd)");
    println!("cargo::rerun-if-changed=build.rs");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let has = |f: &str| features.split(',').any(|x| x == f);
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if has("sse2") || has("simd128") || (arch == "aarch64" && has("neon")) {
        println!("cargo::rustc-cfg=wide_simd");
    }
}
