"""Finds the real CUDA toolkit folder (used by setup.py and tools/cmake_check.sh) and encodes
the CUDA architecture list the extension records.

torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (as on
our build machines) makes that guess wrong, so look for a folder that holds
both bin/nvcc and the runtime headers.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys


def looks_like_cuda_toolkit(folder: str | None) -> bool:
    if not folder:
        return False
    has_nvcc = os.path.isfile(os.path.join(folder, "bin", "nvcc"))
    has_headers = os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")) or bool(
        glob.glob(os.path.join(folder, "targets", "*", "include", "cuda_runtime.h"))
    )
    return has_nvcc and has_headers


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder, or None."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        folder = os.environ.get(variable)
        if folder:
            if looks_like_cuda_toolkit(folder):
                return folder
            print(f"[auditkit build] ignoring {variable}={folder}: no bin/nvcc and include/cuda_runtime.h there",
                  file=sys.stderr)
    candidates = ["/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates += ["/opt/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for folder in candidates:
        if looks_like_cuda_toolkit(folder):
            return os.path.realpath(folder)
    return None


def nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def arch_list_token(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as one C preprocessing number: "7.5;8.0;9.0+PTX" -> 7.5_8.0_9.0ptx.

    setup.py passes it to nvcc as -DAUDITKIT_CUDA_ARCHS=<token> (no quotes or semicolons to
    survive the shell); the extension records it and auditkit.ops._extension.parse_cuda_archs
    reads it back. A list in another form (names such as "Turing") becomes "unknown" (trusted).
    """
    parts = [p.lower().replace("+ptx", "ptx") for p in re.split(r"[;,\s]+", arch_list.strip()) if p]
    if parts and all(re.fullmatch(r"\d+\.\d+[af]?(ptx)?", p) for p in parts):
        return "_".join(parts)
    return "unknown"


if __name__ == "__main__":
    print(find_cuda_home() or "")
