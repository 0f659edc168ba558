#!/usr/bin/env python3
"""Other LAMB (and AdamW) implementations on the workloads of benches/benches/model.rs.

Implementations:
  optax-lamb       optax.lamb(1e-3), the update and apply_updates in one jax.jit with the
                   params and optimizer state donated (updated in place, like lamb-std).
  timm-lamb        timm.optim.Lamb, foreach=True, max_grad_norm=None (lamb-std's bench has
                   global clipping off too; timm's default 1.0 would add a gradient-norm pass).
  torch-adamw-fused  torch.optim.AdamW(fused=True) on CPU: a single-pass 28 B/element
                   optimizer, for scale (not LAMB).

Workloads (same as lamb-std's model bench): BERT-base (199 tensors, 109,482,240 params),
1000 tensors of 1024 elements, one layer of 16M elements; at 1, 2 and all threads.

Each (implementation, thread count) runs in its own subprocess, pinned to the first N
cores (sched_setaffinity, as `taskset -c 0-(N-1)` would), with XLA_FLAGS /
torch.set_num_threads(N) set before the first step. Time = median over --steps steps after
--warmup steps, reported in ns per parameter.

Usage: peers.py [--torch] [--steps 20] [--warmup 3] [--threads 1,2,all]
                [--workloads bert_base,uniform_1000x1024,single_16M] [--out docs/perf/peers.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

H, FF = 768, 3072


def bert_base():
    """lamb_benches::shapes::bert_base(): 199 tensor lengths, 109,482,240 params."""
    s = [30522 * H, 512 * H, 2 * H, H, H]
    for _ in range(12):
        s += [H * H, H, H * H, H, H * H, H, H * H, H, H, H, FF * H, FF, H * FF, H, H, H]
    s += [H * H, H]
    assert len(s) == 199 and sum(s) == 109_482_240
    return s


WORKLOADS = {
    "bert_base": bert_base,
    "uniform_1000x1024": lambda: [1024] * 1000,
    "single_16M": lambda: [1 << 24],
}
IMPLS = {"optax-lamb": "jax", "timm-lamb": "torch", "torch-adamw-fused": "torch"}


def init_arrays(sizes, seed, scale):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [(rng.uniform(-1, 1, n) * scale).astype(np.float32) for n in sizes]


def time_steps(step, sync, warmup, steps):
    for _ in range(warmup):
        step()
    sync()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        step()
        sync()
        ts.append(time.perf_counter_ns() - t0)
    return ts


def run_optax(sizes, warmup, steps):
    import jax
    import jax.numpy as jnp
    import optax

    params = [jnp.asarray(a) for a in init_arrays(sizes, 1, 0.05)]
    grads = [jnp.asarray(a) for a in init_arrays(sizes, 2, 0.01)]
    opt = optax.lamb(1e-3)
    state = opt.init(params)

    def update(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(update, donate_argnums=(0, 1))
    box = {"p": params, "s": state}

    def step():
        box["p"], box["s"] = update(box["p"], box["s"], grads)

    def sync():
        jax.block_until_ready(box["p"])

    return time_steps(step, sync, warmup, steps)


def run_torch(kind, sizes, warmup, steps):
    import torch

    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in init_arrays(sizes, 1, 0.05)]
    for p, g in zip(params, init_arrays(sizes, 2, 0.01)):
        p.grad = torch.from_numpy(g)
    if kind == "timm-lamb":
        import timm.optim

        opt = timm.optim.Lamb(params, lr=1e-3, foreach=True, max_grad_norm=None)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    return time_steps(opt.step, lambda: None, warmup, steps)


def worker(args):
    """One implementation at one thread count, all workloads; prints one JSON line each."""
    n = args.threads_n
    os.sched_setaffinity(0, range(min(n, os.cpu_count())))
    if IMPLS[args.worker] == "jax":
        # XLA sizes its CPU thread pools from the CPUs this process may run on (the
        # affinity set above); with one thread, also keep Eigen single-threaded.
        if n == 1:
            os.environ["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
            ).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        import torch

        torch.set_num_threads(n)
    for w in args.workloads.split(","):
        sizes = WORKLOADS[w]()
        try:
            if args.worker == "optax-lamb":
                ts = run_optax(sizes, args.warmup, args.steps)
            else:
                ts = run_torch(args.worker, sizes, args.warmup, args.steps)
            med = statistics.median(ts)
            rec = {
                "impl": args.worker,
                "workload": w,
                "threads": n,
                "params": sum(sizes),
                "tensors": len(sizes),
                "steps": len(ts),
                "median_ns": med,
                "min_ns": min(ts),
                "ns_per_element": med / sum(sizes),
            }
        except Exception as e:  # report and go on with the other workloads
            rec = {"impl": args.worker, "workload": w, "threads": n, "error": repr(e)}
        print("RESULT " + json.dumps(rec), flush=True)


def versions(use_torch):
    v = {}
    for mod in ["jax", "jaxlib", "optax", "numpy"] + (["torch", "timm"] if use_torch else []):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:
            v[mod] = f"unavailable: {e!r}"
    return v


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", action="store_true", help="also timm Lamb and torch fused AdamW")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", default="1,2,all")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--impls", default=None, help="comma list; default: all installed")
    ap.add_argument("--out", default="docs/perf/peers.json")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'machine not quiet')")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads-n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    ncpu = len(os.sched_getaffinity(0))
    threads = sorted({ncpu if t == "all" else int(t) for t in args.threads.split(",")})
    impls = args.impls.split(",") if args.impls else ["optax-lamb"] + (
        ["timm-lamb", "torch-adamw-fused"] if args.torch else []
    )
    results = []
    for impl in impls:
        for n in threads:
            cmd = [sys.executable, __file__, "--worker", impl, "--threads-n", str(n),
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--workloads", args.workloads]
            print(f"# {impl}, {n} thread(s) ...", file=sys.stderr, flush=True)
            p = subprocess.run(cmd, capture_output=True, text=True)
            got = [json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode != 0 and not got:
                got = [{"impl": impl, "threads": n, "workload": "*",
                        "error": f"exit {p.returncode}: {p.stderr.strip()[-500:]}"}]
            results += got

    # One table: rows = workload x threads, columns = implementations, ns/element.
    print(f"\nns per parameter per step (median of {args.steps} after {args.warmup} warm-up); "
          f"CPU: {cpu_model()}")
    if args.note:
        print(f"note: {args.note}")
    head = f"{'workload':<20} {'threads':>7} " + " ".join(f"{i:>18}" for i in impls)
    print(head)
    print("-" * len(head))
    for w in args.workloads.split(","):
        for n in threads:
            cells = []
            for i in impls:
                r = next((r for r in results if r["impl"] == i and r["threads"] == n
                          and r["workload"] in (w, "*")), None)
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    cells.append("error")
                else:
                    cells.append(f"{r['ns_per_element']:.3f}")
            print(f"{w:<20} {n:>7} " + " ".join(f"{c:>18}" for c in cells))
    for r in results:
        if "error" in r:
            print(f"error: {r['impl']} {r['workload']} t{r['threads']}: {r['error']}", file=sys.stderr)

    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_model(),
        "cpus_available": ncpu,
        "python": platform.python_version(),
        "versions": versions(args.torch),
        "steps": args.steps,
        "warmup": args.warmup,
        "note": args.note,
        "command": " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
