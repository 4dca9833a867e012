#!/usr/bin/env bash
# Compile-checks the GPU code (features `cuda` + `nccl`, with `mpi` for the NCCL bootstrap under
# mpirun) on a machine without a GPU: CUDA 13.4's nvcc from PyPI builds candle's kernels, then
# `cargo check` and clippy over every target. The build folder lives beside the toolchain in the
# cache, so a second run on the same machine only rechecks DeepScale itself.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/install-cuda-toolchain.sh)"
export CARGO_TARGET_DIR="${DEEPSCALE_CUDA_TARGET_DIR:-$HOME/.cache/deepscale/target-cuda}"
features=deepscale/nccl,deepscale/mpi
cargo check --workspace --all-targets --features "$features"
cargo clippy --workspace --all-targets --features "$features" -- -D warnings
