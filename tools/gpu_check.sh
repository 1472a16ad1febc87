#!/usr/bin/env bash
# `make gpu-check`: the prepared GPU check (tools/gpu_check.py says what it does). On a machine
# without a GPU it prints one line saying the GPU part was skipped and why, and exits 0.
#
# The interpreter: GPU_CHECK_PYTHON if set, else the machine's own python3 when it has torch
# (the GPU machine's image), else this checkout's .venv (a development machine).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${GPU_CHECK_PYTHON:-}
if [ -z "$python" ]; then
  if python3 -c "import torch" >/dev/null 2>&1; then
    python=python3
  elif [ -x .venv/bin/python ]; then
    python=.venv/bin/python
  else
    echo "gpu-check: skipped the GPU part: no python3 with torch here (run make setup first)"
    exit 0
  fi
fi
export PYTHONUNBUFFERED=1
exec "$python" tools/gpu_check.py "$@"
