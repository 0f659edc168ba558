#!/usr/bin/env python3
"""Writes the compact-storage reference of lamb-core/tests/data/precision/.

A float64 NumPy LAMB step over every combination of parameter, gradient and moment
storage that lamb-core offers (lamb_core::layer, lamb_core::codec), with the quantisation schemes
written here from their documented definitions, independently of the Rust code:

  bf16, f16      round to nearest, ties to even (a generic "round to p significant bits
                 with exponent range [emin, emax]" on float64 values, subnormals included)
  bf16 SR        stochastic rounding: away from zero iff frac * 2^16 + r >= 2^16, where frac
                 in [0, 1) is the value's position between its two bf16 neighbours and r the
                 16 bits `stochastic_bits(seed, index)` (the SplitMix64-style hash documented
                 in precision.rs); bf16 SR moments draw for m with seed ^ M_STREAM and
                 for v with seed ^ V_STREAM (the constants of precision.rs)
  8-bit moments  blocks of QBLOCK = 256 elements, absmax = max |x| of the block's NEW values;
                 code = the nearest entry of a value table (ties to the even code) to
                 |x| / absmax; m: sign bit + E4M3 (bias 15), v: E5M3 (bias 31)

Each step decodes the stored state (exactly, to float64), runs the LAMB paper step in
float64 (lr 1e-2, betas 0.9/0.999, eps 1e-6 outside the square root, decoupled weight decay
0.01, bias correction 1 - beta^t in float64, trust ratio ||p|| / ||u|| with r = 1 where a
norm is 0) and encodes the new state with the schemes. The stored state after every step
is written, so the Rust test can start each of its steps from the reference's state
(lamb-core/tests/precision_reference.rs). Inputs (initial params, gradients) are not stored:
they are the SplitMix64 recipes of generate.py. The data folder's README.md documents the
format; keep it, this script and the Rust reader in step.

  scripts/reference/.venv/bin/python scripts/reference/precision.py
  ... precision.py --mutate NAME --out DIR    a deliberately broken reference (see MUTATIONS)
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import (  # noqa: E402  (the shared input recipes)
    GOLDEN,
    MIX1,
    MIX2,
    _selftest_splitmix64,
    checksum,
    materialize,
    tiny_huge,
    uniform,
    versions,
)

FORMAT = "lamb-precision-reference-v1"
STEPS = 5
QBLOCK = 256

# The LAMB paper preset (LambConfig::paper()) with lr 1e-2: bf16 params then move about
# 2.5 bf16 ulps per step instead of a quarter of one.
HP = dict(
    lr=1e-2,
    beta1=0.9,
    beta2=0.999,
    eps=1e-6,
    weight_decay=0.01,
    bias_correction="f64",
    eps_mode="outside_sqrt",
    ratio_rule="zero_norm_is_one",
    grad_scale=1.0,
)

# Stochastic-rounding seed of tensor k at step t (1-based): distinct per step and tensor.
SR_SEED = 0x5EED_0000_0000_0000


def sr_seed(tensor_index: int, step: int) -> int:
    return SR_SEED + (tensor_index << 8) + step


# Moments::Bf16's stochastic draws: m under seed ^ M_STREAM, v under seed ^ V_STREAM.
M_STREAM = 0x6D5F_7374_7265_616D  # "m_stream"
V_STREAM = 0x765F_7374_7265_616D  # "v_stream"


# Deliberately broken variants, to show that the Rust test notices each kind of mistake.
# Only with --out (never the committed data).
MUTATIONS = {
    "code_table": "E4M3 with exponent bias 14 instead of 15 (m code values doubled)",
    "round_down": "8-bit codes rounded down (to the code below) instead of to nearest",
    "absmax_tensor": "one absmax per tensor instead of one per 256-element block",
    "absmax_old": "absmax of the OLD moment values (before the update) instead of the new",
    "stale_model_copy": "master combinations: the model's half copy is not rewritten",
    "bf16_truncate": "bf16 rounding (params and moments) truncates instead of RNE",
    "sr_index_shift": "stochastic rounding hashes index + 1 instead of the element index",
    "sr_nearest": "bf16 stochastic rounding replaced by round to nearest",
    "sr_moment_streams": "bf16 SR moments draw m and v with the params' seed (no streams)",
}
MUTATE = None


# --------------------------------------------------------------------------------------
# Rounding to nearest even on a float grid.


def round_to_precision(x, prec: int, emin: int, max_finite: float, trunc=False) -> np.ndarray:
    """x (float64) rounded to nearest, ties to even, onto the binary floating-point grid
    with `prec` significant bits, minimum normal exponent `emin` (subnormals below, same
    spacing as the lowest normal binade) and largest finite value `max_finite`; beyond
    that, +-inf (values from max_finite + half an ulp on). Zeros keep their sign."""
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    nz = np.isfinite(x) & (x != 0)
    xs = x[nz]
    _, e = np.frexp(xs)  # xs = f * 2^e, 0.5 <= |f| < 1
    e = np.maximum(e - 1, emin)  # exponent of the binade (clamped: subnormal grid)
    q = np.ldexp(1.0, e - (prec - 1))  # grid spacing
    r = np.rint(xs / q) * q  # xs / q is exact (power of two); rint: half to even
    if trunc:  # (only for --mutate bf16_truncate)
        r = np.trunc(xs / q) * q
    r = np.where(np.abs(r) > max_finite, np.copysign(np.inf, xs), r)
    out[nz] = r
    return out


BF16_MAX = float((2 - 2.0**-7) * 2.0**127)
F16_MAX = 65504.0


def bf16_round(x) -> np.ndarray:
    return round_to_precision(x, 8, -126, BF16_MAX)


def bf16_encode(x) -> np.ndarray:
    """bf16_round for the step's outputs (inputs use bf16_round itself, so that
    --mutate bf16_truncate breaks only the scheme under test, not the input recipes)."""
    if MUTATE == "bf16_truncate":
        return round_to_precision(x, 8, -126, BF16_MAX, trunc=True)
    return bf16_round(x)


def f16_round(x) -> np.ndarray:
    return round_to_precision(x, 11, -14, F16_MAX)


def bf16_bits(rounded) -> np.ndarray:
    """The bf16 bit patterns of values already on the bf16 grid (exact)."""
    f = np.asarray(rounded, dtype=np.float64).astype(np.float32)
    assert np.array_equal(f.astype(np.float64), np.asarray(rounded), equal_nan=True)
    b = f.view(np.uint32)
    assert not np.any(b & 0xFFFF), "value not on the bf16 grid"
    return (b >> 16).astype(np.uint16)


def f16_bits(rounded) -> np.ndarray:
    h = np.asarray(rounded, dtype=np.float64).astype(np.float16)
    assert np.array_equal(h.astype(np.float64), np.asarray(rounded), equal_nan=True)
    return h.view(np.uint16)


def bf16_decode(bits) -> np.ndarray:
    return (np.asarray(bits, np.uint32) << 16).view(np.float32).astype(np.float64)


def f16_decode(bits) -> np.ndarray:
    return np.asarray(bits, np.uint16).view(np.float16).astype(np.float64)


def f32_store(x) -> np.ndarray:
    """float64 -> f32, round to nearest even (IEEE conversion)."""
    return np.asarray(x, dtype=np.float64).astype(np.float32)


# --------------------------------------------------------------------------------------
# Stochastic rounding.


def stochastic_bits(seed: int, index) -> np.ndarray:
    """The 16 random bits of each element index under `seed` (precision.rs's hash):
    z = seed ^ index * 0x9E3779B97F4A7C15, two SplitMix64 mixing rounds, the top 16 bits
    of the result. All arithmetic mod 2^64."""
    if MUTATE == "sr_index_shift":
        index = np.asarray(index, np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        i = np.asarray(index, dtype=np.uint64)
        z = np.uint64(seed) ^ (i * np.uint64(GOLDEN))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        return ((z ^ (z >> np.uint64(31))) >> np.uint64(48)).astype(np.int64)


def bf16_stochastic(x, r) -> np.ndarray:
    """x (float64) to bf16 by stochastic rounding with the 16-bit draws r: with a the bf16
    neighbour toward zero, q the bf16 spacing there and frac = (|x| - |a|) / q in [0, 1),
    the result is |a| + q (away from zero) iff frac * 2^16 + r >= 2^16, else |a|; the sign
    is kept. Up with probability frac over uniform r. (On an f32 input, frac * 2^16 is the
    16 discarded bits, so this is "add r below the kept bits and truncate".)"""
    x = np.asarray(x, dtype=np.float64)
    if MUTATE == "sr_nearest":
        return bf16_round(x)
    ax = np.abs(x)
    out = np.zeros_like(x)
    nz = ax > 0
    _, e = np.frexp(ax[nz])
    e = np.maximum(e - 1, -126)
    q = np.ldexp(1.0, e - 7)
    k = np.floor(ax[nz] / q)  # exact
    frac = ax[nz] / q - k  # exact, in [0, 1)
    up = frac * 65536.0 + np.asarray(r, np.float64)[nz] >= 65536.0
    out[nz] = (k + up) * q
    assert np.all(out <= BF16_MAX)
    return np.copysign(out, x)


# --------------------------------------------------------------------------------------
# 8-bit blockwise moments.


def minifloat_table(bias: int, max_code: int) -> np.ndarray:
    """Value of each code 0..=max_code of an unsigned minifloat with 3 mantissa bits and
    exponent bias `bias` (precision.rs): e = code >> 3, f = code & 7;
    e = 0: f * 2^-(bias + 2) (subnormal), else (8 + f) * 2^(e - bias - 3)."""
    c = np.arange(max_code + 1)
    e, f = c >> 3, (c & 7).astype(np.float64)
    vals = np.where(e == 0, f * 2.0 ** -(bias + 2), (8 + f) * np.exp2(e - bias - 3.0))
    assert np.all(np.diff(vals) > 0)
    return vals


M_BIAS, M_MAX = 15, 0x78  # E4M3: code 0x78 = 1.0
V_BIAS, V_MAX = 31, 248  # E5M3: code 248 = 1.0
M_TABLE = minifloat_table(M_BIAS, M_MAX)
V_TABLE = minifloat_table(V_BIAS, V_MAX)
assert M_TABLE[-1] == 1.0 and V_TABLE[-1] == 1.0
# The m table the encoder uses and the manifest records (only --mutate code_table changes it).
M_ENC_TABLE, M_ENC_BIAS = M_TABLE, M_BIAS


def nearest_code(y, table) -> np.ndarray:
    """Index of the table entry nearest to each y >= 0, ties to the even index; y beyond
    the last entry takes the last."""
    y = np.asarray(y, dtype=np.float64)
    lo = np.clip(np.searchsorted(table, y, side="right") - 1, 0, len(table) - 1)
    hi = np.minimum(lo + 1, len(table) - 1)
    mid = (table[lo] + table[hi]) / 2  # exact: few significant bits
    if MUTATE == "round_down":
        return lo
    pick_hi = (y > mid) | ((y == mid) & (lo % 2 == 1))
    return np.where(pick_hi & (hi > lo), hi, lo)


def q8_encode(x, table, signed: bool, old=None):
    """(codes u8, absmax f32 per block) of float64 values x, blockwise."""
    n = len(x)
    nb = -(-n // QBLOCK)
    codes = np.zeros(n, dtype=np.uint8)
    absmax = np.zeros(nb, dtype=np.float32)
    whole = np.max(np.abs(x)) if n else 0.0
    for b in range(nb):
        blk = x[b * QBLOCK : (b + 1) * QBLOCK]
        am = np.max(np.abs(blk))
        if MUTATE == "absmax_tensor":
            am = whole
        elif MUTATE == "absmax_old" and old is not None:
            am_old = np.max(np.abs(old[b * QBLOCK : (b + 1) * QBLOCK]))
            am = am_old if am_old > 0 else am
        absmax[b] = np.float32(am)
        if am == 0:
            continue  # all codes 0
        c = nearest_code(np.abs(blk) / am, table).astype(np.uint8)
        if signed:
            c = np.where((blk < 0) & (c != 0), c | 0x80, c).astype(np.uint8)
        codes[b * QBLOCK : (b + 1) * QBLOCK] = c
    return codes, absmax


def q8_decode(codes, absmax, table, signed: bool) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.int64)
    am = np.repeat(np.asarray(absmax, np.float64), QBLOCK)[: len(codes)]
    mag = table[codes & 0x7F if signed else codes] * am  # exact in float64
    if signed:
        mag = np.where(codes & 0x80, -mag, mag)
    return mag


# --------------------------------------------------------------------------------------
# Self-tests of the codecs against independent formulations.


def _selftest_codecs():
    rng = np.random.default_rng(1)
    # f32 inputs: bf16 RNE equals the bit trick of the definition, SR the add-and-truncate.
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) <= np.float32(3e38))]
    b = x.view(np.uint32).astype(np.uint64)
    rne = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    ours = bf16_round(x.astype(np.float64))
    keep = np.isfinite(ours)  # (the bit trick overflows to inf the same way)
    assert np.array_equal(bf16_bits(ours[keep]), rne[keep].astype(np.uint16))
    r = rng.integers(0, 65536, size=len(x))
    sr = ((b + r.astype(np.uint64)) >> 16) & 0xFFFF
    ours = bf16_stochastic(x.astype(np.float64), r)
    keep = np.abs(ours) <= BF16_MAX
    assert np.array_equal(bf16_bits(ours[keep]), sr[keep].astype(np.uint16))
    # f16 RNE of float64 values against NumPy's own float64 -> float16 conversion.
    y = np.concatenate(
        [
            rng.standard_normal(100_000) * 10.0 ** rng.integers(-9, 5, 100_000),
            np.array([65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 1e-9]),
        ]
    )
    with np.errstate(over="ignore"):
        assert np.array_equal(f16_round(y), y.astype(np.float16).astype(np.float64))
    # Nearest code: against a brute-force search over the table.
    for table in (M_TABLE, V_TABLE):
        ys = np.concatenate([rng.random(20_000) ** 12, table, (table[1:] + table[:-1]) / 2])
        c = nearest_code(ys, table)
        err = np.abs(table[None, :] - ys[:, None])
        best = err.min(axis=1)
        assert np.all(err[np.arange(len(ys)), c] == best)
        tie = (err == best[:, None]).sum(axis=1) > 1
        assert np.all(c[tie] % 2 == 0)
    # The hash, on values computed by hand from the formula for seed 0, index 1.
    with np.errstate(over="ignore"):
        z = (GOLDEN) & ((1 << 64) - 1)
        z = ((z ^ (z >> 30)) * MIX1) & ((1 << 64) - 1)
        z = ((z ^ (z >> 27)) * MIX2) & ((1 << 64) - 1)
        assert int(stochastic_bits(0, [1])[0]) == (z ^ (z >> 31)) >> 48


# --------------------------------------------------------------------------------------
# Cases.

PARAMS = ["f32", "bf16", "bf16_sr", "master_bf16", "master_f16"]
MOMENTS = ["f32", "bf16", "bf16_sr", "q8"]
# The half format of each params format (its gradients come in that format and in f32).
HALF_OF = {
    "f32": "f32",
    "bf16": "bf16",
    "bf16_sr": "bf16",
    "master_bf16": "bf16",
    "master_f16": "f16",
}


def combos():
    out = []
    for p in PARAMS:
        grads = [HALF_OF[p]] if HALF_OF[p] == "f32" else [HALF_OF[p], "f32"]
        for mo in MOMENTS:
            for g in grads:
                out.append((p, g, mo))
    return out


def tensor_specs():
    """The layers, shared by every combination. len 256 starts at zero (trust ratio 1 at
    step 1); len 777 has gradients of two magnitudes (x1 and x2^-8, alternating), so v
    spans 2^-16 of its block's range and both codes reach their subnormal part."""
    shapes = [
        ("len1", 1, lambda s: uniform(s, 0), lambda s: uniform(s, -4)),
        ("len255", 255, lambda s: uniform(s, -1), lambda s: uniform(s, -4)),
        ("zero256", 256, lambda s: {"pattern": "zeros"}, lambda s: uniform(s, -4)),
        ("len257", 257, lambda s: uniform(s, 1), lambda s: uniform(s, -4)),
        (
            "len777",
            777,
            lambda s: uniform(s, -2),
            lambda s: tiny_huge(s, -4, even_log2=-8, odd_log2=0),
        ),
    ]
    specs = []
    for k, (name, n, init, grad) in enumerate(shapes):
        seed0 = 7000 + 10 * k
        specs.append(
            {
                "name": name,
                "len": n,
                "init": init(seed0),
                "grads": [grad(seed0 + t) for t in range(1, STEPS + 1)],
                "sr_seeds": [sr_seed(k, t) for t in range(1, STEPS + 1)],
            }
        )
    return specs


def u16_checksum(bits) -> str:
    """sum_i (i + 1) * bits_i mod 2^64 over u16 bit patterns, as hex."""
    with np.errstate(over="ignore"):
        b = np.asarray(bits, np.uint16).astype(np.uint64)
        w = np.arange(1, len(b) + 1, dtype=np.uint64)
        return f"{int(np.sum(b * w, dtype=np.uint64)):016x}"


def add_checksums(spec):
    n = spec["len"]
    for r in [spec["init"]] + spec["grads"]:
        x = materialize(r, n).astype(np.float64)
        r["checksum"] = checksum(x.astype(np.float32))
        r["checksum_bf16"] = u16_checksum(bf16_bits(bf16_round(x)))
        r["checksum_f16"] = u16_checksum(f16_bits(f16_round(x)))


# --------------------------------------------------------------------------------------
# The float64 LAMB step on decoded storage.


def lamb_step(p, g, m, v, t):
    """One LAMB paper step in float64. Returns (p_new, m_new, v_new, trust ratio)."""
    b1, b2 = HP["beta1"], HP["beta2"]
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    u = m_hat / (np.sqrt(v_hat) + HP["eps"]) + HP["weight_decay"] * p
    pn = np.sqrt(np.dot(p, p))
    un = np.sqrt(np.dot(u, u))
    ratio = 1.0 if (pn == 0.0 or un == 0.0) else pn / un
    return p - HP["lr"] * ratio * u, m, v, ratio


class Blob:
    def __init__(self):
        self.data = bytearray()

    def put(self, arr, dtype) -> int:
        arr = np.asarray(arr)
        assert arr.dtype == np.dtype(dtype), (arr.dtype, dtype)
        off = len(self.data)
        self.data += arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
        self.data += b"\0" * (-len(self.data) % 4)  # keep every array 4-byte aligned
        return off


def decode_grads(spec, t, fmt):
    """The gradients of step t as stored (the recipe rounded to the format), decoded."""
    x = materialize(spec["grads"][t - 1], spec["len"]).astype(np.float64)
    if fmt == "bf16":
        return bf16_decode(bf16_bits(bf16_round(x)))
    if fmt == "f16":
        return f16_decode(f16_bits(f16_round(x)))
    return x


def run_combo(blob, specs, pfmt, gfmt, mfmt):
    """All tensors of one combination through STEPS steps; returns the per-tensor list of
    per-step output records."""
    tensors = []
    for k, spec in enumerate(specs):
        n = spec["len"]
        init = materialize(spec["init"], n).astype(np.float64)
        # Stored state, decoded to float64.
        p = bf16_decode(bf16_bits(bf16_round(init))) if pfmt in ("bf16", "bf16_sr") else init
        model = None  # the half copy (written, never read)
        m = np.zeros(n)
        v = np.zeros(n)
        steps = []
        for t in range(1, STEPS + 1):
            g = decode_grads(spec, t, gfmt)
            p_new, m_new, v_new, ratio = lamb_step(p, g, m, v, t)
            rec = {
                "trust_ratio": ratio,
                "trust_ratio_bits": f"{int(np.float64(ratio).view(np.uint64)):016x}",
            }
            # Params.
            if pfmt == "f32":
                s = f32_store(p_new)
                rec["param"] = blob.put(s, np.float32)
                p = s.astype(np.float64)
            elif pfmt == "bf16":
                bits = bf16_bits(bf16_encode(p_new))
                rec["param"] = blob.put(bits, np.uint16)
                p = bf16_decode(bits)
            elif pfmt == "bf16_sr":
                r = stochastic_bits(spec["sr_seeds"][t - 1], np.arange(n))
                bits = bf16_bits(bf16_stochastic(p_new, r))
                rec["param"] = blob.put(bits, np.uint16)
                p = bf16_decode(bits)
            else:
                master = f32_store(p_new)
                # The model's copy is the stored master rounded (precision.rs: "overwritten
                # with the rounded master after the update").
                mh = master.astype(np.float64)
                if pfmt == "master_bf16":
                    to_model = lambda x: bf16_bits(bf16_encode(x))  # noqa: E731
                else:
                    to_model = lambda x: f16_bits(f16_round(x))  # noqa: E731
                if MUTATE != "stale_model_copy":
                    model = to_model(mh)
                elif model is None:
                    model = to_model(init)  # made from the initial params, never rewritten
                rec["master"] = blob.put(master, np.float32)
                rec["model"] = blob.put(model, np.uint16)
                p = mh
            # Moments.
            if mfmt == "f32":
                ms, vs = f32_store(m_new), f32_store(v_new)
                rec["m"] = blob.put(ms, np.float32)
                rec["v"] = blob.put(vs, np.float32)
                m, v = ms.astype(np.float64), vs.astype(np.float64)
            elif mfmt == "bf16":
                mb, vb = bf16_bits(bf16_encode(m_new)), bf16_bits(bf16_encode(v_new))
                rec["m"] = blob.put(mb, np.uint16)
                rec["v"] = blob.put(vb, np.uint16)
                m, v = bf16_decode(mb), bf16_decode(vb)
            elif mfmt == "bf16_sr":
                seed = spec["sr_seeds"][t - 1]
                sm, sv = seed ^ M_STREAM, seed ^ V_STREAM
                if MUTATE == "sr_moment_streams":
                    sm = sv = seed
                mb = bf16_bits(bf16_stochastic(m_new, stochastic_bits(sm, np.arange(n))))
                vb = bf16_bits(bf16_stochastic(v_new, stochastic_bits(sv, np.arange(n))))
                rec["m"] = blob.put(mb, np.uint16)
                rec["v"] = blob.put(vb, np.uint16)
                m, v = bf16_decode(mb), bf16_decode(vb)
            else:
                mc, ma = q8_encode(m_new, M_ENC_TABLE, True, old=m)
                vc, va = q8_encode(v_new, V_TABLE, False, old=v)
                rec["m"] = blob.put(mc, np.uint8)
                rec["v"] = blob.put(vc, np.uint8)
                rec["m_absmax"] = blob.put(ma, np.float32)
                rec["v_absmax"] = blob.put(va, np.float32)
                m = q8_decode(mc, ma, M_ENC_TABLE, True)
                v = q8_decode(vc, va, V_TABLE, False)
            steps.append(rec)
        tensors.append(steps)
    return tensors


def main():
    global MUTATE, M_ENC_TABLE, M_ENC_BIAS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[2] / "lamb-core/tests/data/precision"
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--mutate", choices=sorted(MUTATIONS), help="write a broken reference")
    args = ap.parse_args()
    out = Path(args.out)
    if args.mutate:
        if out.resolve() == default_out.resolve():
            sys.exit("--mutate needs --out elsewhere than the committed data folder")
        MUTATE = args.mutate
        if MUTATE == "code_table":
            M_ENC_BIAS = M_BIAS - 1
            M_ENC_TABLE = minifloat_table(M_ENC_BIAS, M_MAX)
    _selftest_splitmix64()
    if MUTATE is None:
        _selftest_codecs()
    else:
        # (The self-tests would reject most mutations before the Rust test sees them.)
        print(f"--mutate {MUTATE}: codec self-tests skipped", file=sys.stderr)

    specs = tensor_specs()
    for s in specs:
        add_checksums(s)
    blob = Blob()
    combo_list = []
    for pfmt, gfmt, mfmt in combos():
        combo_list.append(
            {
                "name": f"params={pfmt} grads={gfmt} moments={mfmt}",
                "params": pfmt,
                "grads": gfmt,
                "moments": mfmt,
                "tensors": run_combo(blob, specs, pfmt, gfmt, mfmt),
            }
        )
    sb_seeds = [0, 1, 0xFEED, SR_SEED + 1, 2**64 - 1]
    sb_index = [0, 1, 2, 255, 256, 776, 2**32 + 5, 2**63]
    sb = [
        {"seed": s, "index": i, "bits": int(stochastic_bits(s, [i])[0])}
        for s in sb_seeds
        for i in sb_index
    ]

    def table_json(table, bias, max_code, signed, name):
        return {
            "format": name,
            "bias": bias,
            "signed": signed,
            "max_code": max_code,
            "values_f32_bits": [int(b) for b in table.astype(np.float32).view(np.uint32)],
        }

    manifest = {
        "format": FORMAT,
        "data_file": "precision.bin",
        "data_bytes": len(blob.data),
        "steps": STEPS,
        "generator": "scripts/reference/precision.py",
        "mutation": MUTATE,
        "description": "float64 NumPy LAMB (paper preset, lr 1e-2) over every combination "
        "of params {f32, bf16 RNE, bf16 stochastic, f32 master + bf16 copy, f32 master + "
        "f16 copy} x grads {the params' half format, f32} x moments {f32, bf16 RNE, "
        "bf16 stochastic, 8-bit blockwise}: each step decodes the stored state exactly to float64, computes in "
        "float64 and encodes the new state with the storage schemes written in NumPy from "
        "their definitions (precision.rs).",
        "versions": versions(["numpy"]),
        "hyperparameters": HP,
        "qblock": QBLOCK,
        "codes": {
            "m": table_json(M_ENC_TABLE, M_ENC_BIAS, M_MAX, True, "sign + E4M3"),
            "v": table_json(V_TABLE, V_BIAS, V_MAX, False, "E5M3"),
        },
        "stochastic_bits": sb,
        "tensors": specs,
        "combos": combo_list,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.bin").write_bytes(bytes(blob.data))
    with open(out / "precision.json", "w") as f:
        json.dump(manifest, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(
        f"precision: {len(combo_list)} combinations, {len(specs)} tensors, {STEPS} steps, "
        f"{len(blob.data)} bytes" + (f" (MUTATION {MUTATE})" if MUTATE else ""),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
