"""The one input check of every attribution method (and so of the CLI), and the guard that leaves the
user's model as it was.

Every method checks the same things, the same way, before it computes anything: the images are a
floating (N, C, H, W) tensor on the model's device with the model's channel count and dtype; the
model's output is one (N, classes) tensor of logits, found in a dict, tuple, namedtuple or dataclass
by auditkit.models.outputs' stated rule (or ``output`` picks it: a key, an index or a function);
every target is a class index in [0, classes). A failure is one ParameterError naming the
argument and the expected value, so no method returns a map for an input another refuses.

``untouched(model)``: the model is explained in eval mode (batch norm with its running statistics,
no dropout) whatever mode it is in, and every module's mode is restored afterwards. Methods never
write ``.grad`` (they use ``torch.autograd.grad``), add no hook that outlives the call and change no
parameter, buffer or ``requires_grad`` flag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import ParameterError

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _survey(model: nn.Module) -> tuple[int | None, torch.Tensor | None, bool]:
    """(the channel count the model takes, its first floating parameter or buffer, whether any module
    is in training mode), from one walk over the modules: the checks and the eval-mode guard run on
    every call, and at one small image two walks were a tenth of LRP's own overhead."""
    meta = getattr(model, "meta", None)
    channels = int(meta.in_channels) if meta is not None and getattr(meta, "in_channels", None) else None
    reference, training = None, False
    for module in _walk(model):
        training = training or module.training
        if channels is None and isinstance(module, nn.Conv2d):
            channels = int(module.in_channels)
        if reference is None:
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if tensor is not None and tensor.is_floating_point():
                    reference = tensor
                    break
    return channels, reference, training


def _walk(model: nn.Module):
    """The model's modules, depth first in registration order, through the module dicts (checks
    run on every call: named_modules costs more)."""
    stack, seen = [model], set()
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        yield module
        children = module._modules
        if children:
            stack.extend(reversed(children.values()))


def check_images(model: nn.Module, x: Any, survey: tuple | None = None) -> None:
    """Images for ``model``: a floating (N, C, H, W) tensor with the model's channels, device and dtype.
    ``survey``: the model's ``_survey`` when the caller has it already."""
    if not isinstance(x, torch.Tensor):
        raise ParameterError("images", f"must be a torch.Tensor of shape (N, C, H, W); got {type(x).__name__}")
    if x.dim() != 4:
        raise ParameterError("images", f"must have shape (N, C, H, W); got {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ParameterError("images", f"must be floating (values in [0, 1] for an auditkit model); got {x.dtype}")
    channels, reference, _training = survey if survey is not None else _survey(model)
    if channels is not None and x.shape[1] != channels:
        raise ParameterError("images", f"must have {channels} channel(s) for this model; got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ParameterError("images", f"must be at least 1x1 pixels; got {x.shape[2]}x{x.shape[3]}")
    if reference is not None:
        if reference.device != x.device:
            raise ParameterError("images", f"are on {x.device} but the model is on {reference.device}; "
                                 "move one of them")
        if reference.dtype == torch.float64 and x.dtype != torch.float64 or \
                reference.dtype != torch.float64 and x.dtype == torch.float64:
            raise ParameterError("images", f"have dtype {x.dtype} but the model's parameters are {reference.dtype}; "
                                 "convert one of them (autocast handles float16/bfloat16)")


def logits_from(output: Any, select: str | int | Callable | None = None) -> torch.Tensor:
    """The logits in a model's output: auditkit.models.outputs.select_logits (a tensor as it is, a dict,
    tuple, namedtuple or dataclass by its stated rule, or what ``select`` picks: a key, an index or a
    function). Raises ParameterError on ``output`` when there is no single logits tensor."""
    from ..models.outputs import select_logits

    return select_logits(output, select)


def check_logits(logits: torch.Tensor, n: int) -> int:
    """(N, classes) logits; returns the number of classes."""
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ParameterError("output", f"must be logits of shape ({n}, classes); the model gives {tuple(logits.shape)}")
    return int(logits.shape[1])


def check_targets(targets: torch.Tensor, n: int, classes: int) -> None:
    """Targets (N, K), class indices in [0, classes)."""
    if targets.dim() != 2 or targets.shape[0] != n:
        raise ParameterError("target", f"must give one or K classes per sample (shape ({n},) or ({n}, K)); "
                             f"got {tuple(targets.shape)}")
    if not targets.numel():
        return
    low, high = torch.aminmax(targets)
    low, high = int(low), int(high)
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise ParameterError("target", f"must be class indices in [0, {classes}) for this {classes}-class model; "
                             f"got {bad}")


class SelectLogits(nn.Module):
    """``model`` whose forward returns the logits ``select`` picks from its output. Traced by LRP
    like the model itself (picking from a tuple or dict is no graph node)."""

    def __init__(self, model: nn.Module, select: str | int | Callable) -> None:
        super().__init__()
        self.model = model
        self.select = select

    def forward(self, x):
        from ..models.outputs import select_logits

        return select_logits(self.model(x), self.select)


@contextmanager
def untouched(model: nn.Module, training: bool | None = None) -> Iterator[nn.Module]:
    """The model in eval mode for the block; every module's own mode restored afterwards.
    ``training``: whether any module is in training mode, when the caller knows it (``_survey``)."""
    if training is None:
        training = any(module.training for module in _walk(model))
    if not training:  # already in eval mode: nothing to set or restore
        yield model
        return
    modes = [(module, module.training) for module in _walk(model)]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def explained(model: nn.Module, x: Any) -> Iterator[nn.Module]:
    """``check_images(model, x)``, then the model in eval mode for the block (``untouched``), from one
    walk over the modules."""
    survey = _survey(model)
    check_images(model, x, survey)
    with untouched(model, survey[2]):
        yield model


def as_targets(targets: Any, x: torch.Tensor) -> torch.Tensor:
    """Class indices as an (N, K) long tensor on x's device: one index for all, N indices, or (N, K)."""
    n = x.shape[0]
    try:
        targets = torch.as_tensor(targets, device=x.device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ParameterError("target", f"must be class indices; got {type(targets).__name__} ({error})") from error
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise ParameterError("target", f"must be integer class indices; got dtype {targets.dtype}")
    targets = targets.long()
    if targets.dim() == 0:
        targets = targets.expand(n)
    if targets.dim() == 1:
        targets = targets.unsqueeze(1)
    if targets.dim() != 2 or targets.shape[0] != n:
        raise ParameterError("target", f"must give one or K classes per sample (shape ({n},) or ({n}, K)); "
                             f"got {tuple(targets.shape)}")
    return targets


def explanation_method(method: Callable) -> Callable:
    """Wraps an attribution method ``(model, x, targets, *, create_graph, **options)``: the shared input
    checks, ``output`` (which part of the model's output is the logits), and eval mode for the call.
    The method itself checks the logits and the targets' range after its forward pass
    (``check_logits``, ``check_targets``)."""
    import functools

    @functools.wraps(method)
    def wrapper(model: nn.Module, x: torch.Tensor, targets: Any, *, output: str | int | Callable | None = None,
                **options: Any) -> torch.Tensor:
        from ..models.zoo import unwrap_compiled

        model = unwrap_compiled(model)  # hooks added after torch.compile never run in its compiled code
        with explained(model, x):
            targets = as_targets(targets, x)
            net = model if output is None else SelectLogits(model, output)
            return method(net, x, targets, **options)

    return wrapper
