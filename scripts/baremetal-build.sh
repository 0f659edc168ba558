#!/usr/bin/env bash
# baremetal-build.sh — build lamb-core (no_std, no alloc) for bare-metal targets, link the
# examples/firmware image that uses it, and report the image's section sizes.
#
# Uses Debian's rustc-web 1.96 with rust-web-src: `-Zbuild-std=core` (RUSTC_BOOTSTRAP=1 on a
# stable distro compiler whose library source matches it exactly). Building only `core` is
# what proves "no alloc": an `extern crate alloc` anywhere would fail to resolve.
# An rlib proves that the crate compiles, not that it links: the firmware binary makes the
# linker resolve every symbol lamb-core pulls in (libm, compiler-builtins' soft-float and mem
# routines, ...) and checks that the image fits its memory map.
# Prerequisite: scripts/aarch64-setup.sh --bare-metal.
#
# Usage: scripts/baremetal-build.sh [TARGET...]
#   default targets: thumbv7em-none-eabihf aarch64-unknown-none
# Env:
#   BAREMETAL_TARGET_DIR  cargo target dir (default <repo>/target/baremetal)
#   BUILD_STD             crates to build from source (default "core")
# Writes the size report also to $BAREMETAL_TARGET_DIR/sizes.txt.
set -euo pipefail

cd "$(dirname "$0")/.."
repo="$PWD"

[ -f /usr/lib/rustlib/src/rust/library/core/Cargo.toml ] \
  || { echo "missing rust-web-src — run scripts/aarch64-setup.sh --bare-metal" >&2; exit 2; }
for f in /usr/bin/rustc /usr/bin/cargo /usr/bin/rust-lld; do
  [ -x "$f" ] || { echo "missing $f — run scripts/aarch64-setup.sh --bare-metal" >&2; exit 2; }
done

# Debian's toolchain, not rustup's proxies (which come first in PATH).
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO=/usr/bin/cargo
unset RUSTUP_TOOLCHAIN RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${BAREMETAL_TARGET_DIR:-$repo/target/baremetal}"
build_std=(-Zbuild-std="${BUILD_STD:-core}")

# The newest llvm-size (rust-web-llvm pulls in llvm-NN), else whatever `size` there is.
llvm_bin="$(ls -d /usr/lib/llvm-*/bin 2>/dev/null | sort -V | tail -n1 || true)"
tool() {
  if [ -n "$llvm_bin" ] && [ -x "$llvm_bin/llvm-$1" ]; then echo "$llvm_bin/llvm-$1"
  elif command -v "llvm-$1" >/dev/null 2>&1; then command -v "llvm-$1"
  else echo "$1"; fi
}
SIZE="$(tool size)"; NM="$(tool nm)"

if [ $# -gt 0 ]; then targets=("$@"); else targets=(thumbv7em-none-eabihf aarch64-unknown-none); fi

echo "baremetal: $(/usr/bin/rustc -V) | $(/usr/bin/cargo -V) | ${build_std[*]} | target dir: $CARGO_TARGET_DIR"
mkdir -p "$CARGO_TARGET_DIR"
report="$CARGO_TARGET_DIR/sizes.txt"
: >"$report"

target_args=()
for target in "${targets[@]}"; do target_args+=(--target "$target"); done

# One cargo invocation for all targets: the (serial) builds of `core` run side by side.
t0=$SECONDS
echo "+ cargo build -p lamb-core --lib ${target_args[*]} ${build_std[*]}"
/usr/bin/cargo build -p lamb-core --lib "${target_args[@]}" "${build_std[@]}"
echo "baremetal: lamb-core rlibs took $((SECONDS - t0)) s"

t0=$SECONDS
echo "+ cargo build --release ${target_args[*]} ${build_std[*]} --manifest-path examples/firmware/Cargo.toml"
/usr/bin/cargo build --release "${target_args[@]}" "${build_std[@]}" \
  --manifest-path examples/firmware/Cargo.toml
echo "baremetal: firmware images took $((SECONDS - t0)) s"

for target in "${targets[@]}"; do
  elf="$CARGO_TARGET_DIR/$target/release/lamb-firmware"

  # The image must have its entry point and really contain lamb-core's code.
  syms="$("$NM" -S -C "$elf")"
  grep -qE ' T _start$' <<<"$syms" || { echo "$elf: no _start" >&2; exit 1; }
  n_core="$(grep -c ' lamb_core::' <<<"$syms" || true)"
  [ "$n_core" -gt 0 ] || { echo "$elf: no lamb_core code was linked in" >&2; exit 1; }
  model_hex="$(awk '$NF == "lamb_firmware::MODEL" { print $2 }' <<<"$syms")"
  model=$((16#${model_hex:-0}))

  {
    echo "== $target: ${elf#"$repo"/} ($n_core lamb_core symbols)"
    "$SIZE" -A "$elf" | sed -n '/^section/,$p' | grep -vE '^(\.comment|\.ARM\.attributes|\.debug_|Total|$)'
    "$SIZE" -A "$elf" | awk -v model="$model" '
      $1 == ".text" || $1 == ".rodata" { flash += $2 }
      $1 == ".data" { flash += $2; ram += $2 }
      $1 == ".bss" { ram += $2 }
      END { printf "flash %d B (text + rodata + data), RAM %d B (data + bss; the model and its state: %d B)\n", flash, ram, model }'
  } | tee -a "$report"
done
echo "baremetal: size report in $report"
