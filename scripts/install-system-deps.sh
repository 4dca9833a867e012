#!/usr/bin/env bash
# Installs the system packages the build and tests need, only when missing (idempotent).
#   Open MPI (mpirun + headers) and libclang: the `mpi` feature (rsmpi's bindgen).
#   BLIS: the f32 GEMMs, 10-20% faster than the gemm crate on GPT-2's shapes here.
set -euo pipefail
need=()
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi/include/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || need+=(libopenmpi-dev)
# bindgen needs libclang itself (libclang-cpp is not it).
ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v pip >/dev/null 2>&1 || command -v pip3 >/dev/null 2>&1 || python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# The tensorboard reader the monitor tests check our event files with lives in a venv.
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need+=(python3-venv)
command -v npm >/dev/null 2>&1 || need+=(npm)
# A system BLAS for the f32 products (loaded at run time; candle-deepscale/src/blas.rs): BLIS,
# whose single-threaded build is safe to call from several threads (OpenBLAS's is not).
[ -e /usr/lib/x86_64-linux-gnu/libblis.so.4 ] || need+=(libblis4-serial)
if [ ${#need[@]} -gt 0 ]; then
  echo "install-system-deps: installing ${need[*]}" >&2
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_ apt-get update -qq
  $sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "install-system-deps: ok" >&2
