#!/usr/bin/env python3
"""Turns the lamb benches' results and the peers' into docs/perf/report.md and report.png.

Inputs: docs/perf/lamb.json (written by `cargo run -p benches --release --bin perf-check --
--json docs/perf/lamb.json` from criterion's output) and docs/perf/peers.json (peers.py).
Either may be missing; the report says so.

"% of roofline" everywhere is the speed relative to the same-traffic roofline loop
(roof-same44: read 4 arrays and reduce, then read 4 and write 3; 44 B/element, lamb-core's
traffic) measured in the same criterion run: (roofline ns/element) / (ns/element), with the
roofline of the same layer size for single layers and the single-thread 16M one (memory
resident) for whole models. For implementations that move more bytes than 44 per element
(optax, timm) it is still that ratio: how far they are from lamb's memory bound.

Usage: report.py [--lamb docs/perf/lamb.json] [--peers docs/perf/peers.json] [--out docs/perf]
"""

import argparse
import json
import os
import time

LAYERS = ["1K", "64K", "1M", "16M"]
KERNEL_ORDER = ["lamb-scalar", "lamb-portable", "lamb-avx2", "lamb-avx512", "lamb-neon",
                "pulp-v4", "pulp-v3", "roof-same44", "roof-design40", "roof-rw43", "roof-copy"]
KERNEL_DESC = {
    "lamb-scalar": "lamb-core scalar reference (44 B)",
    "lamb-portable": "lamb-core portable (`wide`, SSE2) (44 B)",
    "lamb-avx2": "lamb-core AVX2 (44 B)",
    "lamb-avx512": "lamb-core AVX-512F (44 B)",
    "lamb-neon": "lamb-core NEON (44 B)",
    "pulp-v4": "pulp generic, x86-64-v4 (44 B)",
    "pulp-v3": "pulp generic, x86-64-v3 (44 B)",
    "roof-same44": "roofline: same traffic (R4 reduce; R4 W3) 44 B",
    "roof-design40": "roofline: 40 B plan (R4 W2; R3 W1)",
    "roof-rw43": "roofline: single pass R4 W3 (Adam) 28 B",
    "roof-copy": "memcpy 8 B",
}
WORKLOADS = [("bert_base", "BERT-base (199 tensors, 109.5M)"),
             ("uniform_1000x1024", "1000 × 1024"),
             ("single_16M", "one 16M layer")]
