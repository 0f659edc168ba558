#!/usr/bin/env bash
# aarch64-setup.sh — install what scripts/aarch64-test.sh and scripts/baremetal-build.sh need,
# on Debian 12 (bookworm) x86_64. Idempotent; needs root or sudo; no rustup downloads.
#
#   - Debian's rustc-web/cargo-web 1.96 (bookworm-security) in /usr/bin, and the prebuilt
#     aarch64-unknown-linux-gnu std from libstd-rust-web-dev:arm64 (multiarch);
#   - the aarch64 cross linker (gcc-aarch64-linux-gnu) and the arm64 runtime libc for qemu;
#   - qemu-user-static (bookworm-backports 10.x, else bookworm's 7.2);
#   - with --bare-metal: rust-web-src (for -Zbuild-std), rust-lld and llvm (llvm-size).
#
# Usage: scripts/aarch64-setup.sh [--bare-metal]
#
# rustup's proxies in ~/.cargo/bin stay first in PATH and rustup has no aarch64 std here, so
# everything that uses this toolchain calls /usr/bin/{rustc,rustdoc,cargo} by absolute path.
set -euo pipefail

BARE=0
for a in "$@"; do
  case "$a" in
    --bare-metal) BARE=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

UPDATED=0
apt_update() { [ "$UPDATED" = 1 ] || { echo "+ apt-get update"; $SUDO apt-get update -qq; UPDATED=1; }; }
# apt-get install, its chatter kept out of the log unless it fails.
apt_install() {
  echo "+ apt-get install $*"
  local log; log="$(mktemp)"
  if ! $SUDO apt-get install -y -qq --no-install-recommends "$@" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}

# 1. arm64 multiarch (for libstd-rust-web-dev:arm64 and the arm64 libc that qemu runs tests on)
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "+ dpkg --add-architecture arm64"
  $SUDO dpkg --add-architecture arm64
  UPDATED=0
fi

PKGS=(
  rustc-web cargo-web libstd-rust-web-dev      # host toolchain 1.96 (bookworm-security)
  libstd-rust-web-dev:arm64                    # prebuilt std/core/alloc/test rlibs for aarch64-unknown-linux-gnu
  libc6:arm64 libgcc-s1:arm64                  # runtime libs qemu loads from /lib/aarch64-linux-gnu
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross  # cross linker + crt/libc for linking
)
[ "$BARE" = 1 ] && PKGS+=(rust-web-src rust-web-llvm)

missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  apt_update
  apt_install "${missing[@]}"
fi

# rust-lld (from rust-web-llvm) is a symlink to lld-NN, which rust-web-llvm does not depend on.
if [ "$BARE" = 1 ] && ! rust-lld -flavor gnu --version >/dev/null 2>&1; then
  lldpkg="$(basename "$(readlink /usr/bin/rust-lld)")"   # e.g. lld-22
  apt_update
  apt_install "$lldpkg"
fi

# 2. qemu-user (prefer bookworm-backports 10.x; bookworm's 7.2 is the fallback)
if ! command -v qemu-aarch64-static >/dev/null 2>&1 && ! command -v qemu-aarch64 >/dev/null 2>&1; then
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # reuse the mirror that the machine's own bookworm entry names
    mirror=$(grep -hs -oE '^URIs: *[^ ]+' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
    [ -n "$mirror" ] || mirror=$(grep -hs -oE '^deb +[^ ]+' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)
    if [ -n "$mirror" ]; then
      echo "+ adding deb $mirror bookworm-backports main"
      echo "deb $mirror bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
      UPDATED=0
    fi
  fi
  apt_update
  apt_install -t bookworm-backports qemu-user-static || apt_install qemu-user-static
fi

# 3. smoke test: cross-compile a threaded program with Debian's rustc and run it under qemu.
QEMU="$(command -v qemu-aarch64-static || command -v qemu-aarch64)"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/smoke.rs" <<'EOF'
fn main() {
    let t = std::thread::spawn(|| 6 * 7).join().unwrap();
    println!("smoke: arch={} thread={} neon={} LAMB_SMOKE={:?}", std::env::consts::ARCH, t,
             std::arch::is_aarch64_feature_detected!("neon"), std::env::var("LAMB_SMOKE").ok());
}
EOF
/usr/bin/rustc --edition 2024 --target aarch64-unknown-linux-gnu -C linker=aarch64-linux-gnu-gcc \
  "$tmp/smoke.rs" -o "$tmp/smoke"
# NB: no `-L /usr/aarch64-linux-gnu`: with libc6:arm64 installed that mixes the cross ld.so
# (2.36-8cross1) with the multiarch libc.so.6 (2.36-9+debXuY) and pthread_create spins forever.
env -u QEMU_LD_PREFIX LAMB_SMOKE=passed-through timeout 60 "$QEMU" "$tmp/smoke"

if [ "$BARE" = 1 ]; then
  [ -f /usr/lib/rustlib/src/rust/library/core/Cargo.toml ] \
    || { echo "rust-web-src did not install /usr/lib/rustlib/src/rust" >&2; exit 1; }
  echo "bare-metal: rust-web-src at $(readlink -f /usr/lib/rustlib/src/rust); $(rust-lld -flavor gnu --version)"
fi
echo "OK: $(/usr/bin/rustc -V) | $(/usr/bin/cargo -V) | $("$QEMU" --version | head -1)"
