#!/usr/bin/env bash
# m4-icount.sh — instructions per element and per call of one lamb-core layer step on a
# Cortex-M4F, and the section sizes of examples/firmware; fails above the budgets.
#
# Builds scripts/m4-icount (a cortex-m-rt firmware, semihosting output) for rustup's
# thumbv7em-none-eabihf target and runs it on QEMU's mps2-an386 board (Cortex-M4F) under
# `-icount shift=0`: one instruction is 1 ns of virtual time and the board's SysTick (25 MHz
# core clock) ticks once per 40 instructions, so ticks × 40 = instructions, exactly and the
# same on every run (a regression guard, not a timing). The firmware steps layers of 0, 16,
# 1024 and 4096 elements; instructions per element = (I(4096) − I(1024)) / 3072, the fixed
# cost per call = I(0). docs/m4.md explains the numbers and how to estimate cycles
# (scripts/m4-icount/cycles.py).
#
# Usage: scripts/m4-icount.sh [--no-budget]
# Env:   M4_BUDGET_ELEMENT  most instructions per element of `step` (default below)
#        M4_BUDGET_FIXED    most instructions per call of `step` on an empty layer
#        M4_BUDGET_TEXT     most bytes of .text in examples/firmware
#        M4_TARGET_DIR      cargo target dir (default <repo>/target/m4-icount)
# Needs: rustup; installs the target and Debian's qemu-system-arm (apt, as root or via sudo).
set -euo pipefail

cd "$(dirname "$0")/.."
repo="$PWD"

# About 10% above the values measured with rustc 1.95 (docs/m4.md): 87.8 instructions per
# element, 1,200 per call with the step's scalars prepared once, .text 12,884 B.
budget_element="${M4_BUDGET_ELEMENT:-97}"
budget_fixed="${M4_BUDGET_FIXED:-1400}"
budget_text="${M4_BUDGET_TEXT:-14200}"
check_budget=1
[ "${1:-}" = "--no-budget" ] && check_budget=0

target=thumbv7em-none-eabihf
export CARGO_TARGET_DIR="${M4_TARGET_DIR:-$repo/target/m4-icount}"
# rustup's toolchain and its prebuilt `core` for the target (not Debian's, see baremetal-build.sh).
unset RUSTC RUSTDOC CARGO RUSTC_BOOTSTRAP RUSTFLAGS CARGO_ENCODED_RUSTFLAGS

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v qemu-system-arm >/dev/null; then
  as_root apt-get update -qq
  # A machine with QEMU packages from bookworm-backports (qemu-utils, say) needs the same
  # version of qemu-system-arm; a fresh one takes bookworm's.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-arm \
    || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      -t bookworm-backports qemu-system-arm
fi
command -v readelf >/dev/null || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binutils
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

echo "m4-icount: $(rustc -V) | $(qemu-system-arm --version | head -n1)"
cargo build -q --release --target "$target" --manifest-path scripts/m4-icount/Cargo.toml
cargo build -q --release --target "$target" --manifest-path examples/firmware/Cargo.toml
bench="$CARGO_TARGET_DIR/$target/release/m4-icount"
firmware="$CARGO_TARGET_DIR/$target/release/lamb-firmware"

log="$CARGO_TARGET_DIR/m4-icount.log"
timeout 600 qemu-system-arm -M mps2-an386 -nographic -monitor none -serial none \
  -semihosting-config enable=on,target=native -icount shift=0 -kernel "$bench" >"$log" 2>&1 \
  || { cat "$log"; echo "m4-icount: the benchmark firmware failed" >&2; exit 1; }
cat "$log"

# Section sizes of the firmware image (readelf reads any ELF machine's headers).
readelf -S --wide "$firmware" >"$CARGO_TARGET_DIR/firmware-sections.txt"

python3 - "$log" "$CARGO_TARGET_DIR/firmware-sections.txt" "$check_budget" \
  "$budget_element" "$budget_fixed" "$budget_text" <<'PY'
import re, sys
log, sections, check = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
b_elem, b_fixed, b_text = map(int, sys.argv[4:7])
size = {}
for line in open(sections):
    m = re.search(r"\]\s+(\.\w+)\s+\w+\s+[0-9a-f]+\s+[0-9a-f]+\s+([0-9a-f]+)", line)
    if m:
        size[m.group(1)] = int(m.group(2), 16)
text, rodata, data, bss = (size.get(k, 0) for k in (".text", ".rodata", ".data", ".bss"))
res = {}
for line in open(log):
    m = re.search(r"RESULT call=(\S+) n=(\d+) ticks=(\d+)", line)
    if m:
        res[(m.group(1), int(m.group(2)))] = int(m.group(3)) * 40
calls = sorted({c for c, _ in res}, key=lambda c: [k for k, _ in res].index(c))
print()
print(f"{'call':<12} {'instructions/element':>21} {'fixed instructions/call':>24}")
rows = {}
for c in calls:
    per = (res[(c, 4096)] - res[(c, 1024)]) / 3072
    rows[c] = (per, res[(c, 0)])
    print(f"{c:<12} {per:>21.1f} {res[(c, 0)]:>24}")
print(f"examples/firmware: .text {text} B, .rodata {rodata} B, .data {data} B, .bss {bss} B")
if check:
    # The budgets guard the first call, the one firmware uses.
    per, fixed = rows[calls[0]]
    bad = []
    if per > b_elem: bad.append(f"{calls[0]}: {per:.1f} instructions/element > budget {b_elem}")
    if fixed > b_fixed: bad.append(f"{calls[0]}: {fixed} instructions/call > budget {b_fixed}")
    if text > b_text: bad.append(f"examples/firmware .text {text} B > budget {b_text}")
    for b in bad: print("m4-icount: OVER BUDGET:", b, file=sys.stderr)
    if bad: sys.exit(1)
    print(f"m4-icount: within budget ({b_elem} instructions/element, {b_fixed}/call, .text {b_text} B)")
PY
