#!/usr/bin/env bash
# The test command: system deps, real fixtures, then the whole suite (the MPI suite under mpirun too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/fetch-test-assets.sh
cargo test --workspace --all-targets
# Open MPI refuses root unless told; CI containers run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo test -p deepscale --features mpi --test mpi
