#!/usr/bin/env bash
# Makes sure the system has what lamb-mpi builds and tests against: OpenMPI (headers, the
# library, `mpirun`) and libclang (rsmpi generates its bindings with it). On Debian/Ubuntu it
# installs what is missing with apt, as root or through password-less sudo; otherwise it
# prints the exact command to run and fails. Used by scripts/test.sh and CI's `mpi-setup`.
set -euo pipefail

pkgs=(libopenmpi-dev openmpi-bin libclang-dev)

if ! command -v dpkg-query >/dev/null; then
  # Not Debian: check for the tools themselves and say what is needed.
  if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then exit 0; fi
  echo "lamb-mpi needs OpenMPI (mpicc, mpirun, headers) and libclang; install them with your" >&2
  echo "package manager, or test without MPI: cargo test --workspace --exclude lamb-mpi" >&2
  exit 1
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

install=(apt-get install -y -qq "${missing[@]}")
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo)
else
  echo "lamb-mpi needs these packages, and installing them needs root. Run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  echo "then run the tests again (or test without MPI: cargo test --workspace --exclude lamb-mpi)." >&2
  exit 1
fi
echo "+ ${sudo[*]} apt-get update -qq && ${sudo[*]} ${install[*]}"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive "${install[@]}"
