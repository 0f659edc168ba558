#!/usr/bin/env bash
# Regenerates the reference vectors in lamb-core/tests/data/reference/ from the real
# implementations, in a virtual environment of pinned packages under
# scripts/reference/.venv (gitignored).
#
#   scripts/reference/generate.sh            optax, nvlamb and seed (jax + optax, ~0.5 GB)
#   scripts/reference/generate.sh --torch    the same plus timm (torch + timm, ~6 GB)
#
# Without --torch, timm.json/timm.f32 are left as they are (they are committed).
# Extra arguments go to generate.py (e.g. --out DIR). The committed data was made with
# CPython 3.11.7 on x86_64 Linux (jax 0.10 needs Python >= 3.11); set PYTHON to choose the
# interpreter that creates the venv.
#
# torch on this machine (no network but the package registries): PyPI has no CPU-only
# x86_64 Linux wheel of torch, and the CPU wheel index of pytorch.org is not reachable.
# `pip install --no-deps torch` plus its pure-Python dependencies (filelock,
# typing-extensions, sympy, networkx, jinja2, fsspec) was tried and does NOT import: the
# PyPI wheel is the CUDA build, and libtorch_cpu.so itself has DT_NEEDED libcudart.so.13
# and libcupti.so.13, libtorch_python.so needs libcudnn.so.9 and libcufile.so.0, and
# libtorch.so needs libtorch_cuda.so (cublas, cublasLt, cufft, cusparse, cusparseLt,
# nccl, nvrtc, nvshmem); torch/__init__.py then fails with "libcublasLt.so.*[0-9] not
# found". So --torch installs torch with its declared dependencies, the nvidia-* wheels
# included: ~3 GB of CUDA libraries and ~1 GB of triton, about 6 GB in the venv, which
# took 45 s to download and install here. No GPU is needed or used: torch imports, finds
# no CUDA device, and runs on the CPU (torch.cuda.is_available() is False).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv="$here/.venv"
python=${PYTHON:-python3}

with_torch=0
args=()
for arg in "$@"; do
    case "$arg" in
        --torch) with_torch=1 ;;
        -h | --help)
            sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) args+=("$arg") ;;
    esac
done

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# The versions the committed data was made with (recorded again in each manifest).
"${pip[@]}" install --quiet \
    numpy==2.4.6 \
    "jax[cpu]==0.10.2" jaxlib==0.10.2 \
    optax==0.2.8

only=optax,nvlamb,seed
if [ "$with_torch" = 1 ]; then
    "${pip[@]}" install --quiet torch==2.15.0 timm==1.0.31 torchvision==0.29.2
    "$venv/bin/python" -c 'import torch; torch.ones(1)' # fails early if torch cannot load
    only=$only,timm
fi

exec "$venv/bin/python" "$here/generate.py" --only "$only" ${args[@]+"${args[@]}"}
