"""What is installed and which kernels are live: the data behind `auditkit doctor`."""

from __future__ import annotations

import platform
from typing import Any

import torch

from . import __version__


def _torchvision_version() -> str | None:
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision.__version__


def self_test(device: str = "cpu") -> dict[str, Any]:
    """Runs tap_penalty forward and backward on a small seeded batch against the reference."""
    from .ops import tap_penalty
    from .ops._reference import tap_penalty_reference

    generator = torch.Generator().manual_seed(0)
    activation = torch.randn(4, 8, 14, 14, generator=generator).to(device).requires_grad_(True)
    mask = (torch.rand(4, 1, 28, 28, generator=generator) > 0.8).float().to(device)
    penalty = tap_penalty(activation, mask)
    (grad,) = torch.autograd.grad(penalty.sum(), activation)
    exact = activation.detach().double().requires_grad_(True)
    expected = tap_penalty_reference(exact, mask.double())
    (expected_grad,) = torch.autograd.grad(expected.sum(), exact)
    forward_error = ((penalty.double() - expected).abs() / expected.abs().clamp_min(1e-12)).max().item()
    backward_error = (grad.double() - expected_grad).abs().max().item()
    ok = forward_error < 1e-5 and backward_error < 1e-6
    return {"device": device, "ok": ok, "forward_rel_error": forward_error, "backward_abs_error": backward_error}


def collect(run_self_test: bool = True) -> dict[str, Any]:
    """Versions, devices and kernel status as a JSON-ready dict."""
    from .ops import extension_status

    gpu_available = torch.cuda.is_available()
    if gpu_available:
        torch.cuda.init()  # runs auditkit's check of its CUDA kernels against these GPUs
    status = extension_status()
    report: dict[str, Any] = {
        "auditkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchvision": _torchvision_version(),
        "cpu_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu_available else [],
        "gpu_capabilities": [".".join(map(str, torch.cuda.get_device_capability(i)))
                             for i in range(torch.cuda.device_count())] if gpu_available else [],
        "extension": {
            "loaded": status.loaded,
            "path": status.path,
            "reason": status.reason,
            "build_info": status.build_info,
        },
        "kernels": {
            "cpu": {
                "backend": status.cpu_backend,
                "why": status.build_info.get("cpu_simd", "") if status.loaded else status.reason,
            },
            "cuda": {
                "backend": status.cuda_backend,
                "why": status.cuda_reason,
                "runnable": gpu_available,
            },
        },
    }
    if run_self_test:
        tests = [self_test("cpu")]
        if gpu_available:
            tests.append(self_test("cuda"))
        report["self_test"] = tests
    return report


def summary_line() -> str:
    """One line for `auditkit --version`."""
    from .ops import extension_status

    status = extension_status()
    cuda = status.cuda_backend if torch.version.cuda else "n/a"
    return (
        f"auditkit {__version__} (torch {torch.__version__}, torchvision {_torchvision_version()}; "
        f"kernels: CPU {status.cpu_backend}, CUDA {cuda})"
    )
