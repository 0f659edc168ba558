#!/usr/bin/env bash
# The README's test command: installs what the workspace needs (scripts/mpi-setup.sh, which
# prints the exact command instead when that needs root it does not have), then runs the
# workspace's tests. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/mpi-setup.sh
echo "+ cargo test --workspace $*"
exec cargo test --workspace "$@"
