#!/usr/bin/env bash
# The test command: system deps, real fixtures, then the whole suite in one build (the MPI suite,
# which drives `mpirun -np 2|4`, included: building with the feature once avoids a second build
# of the dependencies under another feature set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/fetch-test-assets.sh
# Open MPI refuses root unless told; CI containers run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The library's examples as their users run them (tests/examples.rs and the MPI suite start
# these binaries; `cargo test` builds examples only as test harnesses).
cargo build --workspace --examples --features deepscale/mpi
cargo test --workspace --all-targets --features deepscale/mpi
# No GPU here: the CUDA/NCCL code is compile-checked (tests/gpu.rs runs where GPUs are).
bash scripts/check-gpu.sh
