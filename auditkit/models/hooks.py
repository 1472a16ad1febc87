"""Capturing the outputs of named layers during a forward pass.

TAP (TAP paper, Eq. 8) penalises the activations of chosen layers and
backpropagates through them, and Grad-CAM needs the activation of one layer;
both read them through :func:`capture_activations`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .zoo import _is_compiled, resolve_layers


class ModifiedInPlace(ModelError):
    """A captured layer's output was changed in place later in the same forward pass."""

    def __init__(self, name: str, slot: int) -> None:
        self.name, self.slot = name, slot
        super().__init__(
            f"the output of layer '{name}' is modified in place later in the forward pass (e.g. by a "
            "ReLU(inplace=True)), so it cannot be captured as the layer gave it; capture the module that "
            "modifies it, or make that operation out of place"
        )


@contextmanager
def capture_activations(
    model: nn.Module, layer_names: str | Sequence[str], *, copy: Sequence[int] = ()
) -> Iterator[list[Any]]:
    """Yields a list that holds, after each forward pass of ``model``, the outputs of ``layer_names`` in that order.

    The list is reset at the start of every forward of ``model`` itself, so a
    training loop can keep one list across batches. The entries are the
    modules' output tensors, still attached to the autograd graph (nothing is
    detached), so a penalty on them backpropagates into the model.

    An entry is exactly what its layer returned: if the network later modifies
    that output in place (a ReLU(inplace=True) right after the captured
    module), the forward raises :class:`ModifiedInPlace` naming the layer,
    instead of handing over the modified values. Slots listed in ``copy`` are
    captured from a copy the network continues with (one extra tensor), which
    the in-place operation then modifies instead; Grad-CAM retries that way.

    Names are resolved with :func:`resolve_layers` (unknown names raise
    ModelError; "net." may be omitted on an AuditModel, torch.compile's
    "_orig_mod." anywhere). A torch.compile'd ``model`` raises ModelError: its
    compiled code never calls hooks added later; pass its original module
    (AuditModel unwraps compiled networks itself). A named layer that
    does not run during a forward raises ModelError at the end of that
    forward. The hooks are removed when the block exits, also on exceptions.
    """
    if _is_compiled(model):  # its compiled code would never call the hooks: "did not run" would mislead
        raise ModelError(f"{type(model).__name__} is torch.compile'd: hooks added after compiling do not run in its "
                         "compiled code; capture from its original module (auditkit.models.zoo.unwrap_compiled(model), "
                         "the same weights; layer names may keep or drop '_orig_mod.')")
    names = resolve_layers(model, layer_names)
    outputs: list[Any] = []
    versions: list[int | None] = []
    copied = set(copy)

    def reset(_module: nn.Module, _args: Any) -> None:
        outputs[:] = [None] * len(names)
        versions[:] = [None] * len(names)

    def store(slot: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if len(outputs) != len(names):  # a submodule run on its own, outside model.forward
                reset(model, ())
            outputs[slot] = output
            if isinstance(output, torch.Tensor):
                versions[slot] = output._version
                if slot in copied:
                    return output.clone()  # the network goes on with the copy
            return None

        return hook

    def check_all_ran(_module: nn.Module, _args: Any, _output: Any) -> None:
        missing = [name for name, output in zip(names, outputs) if output is None]
        if missing:
            raise ModelError(f"layer '{missing[0]}' did not run during the forward pass; choose a layer the model uses")
        for slot, (output, version) in enumerate(zip(outputs, versions)):
            if version is not None and output._version != version:
                raise ModifiedInPlace(names[slot], slot)

    handles = [model.register_forward_pre_hook(reset)]
    try:
        for slot, name in enumerate(names):
            handles.append(model.get_submodule(name).register_forward_hook(store(slot)))
        handles.append(model.register_forward_hook(check_all_ran))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def run_capturing(model: nn.Module, layer_names: str | Sequence[str], forward, copy: Sequence[int] = ()):
    """``(forward(), [the layers' outputs], copy)``: runs ``forward`` (a forward pass of ``model``)
    capturing each named layer's output exactly as the layer gave it. When the network modifies one
    in place later, the pass is run again with that output captured from a copy (the slots are
    returned, so a training loop passes them in from then on and never runs a pass twice again)."""
    copy = tuple(copy)
    while True:
        try:
            with capture_activations(model, layer_names, copy=copy) as outputs:
                result = forward()
            return result, list(outputs), copy
        except ModifiedInPlace as modified:
            if modified.slot in copy:  # pragma: no cover - a copy is never modified by the network
                raise
            copy = tuple(sorted({*copy, modified.slot}))
