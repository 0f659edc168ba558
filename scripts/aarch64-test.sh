#!/usr/bin/env bash
# aarch64-test.sh — run the lamb-core test suite (unit + integration tests) as
# aarch64-unknown-linux-gnu under qemu-user, once per emulated CPU, using Debian's
# rustc-web 1.96 (/usr/bin/rustc, /usr/bin/cargo) and its prebuilt arm64 std.
# Doctests are not run for a cross target. Prerequisite: scripts/aarch64-setup.sh.
#
# Usage: scripts/aarch64-test.sh [extra cargo test args...]
#   e.g. scripts/aarch64-test.sh -- --nocapture
#        AARCH64_QEMU_CPUS=cortex-a72 LAMB_BACKEND=scalar scripts/aarch64-test.sh
# Env:
#   AARCH64_QEMU_CPUS   qemu -cpu models, one `cargo test` each (default "max cortex-a72":
#                       qemu's everything-on CPU with SVE etc., then a NEON-only Cortex-A72)
#   AARCH64_PACKAGES    package selection (default "-p lamb-core"; e.g. "--workspace")
#   AARCH64_TARGET_DIR  cargo target dir (default <repo>/target/aarch64-qemu, kept apart from
#                       the rustup-built host artifacts)
#   AARCH64_OPT_LEVEL   opt-level of the test build (default 2: ~7x faster under qemu than 0;
#                       debug assertions and overflow checks stay on)
#   LAMB_*              passed through to the tests (qemu-user gives the guest the host env)
set -euo pipefail

cd "$(dirname "$0")/.."

for f in /usr/bin/rustc /usr/bin/rustdoc /usr/bin/cargo /usr/bin/aarch64-linux-gnu-gcc; do
  [ -x "$f" ] || { echo "missing $f — run scripts/aarch64-setup.sh" >&2; exit 2; }
done
compgen -G '/usr/lib/rustlib/aarch64-unknown-linux-gnu/lib/libstd-*.rlib' >/dev/null \
  || { echo "missing aarch64 std (libstd-rust-web-dev:arm64) — run scripts/aarch64-setup.sh" >&2; exit 2; }
QEMU="$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)"
[ -n "$QEMU" ] || { echo "missing qemu-aarch64(-static) — run scripts/aarch64-setup.sh" >&2; exit 2; }

# Debian's toolchain, not rustup's (rustup has no aarch64 std and cannot download one here).
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO=/usr/bin/cargo
unset RUSTUP_TOOLCHAIN RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# No `-L /usr/aarch64-linux-gnu`: the arm64 multiarch libc (same version as the host libc) is
# used via /lib/ld-linux-aarch64.so.1; mixing in the cross ld.so makes pthread_create hang.
unset QEMU_LD_PREFIX QEMU_CPU
export CARGO_TARGET_DIR="${AARCH64_TARGET_DIR:-$PWD/target/aarch64-qemu}"
export CARGO_PROFILE_DEV_OPT_LEVEL="${AARCH64_OPT_LEVEL:-2}"

read -r -a packages <<<"${AARCH64_PACKAGES:--p lamb-core}"
read -r -a cpus <<<"${AARCH64_QEMU_CPUS:-max cortex-a72}"
cargo_test=(/usr/bin/cargo test --target aarch64-unknown-linux-gnu "${packages[@]}")

lamb_env="$(env | grep -E '^LAMB_' | sort | tr '\n' ' ' || true)"
echo "aarch64-test: $(/usr/bin/rustc -V) | $("$QEMU" --version | head -1) | opt-level $CARGO_PROFILE_DEV_OPT_LEVEL | target dir: $CARGO_TARGET_DIR"
echo "aarch64-test: CPUs: ${cpus[*]} | env for the tests: ${lamb_env:-(no LAMB_* set)}"

t0=$SECONDS
echo "+ ${cargo_test[*]} --no-run $*"
"${cargo_test[@]}" --no-run "$@"
echo "aarch64-test: build took $((SECONDS - t0)) s"

for cpu in "${cpus[@]}"; do
  t0=$SECONDS
  # cargo splits the runner on whitespace: the test binaries run as `qemu -cpu CPU BINARY ARGS`.
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$QEMU -cpu $cpu"
  echo "+ [qemu -cpu $cpu] ${cargo_test[*]} $*"
  "${cargo_test[@]}" "$@"
  echo "aarch64-test: -cpu $cpu took $((SECONDS - t0)) s"
done
