#!/usr/bin/env python3
"""Estimated Cortex-M4 cycles per element of one layer step, from an execution trace.

Usage (after scripts/m4-icount.sh has built the benchmark firmware):
    scripts/m4-icount/cycles.py [ELF]

Runs the firmware once more under QEMU with one instruction per translation block and
`-d exec,nochain`, which logs the address of every instruction executed. The windows between
the `m4_mark_begin` / `m4_mark_end` markers are the measured calls, in the order the firmware
prints them; the per-element mix is (window of n=4096 − window of n=1024) / 3072 for the
first call kind (`prepared`). Each executed instruction is weighted by the Cortex-M4
Technical Reference Manual's cycle counts (table below; a taken branch pays a pipeline refill
of 2), as if memory had no wait states. Needs llvm-objdump (Debian `llvm`) for the opcodes.
"""
import collections, os, re, shutil, subprocess, sys, tempfile

# Cortex-M4 TRM (r0p1) chapter 3 and the FPU's chapter 7, simplified: cycles per instruction.
COSTS = [
    (r"^vdiv", 14), (r"^vsqrt", 14),
    (r"^vldm|^vstm|^vpush|^vpop", None),  # 1 + registers
    (r"^vldr", 2), (r"^vstr", 2),
    (r"^vmov", 1), (r"^v", 1),
    (r"^ldm|^stm|^push|^pop", None),  # 1 + registers
    (r"^ldr", 2), (r"^str", 1),
    (r"^(udiv|sdiv)", 7), (r"^(umull|smull|umlal|smlal)", 1),
]
TAKEN = 2  # extra cycles of a taken branch (pipeline refill)


def cost(mnemonic, operands):
    for pattern, c in COSTS:
        if re.match(pattern, mnemonic):
            if c is None:
                regs = operands.count(",") + 1 if "{" in operands else 1
                if "-" in operands:  # a range like {d8-d15}
                    a, b = re.findall(r"[a-z](\d+)-[a-z](\d+)", operands)[0]
                    regs = int(b) - int(a) + 1
                return 1 + regs
            return c
    return 1


def main():
    root = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(root))
    target_dir = os.environ.get("M4_TARGET_DIR", os.path.join(repo, "target", "m4-icount"))
    elf = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        target_dir, "thumbv7em-none-eabihf", "release", "m4-icount")
    # The newest llvm-objdump (older ones print the bytes in another layout).
    candidates = sorted(os.popen("ls -d /usr/lib/llvm-*/bin/llvm-objdump 2>/dev/null").read().split(),
                        key=lambda p: int(re.search(r"llvm-(\d+)", p).group(1)))
    objdump = candidates[-1] if candidates else shutil.which("llvm-objdump")
    if not objdump:
        sys.exit("cycles.py: needs llvm-objdump (apt-get install llvm)")
    insns = {}
    for line in subprocess.run([objdump, "-d", elf], capture_output=True,
                               text=True, check=True).stdout.splitlines():
        # "addr: bytes <tab> mnemonic operands": 16-bit groups (newer) or single bytes.
        m = re.match(r"\s*([0-9a-f]+):\s+((?:[0-9a-f]{2,4} )+)\s*(\S+)\s*([^@]*)", line)
        if m:
            size = sum(len(x) for x in m.group(2).split()) // 2
            insns[int(m.group(1), 16)] = (m.group(3), m.group(4).strip(), size)
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "trace.log")
        subprocess.run(["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-monitor", "none",
                        "-serial", "none", "-semihosting-config", "enable=on,target=native",
                        "-icount", "shift=0", "-accel", "tcg,one-insn-per-tb=on",
                        "-d", "exec,nochain", "-D", log, "-kernel", elf],
                       check=True, capture_output=True, timeout=600)
        windows, current = [], None
        prev = None
        with open(log) as f:
            for line in f:
                m = re.search(r"\[[0-9a-f]+/([0-9a-f]+)/[0-9a-f]+/[0-9a-f]+\] (\S+)", line)
                if not m:
                    continue
                pc, sym = int(m.group(1), 16), m.group(2)
                if sym == "m4_mark_begin":
                    current, prev = collections.Counter(), None
                elif sym == "m4_mark_end" and current is not None:
                    windows.append(current)
                    current = None
                elif current is not None:
                    if prev is not None:
                        # The previous instruction branched if this one does not follow it.
                        current[(prev[0], pc != prev[0] + prev[1])] += 1
                    prev = (pc, insns.get(pc, ("?", "", 2))[2])
    # Windows in print order: per call kind n = 0, 16, 1024, 4096.
    small, large = windows[2], windows[3]
    diff = collections.Counter(large)
    diff.subtract(small)
    n_insn = n_cyc = 0
    by_class = collections.Counter()
    for (pc, taken), count in diff.items():
        mnem, ops, _ = insns.get(pc, ("?", "", 2))
        c = cost(mnem, ops) + (TAKEN if taken else 0)
        n_insn += count
        n_cyc += count * c
        by_class[re.sub(r"\..*", "", mnem)] += count * c
    print(f"prepared: {n_insn / 3072:.1f} instructions, ~{n_cyc / 3072:.0f} cycles per element "
          "(Cortex-M4 TRM timings, no wait states)")
    for k, c in by_class.most_common(8):
        print(f"  {k:<10} {c / 3072:6.1f} cycles/element")


if __name__ == "__main__":
    main()
