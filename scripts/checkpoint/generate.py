#!/usr/bin/env python3
"""PyTorch interop data for lamb checkpoints: lamb-std/tests/data/checkpoint/.

    python generate.py            writes timm_state.safetensors and timm_run.safetensors
    python generate.py --verify   checks lamb_from_timm.safetensors (written by lamb) in PyTorch

Run it through generate.sh, which uses the venv of scripts/reference (torch + timm +
safetensors) and does the three steps in order:

1. (this script) A small model (Linear-LayerNorm-Tanh-Linear, 99 parameters) trains K=3
   steps with timm.optim.Lamb on real MSE gradients, with timm's weight-decay split as named
   parameter groups (no_decay first, as timm's param_groups_weight_decay orders them).
   - timm_state.safetensors: opt.state_dict() after K steps in the safetensors layout that
     lamb's Lamb::load_torch_state reads: tensors `state.{i}.exp_avg`, `state.{i}.exp_avg_sq`
     and the metadata key `param_groups`, the JSON of state_dict()["param_groups"] with
     tensor values (timm's per-group step) as numbers.
   - timm_run.safetensors: the params after K steps (`params.{name}`), the gradients of
     steps K+1..N (`grad.{t}.{name}`) and, after N=5 steps, the params and moments
     (`final.{name}`, `final_exp_avg.{name}`, `final_exp_avg_sq.{name}`).
2. (lamb-std/tests/checkpoint_torch.rs, with LAMB_UPDATE_CHECKPOINT_DATA=1) lamb loads the
   timm state, continues N-K steps and compares with timm's, and writes
   lamb_from_timm.safetensors: its checkpoint right after loading (save_with_params, with the
   params after K steps).
3. (this script, --verify) PyTorch reads lamb_from_timm.safetensors with the safetensors
   package, checks its format, version and XXH64 checksum (a pure-Python XXH64 here), turns
   it into a timm state_dict (lamb_to_timm_state_dict), loads that into a fresh timm Lamb
   and continues steps K+1..N: the params must equal those of the uninterrupted timm run
   bit for bit.
"""

import argparse
import json
import platform
import struct
import sys
from collections import OrderedDict
from importlib import metadata
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.optim import Lamb

K = 3
N = 5
HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "lamb-std" / "tests" / "data" / "checkpoint"
HYPER = dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)


# --------------------------------------------------------------------------------------
# The run.


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        OrderedDict(
            fc1=torch.nn.Linear(6, 8),
            norm=torch.nn.LayerNorm(8),
            act=torch.nn.Tanh(),
            fc2=torch.nn.Linear(8, 3),
        )
    )


def named_groups(model):
    """timm's param_groups_weight_decay (no_decay first), with names."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append((name, p))
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": HYPER["weight_decay"]},
    ]


def make_optimizer(model):
    return Lamb(named_groups(model), **HYPER)


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, 3, generator=g)
    return x, y


def backward(model):
    x, y = batch()
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()


def to_json_value(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def torch_state_file(opt):
    """opt.state_dict() as safetensors tensors + metadata."""
    sd = opt.state_dict()
    tensors = {}
    for i, st in sd["state"].items():
        for key, t in st.items():
            tensors[f"state.{i}.{key}"] = t.detach().clone().contiguous()
    groups = [{k: to_json_value(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": json.dumps(groups)}


def versions():
    v = {"python": platform.python_version()}
    for n in ["torch", "timm", "safetensors"]:
        v[n] = metadata.version(n)
    return v


def generate():
    torch.set_num_threads(1)
    model = make_model()
    opt = make_optimizer(model)
    for _ in range(K):
        backward(model)
        opt.step()
    tensors, md = torch_state_file(opt)
    save_file(tensors, str(DATA / "timm_state.safetensors"), metadata=md)

    run = {f"params.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for t in range(K + 1, N + 1):
        backward(model)
        for n, p in model.named_parameters():
            run[f"grad.{t}.{n}"] = p.grad.detach().clone()
        opt.step()
    for n, p in model.named_parameters():
        run[f"final.{n}"] = p.detach().clone()
        run[f"final_exp_avg.{n}"] = opt.state[p]["exp_avg"].clone()
        run[f"final_exp_avg_sq.{n}"] = opt.state[p]["exp_avg_sq"].clone()
    names = [n for n, _ in model.named_parameters()]
    save_file(
        run,
        str(DATA / "timm_run.safetensors"),
        metadata={
            "K": str(K),
            "N": str(N),
            "names": json.dumps(names),
            "hyperparameters": json.dumps(HYPER),
            "versions": json.dumps(versions()),
        },
    )
    print(f"wrote {DATA / 'timm_state.safetensors'} and timm_run.safetensors")


# --------------------------------------------------------------------------------------
# Reading a lamb checkpoint in Python.

M64 = (1 << 64) - 1
P1, P2, P3, P4, P5 = (
    0x9E3779B185EBCA87,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0x85EBCA77C2B2AE63,
    0x27D4EB2F165667C5,
)


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M64


def _round(acc, lane):
    return (_rotl((acc + lane * P2) & M64, 31) * P1) & M64


def _merge(acc, v):
    return (((acc ^ _round(0, v)) * P1) + P4) & M64


def xxh64(data: bytes) -> int:
    """XXH64 with seed 0 (the xxHash spec), in plain Python."""
    n, i = len(data), 0
    if n >= 32:
        v = [(P1 + P2) & M64, P2, 0, (-P1) & M64]
        while i + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], struct.unpack_from("<Q", data, i + 8 * k)[0])
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & M64
        for lane in v:
            h = _merge(h, lane)
    else:
        h = P5
    h = (h + n) & M64
    while i + 8 <= n:
        h ^= _round(0, struct.unpack_from("<Q", data, i)[0])
        h = (_rotl(h, 27) * P1 + P4) & M64
        i += 8
    if i + 4 <= n:
        h ^= (struct.unpack_from("<I", data, i)[0] * P1) & M64
        h = (_rotl(h, 23) * P2 + P3) & M64
        i += 4
    while i < n:
        h ^= (data[i] * P5) & M64
        h = (_rotl(h, 11) * P1) & M64
        i += 1
    h ^= h >> 33
    h = (h * P2) & M64
    h ^= h >> 29
    h = (h * P3) & M64
    return h ^ (h >> 32)


def check_lamb_file(raw: bytes):
    """Checks a lamb checkpoint's format, version and checksum; returns its metadata."""
    (n,) = struct.unpack_from("<Q", raw)
    header = raw[8 : 8 + n]
    md = json.loads(header)["__metadata__"]
    assert md["lamb.format"] == "lamb-checkpoint", md.get("lamb.format")
    assert md["lamb.version"] == "1", md["lamb.version"]
    key = b'"lamb.checksum"'
    assert header.count(key) == 1
    i = header.index(key) + len(key)
    while header[i : i + 1] in (b" ", b"\t", b"\r", b"\n"):
        i += 1
    assert header[i : i + 1] == b":"
    i += 1
    while header[i : i + 1] in (b" ", b"\t", b"\r", b"\n"):
        i += 1
    assert header[i : i + 7] == b'"xxh64:'
    at = 8 + i + 7
    digits = raw[at : at + 16]
    computed = xxh64(raw[:at] + b"0" * 16 + raw[at + 16 :])
    assert digits.decode() == f"{computed:016x}", (digits, f"{computed:016x}")
    assert md["lamb.checksum"] == f"xxh64:{computed:016x}"
    return md


