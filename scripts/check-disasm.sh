#!/usr/bin/env bash
# check-disasm.sh — inspects the compiled kernels of lamb-core (x86-64, release):
#   * every avx512 entry point uses zmm registers (the AVX-512 code really is AVX-512, even
#     on machines that cannot run it, such as CI);
#   * every avx2 entry point uses ymm registers and no zmm;
#   * no kernel contains an FMA instruction (the bit-exact rule: separate mul and add).
# Usage: scripts/check-disasm.sh   (needs binutils' objdump)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p lamb-core --quiet
rlib=$(ls -t target/release/deps/liblamb_core-*.rlib | head -n 1)
dis=$(mktemp); trap 'rm -f "$dis"' EXIT
objdump -d -C --no-show-raw-insn "$rlib" > "$dis"

# Print "function-name<TAB>instruction-line" for every instruction of kernel functions.
awk '
  /^[0-9a-f]+ <.*>:$/ { fn = $0; sub(/^[0-9a-f]+ </, "", fn); sub(/>:$/, "", fn); next }
  /^ *[0-9a-f]+:/ && fn ~ /lamb_core::kernels::/ { print fn "\t" $0 }
' "$dis" > "$dis.k"
trap 'rm -f "$dis" "$dis.k"' EXIT

fail=0
check() { # name, pattern-of-functions, must-match, must-not-match
  local what="$1" fns="$2" need="$3" forbid="$4"
  local names; names=$(cut -f1 "$dis.k" | grep -E "$fns" | sort -u || true)
  if [ -z "$names" ]; then echo "FAIL $what: no functions matching $fns"; fail=1; return; fi
  while IFS= read -r fn; do
    body=$(grep -F "$fn"$'\t' "$dis.k" | cut -f2-)
    if [ -n "$need" ] && ! grep -qE "$need" <<<"$body"; then
      echo "FAIL $what: $fn has no $need"; fail=1
    fi
    if [ -n "$forbid" ] && grep -qE "$forbid" <<<"$body"; then
      echo "FAIL $what: $fn contains $forbid"; fail=1
    fi
  done <<<"$names"
  echo "ok   $what: $(wc -l <<<"$names") functions"
}
check "avx512 kernels use zmm" '::avx512::(block_norms|apply|block_sum_squares|compact_)' 'zmm' ''
check "avx2 kernels use ymm, no zmm" '::avx2::(block_norms|apply|block_sum_squares|compact_)' 'ymm' 'zmm'
check "no FMA in any kernel" 'lamb_core::kernels::' '' 'vfn?m(add|sub)[0-9]'
exit $fail
