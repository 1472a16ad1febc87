"""Capturing the outputs of named layers during a forward pass.

TAP (TAP paper, Eq. 8) penalises the activations of chosen layers and
backpropagates through them, and Grad-CAM needs the activation of one layer;
both read them through :func:`capture_activations`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..errors import ModelError
from .zoo import resolve_layers


@contextmanager
def capture_activations(model: nn.Module, layer_names: str | Sequence[str]) -> Iterator[list[Any]]:
    """Yields a list that holds, after each forward pass of ``model``, the outputs of ``layer_names`` in that order.

    The list is reset at the start of every forward of ``model`` itself, so a
    training loop can keep one list across batches. The entries are the
    modules' output tensors, still attached to the autograd graph (nothing is
    detached or copied), so a penalty on them backpropagates into the model.
    If the network later modifies an output in place (a ReLU(inplace=True)
    right after the captured module), the entry shows the modified values.

    Names are resolved with :func:`resolve_layers` (unknown names raise
    ModelError; "net." may be omitted on an AuditModel). A named layer that
    does not run during a forward raises ModelError at the end of that
    forward. The hooks are removed when the block exits, also on exceptions.
    """
    names = resolve_layers(model, layer_names)
    outputs: list[Any] = []

    def reset(_module: nn.Module, _args: Any) -> None:
        outputs[:] = [None] * len(names)

    def store(slot: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if len(outputs) != len(names):  # a submodule run on its own, outside model.forward
                reset(model, ())
            outputs[slot] = output

        return hook

    def check_all_ran(_module: nn.Module, _args: Any, _output: Any) -> None:
        missing = [name for name, output in zip(names, outputs) if output is None]
        if missing:
            raise ModelError(f"layer '{missing[0]}' did not run during the forward pass; choose a layer the model uses")

    handles = [model.register_forward_pre_hook(reset)]
    try:
        for slot, name in enumerate(names):
            handles.append(model.get_submodule(name).register_forward_hook(store(slot)))
        handles.append(model.register_forward_hook(check_all_ran))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
