#!/usr/bin/env bash
# Configures and builds CMakeLists.txt against the venv's libtorch and runs the
# C++ tests: proof that the CMake build of csrc/ stays in step with setup.py.
# Usage: tools/cmake_check.sh [python]
# The CUDA kernels are compiled too when a toolkit is found and torch is a CUDA
# build (AUDITKIT_CMAKE_CUDA=ON|OFF overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
PY_BIN_DIR=$(dirname "$PY")
export PATH="$PWD/$PY_BIN_DIR:$PATH"   # the venv's ninja
TORCH_PREFIX=$("$PY" -c "import torch; print(torch.utils.cmake_prefix_path)")
CUDA_HOME=${CUDA_HOME:-$("$PY" tools/find_cuda.py)}
TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')")
if [ -n "$CUDA_HOME" ] && [ -n "$TORCH_CUDA" ]; then WITH_CUDA=${AUDITKIT_CMAKE_CUDA:-ON}; else WITH_CUDA=OFF; fi
echo "[cmake-check] CUDA toolkit: ${CUDA_HOME:-none}; torch CUDA: ${TORCH_CUDA:-none}; AUDITKIT_WITH_CUDA=$WITH_CUDA"
BUILD_DIR=build/cmake
# Without an explicit list torch's CMake config probes for a GPU.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
args=(-S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX"
      -DAUDITKIT_WITH_CUDA="$WITH_CUDA")
if [ -n "$CUDA_HOME" ]; then
  # torch's CMake config looks for the toolkit even for a CPU-only build of ours.
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCUDAToolkit_ROOT="$CUDA_HOME" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc")
  # A minimal toolkit may lack NVRTC, which torch's targets link; the pip
  # wheels of torch's CUDA dependencies carry it.
  if [ ! -e "$CUDA_HOME/lib64/libnvrtc.so" ]; then
    NVRTC=$("$PY" -c "import glob, os, torch; site = os.path.dirname(os.path.dirname(torch.__file__)); print((sorted(glob.glob(site + '/nvidia/cu*/lib/libnvrtc.so*')) + [''])[0])")
    [ -n "$NVRTC" ] && args+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
  fi
fi
cmake "${args[@]}"
cmake --build "$BUILD_DIR" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD_DIR" --output-on-failure