def lamb_to_timm_state_dict(path, opt, model):
    """A timm Lamb state_dict for `opt` (built over `model`'s named parameters) from a lamb
    checkpoint: each layer's moments, reshaped to its parameter, under that parameter's
    index; lamb's one step counter into every group's `step`."""
    meta = json.loads(check_lamb_file(Path(path).read_bytes())["lamb.meta"])
    layer = {l["name"]: i for i, l in enumerate(meta["layers"])}
    params = dict(model.named_parameters())
    sd = opt.state_dict()
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for g in sd["param_groups"]:
            for pid, name in zip(g["params"], g["param_names"]):
                i, p = layer[name], params[name]
                moments = meta["layers"][i]
                assert moments["exp_avg"]["dtype"] == "f32", "f32 moments only here"
                state[pid] = {
                    "exp_avg": f.get_tensor(f"state.{i}.exp_avg").view_as(p).clone(),
                    "exp_avg_sq": f.get_tensor(f"state.{i}.exp_avg_sq").view_as(p).clone(),
                }
            g["step"] = torch.tensor(float(meta["step"]))
    sd["state"] = state
    return sd


def verify():
    torch.set_num_threads(1)
    path = DATA / "lamb_from_timm.safetensors"
    run = load_file(str(DATA / "timm_run.safetensors"))
    # The plain safetensors loader reads lamb's file too.
    tensors = load_file(str(path))
    print(f"{path.name}: {len(tensors)} tensors, checksum ok")

    model = make_model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            # lamb saved the params after K steps; they are timm's, bit for bit.
            saved = tensors[f"param.{n}"].view_as(p)
            assert torch.equal(saved, run[f"params.{n}"]), n
            p.copy_(saved)
    opt = make_optimizer(model)
    opt.load_state_dict(lamb_to_timm_state_dict(path, opt, model))
    for t in range(K + 1, N + 1):
        for n, p in model.named_parameters():
            p.grad = run[f"grad.{t}.{n}"].clone()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), run[f"final.{n}"]), f"{n}: params differ"
        st = opt.state[p]
        assert torch.equal(st["exp_avg"], run[f"final_exp_avg.{n}"]), n
        assert torch.equal(st["exp_avg_sq"], run[f"final_exp_avg_sq.{n}"]), n
    print(
        f"timm resumed from lamb's checkpoint: steps {K + 1}..{N} equal the uninterrupted "
        "run bit for bit"
    )


def self_test():
    data = bytes((i * 7 + 3) & 0xFF for i in range(300))
    assert xxh64(data[:0]) == 0xEF46DB3751D8E999
    assert xxh64(data[:33]) == 0x50A7CFC7BA588784
    assert xxh64(data) == 0x240004DBEE0BA6DC
    assert xxh64(b"abc") == 0x44BC2CF5AD770999


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verify", action="store_true", help="check lamb_from_timm.safetensors")
    args = ap.parse_args()
    self_test()
    if args.verify:
        verify()
    else:
        DATA.mkdir(parents=True, exist_ok=True)
        generate()


if __name__ == "__main__":
    sys.exit(main())
