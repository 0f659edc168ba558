#!/usr/bin/env python3
"""lamb-std against torch, timm and optax, interleaved round by round in one run.

Every ratio in the README's performance table comes from here: the implementations run in
the same minutes on the same machine, alternating, so a neighbour's build or a frequency
change hits all of them alike instead of one of them.

For each workload and thread count, one long-lived worker process per implementation holds
its parameters, gradients and state (set up once), pinned to the first N cores
(sched_setaffinity, like `taskset -c 0-(N-1)`):

  lamb      target/release/step-worker (benches/src/bin/step-worker.rs): lamb-std `Lamb`,
            LambConfig::paper(); clipping: `set_max_grad_norm(Some(1.0))`.
  torch     torch.optim.AdamW(fused=True) (a single-pass, 28 B/param optimizer, not LAMB);
            clipping: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True) first.
  timm      timm.optim.Lamb(foreach=True); clipping: its own max_grad_norm=1.0.
  optax     optax.lamb(1e-3) in one jax.jit with params and state donated; clipping:
            optax.chain(optax.clip_by_global_norm(1.0), optax.lamb(1e-3)).
  roof44    step-worker --impl roof44 (benches/src/roof_model.rs): plain memory-roofline
            loops with lamb-std's traffic and trivial arithmetic: read p,g,m,v (reduce),
            all threads join, read p,g,m,v and write m,v,p (44 B/param); clipping: a sum of
            squares of g first (48 B).
  roof28    step-worker --impl roof28: torch's traffic: one pass read p,g,m,v, write m,v,p
            (28 B/param); clipping: sum of squares of g, join, g scaled in place, join,
            then the 28 B pass (40 B).

roof44 and roof28 step the same tensors with the same thread count, interleaved with the
rest, so roof44 / roof28 of the same rounds is the floor of lamb / torch that the design's
traffic alone sets (two passes against one) on this machine at this time: the part of the
ratio that the bytes explain, which only moving fewer bytes could remove. Each holds p, g,
m and v (BERT-base: about 2 GB per worker) besides the other workers' memory.

Two settings: `none` (no clipping) and `clip` (global clipping at max norm 1.0; the
gradients' global norm here is far above 1, so the clipping scales). A round is, for each
setting, each implementation in turn (lamb, torch, timm, optax, roof44, roof28) taking
--steps steps, each timed alone; the round's figure for an implementation is the median of
its steps. Ratios are computed per round (lamb / torch, timm / lamb, optax / lamb,
roof44 / roof28, per setting) and the report gives their median over --rounds rounds, with
the range.

Workers are driven over stdin/stdout: `run none K`, `run clip K`, `quit`; each prints
`READY {...}` once set up and `RESULT {"times_ns": [...]}` per run.

Writes docs/perf/<date>-<cpu>.json (every step's time) and .md (the tables), and prints the
README table. Usage (benches/peers/run.sh --torch interleaved [options] installs and runs it):

  interleaved.py [--workloads bert_base,uniform_1000x1024] [--threads 1,2] [--rounds 7]
                 [--steps 3] [--warmup 2] [--impls lamb,torch,timm,optax,roof44,roof28]
                 [--note TEXT] [--lamb-bin PATH] [--out-dir docs/perf] [--suffix=-bert-t1]
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import WORKLOADS, cpu_model, init_arrays  # noqa: E402

ORDER = ["lamb", "torch", "timm", "optax", "roof44", "roof28"]
# Served by target/release/step-worker (--impl); the others by this script's --worker.
STEP_WORKER = {"lamb", "roof44", "roof28"}
SETTINGS = ["none", "clip"]
LABEL = {
    ("lamb", "none"): "lamb-std",
    ("lamb", "clip"): "lamb-std, clip 1.0",
    ("torch", "none"): "torch fused AdamW",
    ("torch", "clip"): "torch clip_grad_norm_ + fused AdamW",
    ("timm", "none"): "timm Lamb",
    ("timm", "clip"): "timm Lamb, max_grad_norm 1.0",
    ("optax", "none"): "optax.lamb",
    ("optax", "clip"): "optax chain(clip_by_global_norm(1.0), lamb)",
    ("roof44", "none"): "roof44 (44 B two-pass loops)",
    ("roof44", "clip"): "roof44 + norm pass (48 B)",
    ("roof28", "none"): "roof28 (28 B single-pass loop)",
    ("roof28", "clip"): "roof28 + norm and scale passes (40 B)",
}


# ---------------------------------------------------------------- workers (Python peers)

def torch_worker(kind, sizes):
    import torch

    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in init_arrays(sizes, 1, 0.05)]
    for p, g in zip(params, init_arrays(sizes, 2, 0.01)):
        p.grad = torch.from_numpy(g)
    if kind == "timm":
        import timm.optim

        opt = timm.optim.Lamb(params, lr=1e-3, foreach=True, max_grad_norm=None)

        def step(setting):
            # timm reads the threshold from its defaults at every step.
            opt.defaults["max_grad_norm"] = 1.0 if setting == "clip" else None
            opt.step()
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

        def step(setting):
            if setting == "clip":
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()

    return step, lambda: None


def optax_worker(sizes):
    import jax
    import jax.numpy as jnp
    import optax

    params = [jnp.asarray(a) for a in init_arrays(sizes, 1, 0.05)]
    grads = [jnp.asarray(a) for a in init_arrays(sizes, 2, 0.01)]
    lamb = optax.lamb(1e-3)
    clipped = optax.chain(optax.clip_by_global_norm(1.0), lamb)
    # One lamb state for both settings: chain's state is (clip's empty state, lamb's).
    box = {"p": params, "s": lamb.init(params)}

    def plain(params, state, grads):
        updates, state = lamb.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def clip(params, state, grads):
        updates, (_, state) = clipped.update(grads, (optax.EmptyState(), state), params)
        return optax.apply_updates(params, updates), state

    fns = {"none": jax.jit(plain, donate_argnums=(0, 1)),
           "clip": jax.jit(clip, donate_argnums=(0, 1))}

    def step(setting):
        box["p"], box["s"] = fns[setting](box["p"], box["s"], grads)

    return step, lambda: jax.block_until_ready(box["p"])


def worker(args):
    n = args.threads_n
    if args.worker == "optax" and n == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sizes = WORKLOADS[args.workload]()
    if args.worker == "optax":
        step, sync = optax_worker(sizes)
    else:
        import torch

        torch.set_num_threads(n)
        step, sync = torch_worker(args.worker, sizes)
    print("READY " + json.dumps({"impl": args.worker, "workload": args.workload,
                                 "threads": n, "params": sum(sizes), "tensors": len(sizes)}),
          flush=True)
    for line in sys.stdin:
        words = line.split()
        if words == ["quit"]:
            break
        if len(words) != 3 or words[0] != "run" or words[1] not in SETTINGS:
            print(f"ERROR unknown command {line!r}", flush=True)
            return 1
        times = []
        sync()
        for _ in range(int(words[2])):
            t0 = time.perf_counter_ns()
            step(words[1])
            sync()
            times.append(time.perf_counter_ns() - t0)
        print("RESULT " + json.dumps({"times_ns": times}), flush=True)
    return 0


# ---------------------------------------------------------------- driver

class Worker:
    """One implementation at one workload and thread count, in its own process."""

    def __init__(self, impl, cmd, threads, env):
        cpus = list(range(min(threads, os.cpu_count())))
        self.impl = impl
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        self.info = json.loads(self._expect("READY"))

    def _expect(self, tag):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.impl}: worker exited ({self.proc.wait()})")
            if line.startswith(tag + " "):
                return line[len(tag) + 1:]
            if line.startswith("ERROR"):
                raise RuntimeError(f"{self.impl}: {line.strip()}")

    def run(self, setting, k):
        self.proc.stdin.write(f"run {setting} {k}\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("RESULT"))["times_ns"]

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        self.proc.wait()


def worker_cmd(impl, workload, threads, args):
    if impl in STEP_WORKER:
        return [args.lamb_bin, "--impl", impl, "--workload", workload, "--threads", str(threads)]
    return [sys.executable, os.path.abspath(__file__), "--worker", impl,
            "--workload", workload, "--threads-n", str(threads)]


def measure(workload, threads, impls, args, log):
    """Rounds of one workload at one thread count: {(impl, setting): [[ns per step] per round]}."""
    workers = []
    try:
        for impl in impls:
            log(f"# {workload}, {threads} thread(s): starting {impl}")
            workers.append(Worker(impl, worker_cmd(impl, workload, threads, args), threads,
                                  dict(os.environ)))
        for w in workers:
            for s in SETTINGS:
                w.run(s, args.warmup)
        times = {(w.impl, s): [] for w in workers for s in SETTINGS}
        for r in range(args.rounds):
            for s in SETTINGS:
                for w in workers:
                    times[(w.impl, s)].append(w.run(s, args.steps))
            log(f"#   round {r + 1}/{args.rounds}: " + ", ".join(
                f"{i}/{s} {statistics.median(t[-1]) / 1e6:.1f} ms" for (i, s), t in times.items()))
        return times, {w.impl: w.info for w in workers}
    finally:
        for w in workers:
            w.close()


def ratios(times, num, den):
    """Per-round ratio of round medians: num / den."""
    if num not in times or den not in times:
        return None
    return [statistics.median(a) / statistics.median(b) for a, b in zip(times[num], times[den])]


def summary(xs):
    return None if not xs else {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def analyse(rec):
    """Medians per implementation and the per-round ratios of one (workload, threads)."""
    times = {tuple(k.split("/")): v for k, v in rec["times_ns"].items()}
    out = {"ms_per_step": {}, "ratios": {}}
    for (impl, s), rounds in times.items():
        out["ms_per_step"][f"{impl}/{s}"] = statistics.median(
            [statistics.median(r) for r in rounds]) / 1e6
    for s in SETTINGS:
        for name, num, den in [("lamb/torch", "lamb", "torch"), ("timm/lamb", "timm", "lamb"),
                               ("optax/lamb", "optax", "lamb"),
                               ("roof44/roof28", "roof44", "roof28")]:
            r = ratios(times, (num, s), (den, s))
            if r is not None:
                out["ratios"][f"{name}/{s}"] = summary(r)
    return out


def fmt_ratio(x):
    return "–" if x is None else f"{x['median']:.2f}× ({x['min']:.2f}–{x['max']:.2f})"


def tables(doc):
    """Markdown: the README table (ratios) and the absolute figures."""
    lines = [f"Interleaved run, {doc['date']}, CPU: {doc['cpu']} ({doc['cpus_available']} "
             f"CPUs), {doc['rounds']} rounds × {doc['steps']} steps per implementation and "
             f"setting; median of per-round ratios (range). Note: {doc['note'] or '–'}", ""]
    lines += ["| workload | threads | setting | lamb-std ms/step | lamb-std / torch | "
              "timm / lamb-std | optax / lamb-std | roof44 / roof28 (same-run floor: 44 B "
              "two-pass ÷ 28 B single-pass loops) |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    names = {"none": "no clipping (torch: fused AdamW)",
             "clip": "global clip 1.0 (torch: clip_grad_norm_ + fused AdamW)"}
    for r in doc["results"]:
        a = r["analysis"]
        for s in SETTINGS:
            ms = a["ms_per_step"].get(f"lamb/{s}")
            lines.append(
                f"| {r['workload']} | {r['threads']} | {names[s]} | "
                f"{'–' if ms is None else f'{ms:.1f}'} | "
                f"{fmt_ratio(a['ratios'].get(f'lamb/torch/{s}'))} | "
                f"{fmt_ratio(a['ratios'].get(f'timm/lamb/{s}'))} | "
                f"{fmt_ratio(a['ratios'].get(f'optax/lamb/{s}'))} | "
                f"{fmt_ratio(a['ratios'].get(f'roof44/roof28/{s}'))} |")
    lines += ["", "Median ms per step (median over rounds of each round's median):", "",
              "| workload | threads | " + " | ".join(LABEL[(i, s)] for s in SETTINGS
                                                    for i in ORDER) + " |",
              "|---|---:|" + "---:|" * (2 * len(ORDER))]
    for r in doc["results"]:
        ms = r["analysis"]["ms_per_step"]
        cells = [ms.get(f"{i}/{s}") for s in SETTINGS for i in ORDER]
        lines.append(f"| {r['workload']} | {r['threads']} | " + " | ".join(
            "–" if c is None else f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def slug(text):
    s = "".join(c.lower() if c.isalnum() else "-" for c in text)
    while "--" in s:
        s = s.replace("--", "-")
    return s.strip("-")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="bert_base,uniform_1000x1024")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--impls", default=",".join(ORDER))
    ap.add_argument("--note", default="")
    ap.add_argument("--lamb-bin", default="target/release/step-worker",
                    help="step-worker binary (serves lamb, roof44 and roof28)")
    ap.add_argument("--out-dir", default="docs/perf")
    ap.add_argument("--suffix", default="", help="appended to the file name (a second run the same day)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build first")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--threads-n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    load_start = os.getloadavg()
    impls = [i for i in ORDER if i in args.impls.split(",")]
    if STEP_WORKER.intersection(impls) and not args.no_build:
        subprocess.run(["cargo", "build", "--quiet", "-p", "benches", "--release", "--bin",
                        "step-worker"], check=True)
    results = []
    for w in args.workloads.split(","):
        for n in (int(t) for t in args.threads.split(",")):
            times, info = measure(w, n, impls, args, log)
            rec = {"workload": w, "threads": n, "info": info,
                   "times_ns": {f"{i}/{s}": v for (i, s), v in times.items()}}
            rec["analysis"] = analyse(rec)
            results.append(rec)

    versions = {}
    for mod in ["torch", "timm", "jax", "optax", "numpy"]:
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # a peer not installed is reported, not fatal
            versions[mod] = f"unavailable: {e!r}"
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
           "cpus_available": len(os.sched_getaffinity(0)), "python": platform.python_version(),
           "versions": versions, "rounds": args.rounds, "steps": args.steps,
           "warmup": args.warmup, "note": args.note,
           "command": shlex.join(["benches/peers/interleaved.py"] + sys.argv[1:]),
           "loadavg_start": load_start,
           "loadavg_end": os.getloadavg(), "results": results}
    md = tables(doc)
    base = os.path.join(args.out_dir, f"{time.strftime('%Y-%m-%d', time.gmtime())}-"
                                      f"{slug(doc['cpu'])}{args.suffix}")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# {doc['cpu']}, {doc['date']}\n\nCommand: `{doc['command']}`\n\n{md}")
    print(md)
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
