"""The auditkit op library: where each op's schema meets its kernels.

The schemas and the CPU/CUDA kernels come from the compiled extension (csrc/). Each op file of
this package calls ``define`` with its schema and its pure-PyTorch reference kernel: when the
extension is missing, the schema is defined here and the reference serves every device; when it
lacks CUDA kernels (or they cannot run on the visible GPUs), the reference serves CUDA tensors.
Each op file registers its own fake kernel and autograd formula beside its wrapper, so every path
behaves the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from . import _extension

STATUS = _extension.status()
#: name -> schema of every op (a test compares them with the TORCH_LIBRARY definitions in csrc/).
SCHEMAS: dict[str, str] = {}
_REFERENCE_KERNELS: dict[str, Callable] = {}
_DEVICE_GENERIC: set[str] = set()  # compositions in csrc (CompositeExplicitAutograd): no per-device kernel
_libraries: dict[str, torch.library.Library] = {}  # kept alive: dropping one unregisters its kernels


def _library(kind: str) -> torch.library.Library:
    if kind not in _libraries:
        _libraries[kind] = torch.library.Library("auditkit", kind)
    return _libraries[kind]


def define(name: str, schema: str, reference: Callable, *, device_generic: bool = False) -> None:
    """Declares op ``name`` with its ``schema`` and pure-PyTorch ``reference`` kernel (the fallback;
    it must check its arguments as csrc does). ``device_generic``: csrc implements it once for every
    device (a composition of other ops), so it needs no CUDA fallback."""
    SCHEMAS[name] = schema
    _REFERENCE_KERNELS[name] = reference
    if device_generic:
        _DEVICE_GENERIC.add(name)
    if not STATUS.loaded:
        _library("DEF").define(schema)
        _library("DEF").impl(name, reference, "CompositeExplicitAutograd")
    elif not STATUS.cuda_kernels and not device_generic:
        _library("IMPL").impl(name, reference, "CUDA")


def _serve_cuda_with_reference() -> None:
    with warnings.catch_warnings():  # torch warns that compiled CUDA kernels are overridden: intended
        warnings.simplefilter("ignore", UserWarning)
        for name, kernel in _REFERENCE_KERNELS.items():
            if name not in _DEVICE_GENERIC:
                _library("IMPL").impl(name, kernel, "CUDA")


def check_cuda_devices(capabilities: dict[str, tuple[int, int]] | None = None) -> str | None:
    """Runs when CUDA initialises (``torch.cuda._lazy_call``; import must not touch CUDA):
    when a visible GPU has no kernel image in the build (e.g. a T4, sm_75, against a build for
    sm_80/sm_90 only), the reference serves CUDA tensors instead of every op failing with "no
    kernel image", and ``extension_status()`` and a ReferenceFallbackWarning say so. Returns
    that reason, or None when the kernels run on every visible GPU. ``capabilities`` (device
    name -> compute capability) replaces the real devices in tests."""
    if capabilities is None:
        capabilities = {f"cuda:{i}": torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    archs = _extension.parse_cuda_archs(STATUS.build_info.get("cuda_archs", "unknown"))
    missing = _extension.unsupported_gpus(archs, capabilities)
    if not missing:
        return None
    reason = (
        f"the CUDA kernels were compiled for {_extension.describe_cuda_archs(archs)}, which do not run on "
        f"{', '.join(missing)}; the reference serves CUDA tensors (rebuild with TORCH_CUDA_ARCH_LIST naming "
        "this GPU's compute capability, e.g. `TORCH_CUDA_ARCH_LIST=7.5 make build`)"
    )
    _extension.record_cuda_device_fallback(reason)
    _serve_cuda_with_reference()
    warnings.warn(f"auditkit: {reason}", _extension.ReferenceFallbackWarning, stacklevel=2)
    return reason


def _check_cuda_devices_safely() -> None:
    try:
        check_cuda_devices()
    except Exception as error:  # noqa: BLE001 - must never break CUDA's initialisation
        warnings.warn(f"auditkit could not check its CUDA kernels against this GPU: {error}", RuntimeWarning)


if not STATUS.loaded:
    _extension.warn_if_fallback(STATUS)
elif STATUS.cuda_kernels:
    torch.cuda._lazy_call(_check_cuda_devices_safely)  # now if CUDA is initialised, else at its initialisation


def refuse(message: str):
    """An autograd formula that raises ``message`` (ops that are not differentiable, or not twice)."""

    def backward(ctx, *grads):
        raise RuntimeError(message)

    return backward


def no_context(ctx, inputs, output):
    return None
