#!/usr/bin/env bash
# CUDA 13.4's nvcc from PyPI, for compile-checking the `cuda`/`nccl` features on machines without a
# GPU or a CUDA installation (CI). Installed once into a cache folder and reused; prints the
# environment to `eval`:  eval "$(bash scripts/install-cuda-toolchain.sh)"
set -euo pipefail
DIR="${DEEPSCALE_CUDA_DIR:-$HOME/.cache/deepscale/cuda-13.4.92}"
STAMP="$DIR/.complete"
if [ ! -f "$STAMP" ]; then
  rm -rf "$DIR"
  mkdir -p "$DIR"
  echo "installing CUDA 13.4 nvcc from PyPI into $DIR" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$DIR/site" \
    nvidia-cuda-nvcc==13.4.92 nvidia-nvvm==13.4.92 nvidia-cuda-runtime==13.4.92 \
    nvidia-cuda-crt==13.4.92 nvidia-cuda-cccl==13.3.5.0.6 >&2
  touch "$STAMP"
fi
# The wheels unpack as nvidia/cu13/{bin,include,lib,nvvm}; find the root that holds bin/nvcc.
NVCC="$(find "$DIR/site" -path '*/bin/nvcc' -type f | head -n1)"
if [ -z "$NVCC" ]; then
  echo "error: no bin/nvcc under $DIR/site (remove $DIR and retry)" >&2
  exit 1
fi
chmod +x "$NVCC" "$(dirname "$NVCC")"/* 2>/dev/null || true
ROOT="$(dirname "$(dirname "$NVCC")")"
echo "export CUDA_ROOT='$ROOT' CUDA_PATH='$ROOT' CUDA_COMPUTE_CAP=80 PATH='$ROOT/bin':\"\$PATH\""
