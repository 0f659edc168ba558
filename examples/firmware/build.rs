//! Picks the memory map for the target and links with `link.x`.

use std::{env, fs, path::PathBuf};

fn main() {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.x");
    println!("cargo:rerun-if-changed=memory");
    if os != "none" {
        // A host `cargo check`/`clippy`: nothing is linked.
        return;
    }
    let memory = match arch.as_str() {
        "arm" => "memory/cortex-m.x",
        "aarch64" => "memory/aarch64.x",
        other => panic!("no memory map for target_arch {other:?}; add one under memory/"),
    };
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    fs::copy(memory, out.join("memory.x")).unwrap();
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rustc-link-arg-bins=-Tlink.x");
    println!(
        "cargo:rustc-link-search={}",
        env::current_dir().unwrap().display()
    );
}
