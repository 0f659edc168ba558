#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, one after another.
#
#   fuzz/run.sh [SECONDS] [TARGET...]      SECONDS defaults to 30
#
# Installs cargo-fuzz if it is missing. With a nightly toolchain (`rustup toolchain list`),
# targets are built with AddressSanitizer (`cargo +nightly fuzz run`); without one, with
# no sanitizer on the default toolchain (`cargo fuzz run -s none`, which needs nothing
# unstable: no RUSTC_BOOTSTRAP). Builds go to fuzz/target; new corpus entries to
# fuzz/target/corpus/<target> (the committed seeds in fuzz/corpus/<target> are only read);
# crashes to fuzz/artifacts/<target>. Exits non-zero on the first target that finds a bug.
# Extra libFuzzer flags can be passed in LIBFUZZER_FLAGS (e.g. "-seed=1").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
secs="${1:-30}"
[ $# -gt 0 ] && shift
case "$secs" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
  sanitizer=() # cargo-fuzz's default: address
  mode="nightly, AddressSanitizer"
else
  toolchain=()
  sanitizer=(-s none)
  mode="$(rustc --version), no sanitizer"
fi

cd "$root"
if [ $# -gt 0 ]; then
  targets=("$@")
else
  list="$(cargo "${toolchain[@]}" fuzz list --fuzz-dir "$here")"
  mapfile -t targets <<<"$list"
fi

for t in "${targets[@]}"; do
  flags=(-max_total_time="$secs")
  case "$t" in
    kernels_differential | config_validate) flags+=(-dict="$here/dict/floats.dict") ;;
    # Thread pools make LeakSanitizer run after almost every input (3-4x slower); a run
    # over the corpus with leak detection on found nothing (see README.md).
    optimizer_api) flags+=(-detect_leaks=0) ;;
  esac
  # optimizer_api asks for buffers no machine has (they must be an Err, not an abort):
  # AddressSanitizer's allocator must return null for them, as the system's does.
  asan="${ASAN_OPTIONS:-}"
  [ "$t" = optimizer_api ] && asan="${asan:+$asan:}allocator_may_return_null=1"
  # shellcheck disable=SC2206 # LIBFUZZER_FLAGS is a list of flags
  flags+=(${LIBFUZZER_FLAGS:-})
  mkdir -p "$here/target/corpus/$t" "$here/corpus/$t"
  echo "== $t: ${secs}s ($mode)" >&2
  ASAN_OPTIONS="$asan" cargo "${toolchain[@]}" fuzz run "${sanitizer[@]}" --fuzz-dir "$here" --target-dir "$here/target" \
    "$t" "$here/target/corpus/$t" "$here/corpus/$t" -- "${flags[@]}"
done