PEER_ORDER = ["optax-lamb", "timm-lamb", "torch-adamw-fused"]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def pct(x):
    return "–" if x is None else f"{x:.0f}%"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lamb", default="docs/perf/lamb.json")
    ap.add_argument("--peers", default="docs/perf/peers.json")
    ap.add_argument("--out", default="docs/perf")
    ap.add_argument("--note", default="", help="a line for the top of the report")
    args = ap.parse_args()
    lamb = load(args.lamb)
    peers = load(args.peers)

    res = {}
    if lamb:
        for r in lamb["results"]:
            res[(r["group"], r["function"])] = r
    roof = {l: res.get((f"layer_{l}", "roof-same44")) for l in LAYERS}
    roof_mem = roof["16M"]["ns_per_element"] if roof.get("16M") else None

    cpu = (lamb or peers or {}).get("cpu", "unknown")
    md = ["# lamb performance report", ""]
    md.append(f"- Generated: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    md.append(f"- CPU: {cpu} ({os.cpu_count()} logical CPUs visible)")
    if lamb:
        md.append(f"- lamb-core dispatched backend: `{lamb['backend']}`")
    if peers:
        v = ", ".join(f"{k} {val}" for k, val in peers.get("versions", {}).items())
        md.append(f"- Peers measured {peers['date']} (median of {peers['steps']} steps after "
                  f"{peers['warmup']} warm-up): {v}")
        if peers.get("note"):
            md.append(f"- Peers note: {peers['note']}")
    if args.note:
        md.append(f"- **Note:** {args.note}")
    md += ["", "Bytes are counted with the model of what the code moves: lamb-core's step is "
           "44 B/element (phase 1 reads p, g, m, v; phase 2 reads them and writes m, v, p). "
           "*% of roofline* = roofline ns/element ÷ ns/element, against the same-traffic "
           "loop `roof-same44` of the same criterion run (single layers: same size; whole "
           "models: the single-thread 16M one).", ""]

    # Targets.
    if lamb:
        md += ["## Targets", ""]
        for t in lamb["targets"]:
            v = t["value"]
            if v is None:
                md.append(f"- {t['name']}: no data")
                continue
            ok = "met" if v >= t["target"] else "**missed**"
            if t["target"] < 1:
                md.append(f"- {t['name']}: {100 * v:.1f}% (target ≥ {100 * t['target']:.0f}%): {ok}")
            else:
                md.append(f"- {t['name']}: {v:.2f}× (target ≥ {t['target']:.1f}×): {ok}")
        md.append("")

    # Single-layer kernels.
    md += ["## One layer, one thread (criterion, `benches/benches/kernels.rs`)", ""]
    if not lamb:
        md += ["_No lamb results (docs/perf/lamb.json missing)._", ""]
    else:
        md.append("ns/element (% of roofline)")
        md.append("")
        md.append("| implementation | " + " | ".join(LAYERS) + " |")
        md.append("|---|" + "---:|" * len(LAYERS))
        for fn in KERNEL_ORDER:
            cells = []
            for l in LAYERS:
                r = res.get((f"layer_{l}", fn))
                if not r:
                    cells.append("–")
                    continue
                p = (100 * roof[l]["ns_per_element"] / r["ns_per_element"]) if roof[l] else None
                cells.append(f"{fmt(r['ns_per_element'])} ({pct(p)})")
            if any(c != "–" for c in cells):
                md.append(f"| {KERNEL_DESC.get(fn, fn)} | " + " | ".join(cells) + " |")
        md.append("")
        vs40 = [(l, res.get((f"layer_{l}", f"lamb-{lamb['backend']}")), res.get((f"layer_{l}", "roof-design40")))
                for l in LAYERS]
        parts = [f"{l}: {r['median_ns'] / d['median_ns']:.2f}×" for l, r, d in vs40 if r and d]
        if parts:
            md.append(f"Dispatched kernel's time ÷ the 40 B loop's time: {', '.join(parts)} "
                      "(the 40 B plan writes the moments in pass 1; lamb-core writes nothing "
                      "in phase 1 so that a non-finite step is refused before any write).")
            md.append("")

    # Whole models.
    md += ["## Whole model, per step", ""]
    impls = ["lamb-std"] + [i for i in PEER_ORDER
                            if peers and any(r.get("impl") == i for r in peers["results"])]
    threads = sorted({int(f.split("-t")[-1]) for (g, f) in res if g.startswith("model_") and "-t" in f}
                     | {r["threads"] for r in (peers or {}).get("results", []) if "threads" in r})
    md.append("ns/parameter (% of roofline). lamb-std: criterion `benches/benches/model.rs`; "
              "peers: `benches/peers/peers.py`. torch AdamW (fused) is a single-pass Adam "
              "(28 B/element), shown for scale.")
    md.append("")
    md.append("| workload | threads | " + " | ".join(impls) + " |")
    md.append("|---|---:|" + "---:|" * len(impls))
    chart = {}  # (workload, threads) -> {impl: ns/elem}
    for w, wdesc in WORKLOADS:
        for t in threads:
            cells = []
            for i in impls:
                if i == "lamb-std":
                    r = res.get((f"model_{w}", f"lamb-std-t{t}"))
                    ns = r["ns_per_element"] if r else None
                else:
                    r = next((r for r in peers["results"] if r.get("impl") == i and r.get("workload") == w
                              and r.get("threads") == t), None)
                    ns = r.get("ns_per_element") if r else None
                    if r and "error" in r:
                        cells.append("error")
                        continue
                if ns is not None:
                    chart.setdefault((w, t), {})[i] = ns
                p = 100 * roof_mem / ns if (ns and roof_mem) else None
                cells.append("–" if ns is None else f"{fmt(ns)} ({pct(p)})")
            md.append(f"| {wdesc} | {t} | " + " | ".join(cells) + " |")
    md.append("")

    # Allocation notes.
    if lamb and lamb.get("notes"):
        md += ["## How the buffers were allocated (bench output)", "", "```"]
        md += [l for l in lamb["notes"].splitlines() if l.strip()]
        md += ["```", ""]

    md += ["## Reproduce", "", "```sh",
           "# lamb (criterion; a quiet machine, ~10 minutes):",
           "cargo bench -p benches --bench kernels --bench model",
           "cargo run -p benches --release --bin perf-check -- --json docs/perf/lamb.json",
           "# peers (creates benches/peers/.venv; --torch adds timm and torch, several GB):",
           "benches/peers/run.sh --torch",
           "# this report:",
           "benches/peers/run.sh report",
           "```", ""]

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {os.path.join(args.out, 'report.md')}")
    plot(lamb, res, roof, roof_mem, chart, impls, threads, os.path.join(args.out, "report.png"),
         args.note)


def plot(lamb, res, roof, roof_mem, chart, impls, threads, path, note=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 7.5), gridspec_kw={"width_ratios": [1.1, 1]})
    colors = plt.get_cmap("tab10").colors

    # Left: single-layer kernels, ns/element by size (log scale).
    ax = axes[0]
    fns = [f for f in KERNEL_ORDER if any((f"layer_{l}", f) in res for l in LAYERS)]
    width = 0.8 / max(len(fns), 1)
    for k, fn in enumerate(fns):
        ys = [res.get((f"layer_{l}", fn), {}).get("ns_per_element", 0) for l in LAYERS]
        xs = [i + (k - (len(fns) - 1) / 2) * width for i in range(len(LAYERS))]
        hatch = "//" if fn.startswith("roof") else None
        ax.bar(xs, ys, width, label=fn, color=colors[k % 10], hatch=hatch, edgecolor="white")
    ax.set_xticks(range(len(LAYERS)), [f"{l} elements" for l in LAYERS])
    ax.set_yscale("log")
    ax.set_ylabel("ns per element (log scale, lower is better)")
    ax.set_title("One layer, one thread: lamb-core kernels, pulp, rooflines")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.grid(axis="y", alpha=0.3, which="both")

    # Right: whole models, ns/parameter.
    ax = axes[1]
    keys = [(w, t) for w, _ in WORKLOADS for t in threads if (w, t) in chart]
    width = 0.8 / max(len(impls), 1)
    for k, i in enumerate(impls):
        ys = [chart[key].get(i, 0) for key in keys]
        xs = [j + (k - (len(impls) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, ys, width, label=i, color=colors[k % 10])
        for b, y in zip(bars, ys):
            if y:
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=7, rotation=90, xytext=(0, 2),
                            textcoords="offset points")
    if roof_mem:
        ax.axhline(roof_mem, color="black", ls="--", lw=1,
                   label=f"roof-same44 16M, 1 thread ({roof_mem:.2f})")
    labels = {"bert_base": "BERT-base", "uniform_1000x1024": "1000×1024", "single_16M": "16M layer"}
    ax.set_xticks(range(len(keys)), [f"{labels[w]}\n{t} thr" for w, t in keys], fontsize=9)
    ax.set_yscale("log")
    ax.set_ylabel("ns per parameter per step (log scale, lower is better)")
    ax.set_title("Whole model step: lamb-std vs other implementations")
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.grid(axis="y", alpha=0.3, which="both")

    cpu = (lamb or {}).get("cpu", "")
    title = f"lamb benchmarks — {cpu} — {time.strftime('%Y-%m-%d')}"
    if note:
        title += "\n" + (note if len(note) <= 140 else note[:137] + "...")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
