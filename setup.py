"""Builds auditkit and its C++/CUDA extension ``auditkit._C``.

Install with ``pip install --no-build-isolation -e .`` into an environment that
already has torch (``make setup`` does all of it). Project metadata lives in
pyproject.toml; this file only describes the extension.

Environment variables:
  AUDITKIT_BUILD_CUDA      auto (default): CUDA kernels when torch is a CUDA build
                           and a CUDA toolkit is found; 1: require them; 0: skip.
                           Never decided by torch.cuda.is_available(): a build
                           host without a GPU still compiles every .cu file.
  AUDITKIT_SKIP_EXTENSION  1: build no extension (the package then runs on its
                           pure-PyTorch reference kernels).
  CUDA_HOME                the toolkit folder; found automatically when unset.
  TORCH_CUDA_ARCH_LIST     default "7.5;8.0;9.0+PTX" (T4 and other Turing cards, A100 and
                           the rest of Ampere/Ada, H100/H200, PTX for newer GPUs). The
                           list is recorded in the extension: on a GPU it lacks, the
                           reference kernels serve CUDA tensors instead of failing.
  MAX_JOBS                 parallel compile jobs for ninja.
"""

from __future__ import annotations

import glob
import os
import runpy
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0+PTX"
# Toolkit discovery is shared with tools/cmake_check.sh.
_find_cuda = runpy.run_path(os.path.join(ROOT, "tools", "find_cuda.py"))
find_cuda_home = _find_cuda["find_cuda_home"]
nvcc_version = _find_cuda["nvcc_version"]
arch_list_token = _find_cuda["arch_list_token"]


def log(message: str) -> None:
    print(f"[auditkit build] {message}", flush=True)


def decide_cuda(torch_cuda: str | None) -> tuple[bool, str]:
    """(build CUDA kernels?, why) from the toolchain alone."""
    mode = os.environ.get("AUDITKIT_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False, "disabled by AUDITKIT_BUILD_CUDA=0"
    required = mode in ("1", "on", "true", "yes")

    def refuse(reason: str) -> tuple[bool, str]:
        if required:
            sys.exit(f"[auditkit build] AUDITKIT_BUILD_CUDA=1 but {reason}")
        return False, reason

    if torch_cuda is None:
        return refuse("the installed torch is a CPU-only build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return refuse("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    version = nvcc_version(cuda_home)
    if version is None:
        return refuse(f"{cuda_home}/bin/nvcc did not report a version")
    if version.split(".")[0] != torch_cuda.split(".")[0]:
        return refuse(
            f"nvcc {version} in {cuda_home} does not match torch's CUDA {torch_cuda} (major versions differ)"
        )
    os.environ["CUDA_HOME"] = cuda_home
    return True, f"toolkit {cuda_home} (nvcc {version}), torch CUDA {torch_cuda}"


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension_modules():
    if os.environ.get("AUDITKIT_SKIP_EXTENSION") == "1":
        log("AUDITKIT_SKIP_EXTENSION=1: building no extension (reference kernels only)")
        return [], {}
    try:
        import torch
    except ImportError:
        sys.exit(
            "[auditkit build] PyTorch must be installed before auditkit is built.\n"
            "  Run `make setup`, or: pip install torch==2.14.1 torchvision==0.29.1 ninja\n"
            "  and then: pip install --no-build-isolation -e .\n"
            "  (AUDITKIT_SKIP_EXTENSION=1 builds without the extension.)"
        )
    with_cuda, why = decide_cuda(torch.version.cuda)
    # Import only now: cpp_extension fixes CUDA_HOME when it is imported.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sources("csrc/*.cpp") + sources("csrc/ops/*.cpp") + sources("csrc/ops/cpu/*.cpp")
    # -Wno-psabi: the 64-byte vector helpers change no ABI we expose (all internal).
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    define_macros = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        cu_sources = sources("csrc/ops/cuda/*.cu")
        define_macros.append(("AUDITKIT_WITH_CUDA", None))
        archs = arch_list_token(os.environ["TORCH_CUDA_ARCH_LIST"])
        extension = CUDAExtension(
            "auditkit._C",
            cpp_sources + cu_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", f"-DAUDITKIT_CUDA_ARCHS={archs}"]},
            extra_link_args=["-fopenmp"],
        )
        log(f"CUDA kernels: yes ({why}); TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        log(f"CUDA sources: {', '.join(cu_sources)}")
    else:
        extension = CppExtension(
            "auditkit._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
        log(f"CUDA kernels: no ({why})")
    log(f"torch {torch.__version__}; C++ sources: {', '.join(cpp_sources)}")
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
