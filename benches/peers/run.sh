#!/usr/bin/env bash
# Other LAMB implementations on lamb-std's model workloads, and the report.
#
#   benches/peers/run.sh [--torch] [peers.py options...]   measure; writes docs/perf/peers.json
#   benches/peers/run.sh report [report.py options...]      docs/perf/report.{md,png}
#   benches/peers/run.sh --torch interleaved [interleaved.py options...]
#        lamb-std, torch, timm and optax alternating round by round, with and without
#        global clipping; writes docs/perf/<date>-<cpu>.{json,md}, prints the README table
#
# Creates benches/peers/.venv (git-ignored) on first use: jax[cpu], optax, numpy,
# matplotlib; with --torch also torch and timm. torch from PyPI is the CUDA build: its
# `import torch` needs the nvidia-* wheels even on a CPU-only machine (a `--no-deps` install
# fails at import with "libcublasLt.so.* not found"), so --torch installs the full set
# (~6 GB, about a minute here). Set PEERS_PIP_ARGS to pass extra pip options (for example
# `--index-url` of a CPU-only wheel index where one is reachable).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
py="$venv/bin/python"

want_torch=0
for a in "$@"; do
    [[ "$a" == "--torch" ]] && want_torch=1
done

pip_install() {
    # shellcheck disable=SC2086
    "$py" -m pip install --quiet --disable-pip-version-check ${PEERS_PIP_ARGS:-} "$@"
}

if [[ ! -x "$py" ]]; then
    echo "# creating $venv" >&2
    python3 -m venv "$venv"
fi
if ! "$py" -c "import jax, optax, numpy, matplotlib" 2>/dev/null; then
    echo "# installing jax[cpu], optax, numpy, matplotlib" >&2
    pip_install "jax[cpu]" optax numpy matplotlib
fi
if [[ $want_torch == 1 ]] && ! "$py" -c "import torch, timm" 2>/dev/null; then
    echo "# installing torch, timm (torch's CUDA wheels included: several GB)" >&2
    pip_install torch timm
fi

cd "$root"
args=()
for a in "$@"; do
    [[ "$a" == "--torch" ]] || args+=("$a")
done
if [[ "${args[0]:-}" == "interleaved" ]]; then
    exec "$py" "$here/interleaved.py" "${args[@]:1}"
fi
if [[ "${1:-}" == "report" ]]; then
    shift
    exec "$py" "$here/report.py" "$@"
fi
exec "$py" "$here/peers.py" "$@"
