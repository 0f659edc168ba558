#!/usr/bin/env bash
# Regenerates lamb-std/tests/data/checkpoint/ (PyTorch interop of lamb checkpoints) in three
# steps, described in generate.py's docstring:
#
#   1. generate.py            timm Lamb, 3 + 2 steps of a small model: timm_state.safetensors
#                             (its state_dict after 3 steps) and timm_run.safetensors
#   2. checkpoint_torch test  lamb loads the timm state, checks steps 4..5 against timm's and
#                             writes lamb_from_timm.safetensors (LAMB_UPDATE_CHECKPOINT_DATA=1)
#   3. generate.py --verify   PyTorch reads lamb's file, checks its checksum, loads it into a
#                             timm Lamb and checks that steps 4..5 equal timm's bit for bit
#
# Needs torch, timm and safetensors: it uses the venv of scripts/reference (made by
# `scripts/reference/generate.sh --torch`, which pins torch 2.15.0, timm 1.0.31 and brings
# safetensors 0.8.0), or the interpreter in $PYTHON. No GPU is used.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-$root/scripts/reference/.venv/bin/python}
if ! "$python" -c 'import torch, timm, safetensors' 2>/dev/null; then
    echo "$python cannot import torch, timm and safetensors:" >&2
    echo "run scripts/reference/generate.sh --torch first, or set PYTHON" >&2
    exit 1
fi

"$python" "$here/generate.py"
(cd "$root" && LAMB_UPDATE_CHECKPOINT_DATA=1 cargo test -q -p lamb-std --test checkpoint_torch)
"$python" "$here/generate.py" --verify
chmod 644 "$root"/lamb-std/tests/data/checkpoint/*.safetensors
# (The files' bytes change from run to run even where their contents do not: safetensors
# writes the metadata map in hash-map order.)
