"""Where and in which precision auditkit computes: ``resolve_device`` and ``autocast``.

Every computing command defaults to ``device="auto"`` (a GPU when there is one, else the CPU;
``AUDITKIT_DEVICE=cpu`` in the environment pins it) and
``precision="auto"`` (bfloat16 autocast on GPUs that support it, float32 elsewhere). Under
``torchrun`` each rank uses its own GPU (``cuda:LOCAL_RANK``).

Precision is PyTorch's automatic mixed precision (``torch.autocast``): matrix products and
convolutions run in the low dtype, parameters and reductions stay float32. float16 training uses
a gradient scaler (``grad_scaler``); bfloat16 needs none. LRP's ratio is always computed in
float32 (auditkit/explain/lrp/entry.py): the low dtype reaches the heatmap only through the forward
pass's activations (docs/explain.md gives the measured tolerance).
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import AuditkitError

#: Environment variable that fixes what device "auto" means (e.g. cpu).
DEVICE_VARIABLE = "AUDITKIT_DEVICE"
#: Precision names, as the CLI's --precision takes them.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _local_rank() -> int | None:
    """LOCAL_RANK under torchrun with more than one process, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("LOCAL_RANK", "0"))
    return None


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' (a GPU when there is one, else CPU), 'cpu', 'cuda' or 'cuda:N' as a torch.device.

    Under torchrun, 'auto' and 'cuda' mean this rank's GPU, cuda:LOCAL_RANK.
    Raises AuditkitError for an unknown name or a GPU that is not there.

    A run resolves its device once, at its entry (a command, or the library call the user made),
    and passes the torch.device down; given a torch.device, this only checks that it is there."""
    if isinstance(name, torch.device):
        device = name
    else:
        device = _parse(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AuditkitError(f"device {str(device)!r} was asked for but no CUDA GPU is visible; use 'cpu' or 'auto'")
        rank = _local_rank()
        if device.index is None and rank is not None:
            device = torch.device("cuda", rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AuditkitError(
                f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible"
            )
    elif device.type != "cpu":
        raise AuditkitError(f"device {str(device)!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def _parse(name: str) -> torch.device:
    name = name.strip().lower()
    if name == "auto":
        # AUDITKIT_DEVICE pins what 'auto' means (the test suite pins it to cpu, so that its
        # numbers do not depend on the machine); unset, a GPU when there is one.
        name = os.environ.get(DEVICE_VARIABLE, "auto").strip().lower() or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise AuditkitError(f"device: {error} (use auto, cpu, cuda or cuda:N)") from error


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (or buffers); the CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def device_for(model: torch.nn.Module, asked: str | torch.device, work: str) -> torch.device:
    """Where ``work`` (e.g. "the audit") on ``model`` runs: the model's device for "auto", else
    ``asked``, which must be the model's (library calls never move the user's model). Raises
    AuditkitError naming both devices otherwise."""
    here = model_device(model)
    device = here if asked == "auto" else resolve_device(asked)
    if device != here:
        raise AuditkitError(f"the model is on {here} but {work} was asked to run on {device}; "
                            "move the model there first")
    return device


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """'auto' -> 'bf16' on a CUDA GPU that supports it, else 'fp32'; other names checked.

    Raises AuditkitError for an unknown name or fp16/bf16 where the device cannot run it."""
    precision = precision.strip().lower()
    if precision not in PRECISIONS:
        raise AuditkitError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise AuditkitError(f"precision bf16: {device} does not support bfloat16; use fp16 or fp32")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32 (no autocast)."""
    return None if precision == "fp32" else _DTYPES[precision]


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a resolved precision on ``device`` (a no-op for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device: str | torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16 training (bf16 and fp32 need none: a disabled scaler, a no-op)."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")


def describe(device: torch.device, precision: str) -> str:
    """'cuda:0 (NVIDIA H200), bf16' for summaries."""
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    return f"{where}, {precision}"
