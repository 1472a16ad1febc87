"""Capturing the outputs of named layers during a forward pass: the one mechanism TAP's penalty,
Grad-CAM and the audit's activation share read layers through.

TAP (TAP paper, Eq. 8) penalises the activations of chosen layers and backpropagates through them,
Grad-CAM needs the activation of one layer, and the audit measures where a layer's activation lies;
all three read them through :func:`run_capturing` / :func:`capture_activations`.

A layer is a module name, optionally with the call it means: a module the forward pass calls
several times (a block applied in a loop, a shared ReLU, weight-tied layers) gives one output per
call, so ``"block#2"`` names its second call (counted from 1, in the order the calls finish). A bare
name stands for a module's only call: when it runs more than once the capture refuses in one line
naming the module, how often it ran and the names of its calls, instead of returning one of them.

A transformer's layer is handed over as an (N, C, h, w) map (:mod:`auditkit.models.tokens`): token
sequences (N, T, C) without their prefix tokens on the patch grid, channels-last (N, H, W, C) maps
permuted; views only, so gradients flow. A CNN's outputs are the layers' own tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .layer_names import CALL_MARK, _is_compiled, call_name, resolve_layers, split_call  # noqa: F401 (re-exported)  # not .zoo: zoo imports presets, which imports this file
from .tokens import MapViews



class ModifiedInPlace(ModelError):
    """A captured layer's output was changed in place later in the same forward pass."""

    def __init__(self, name: str, slot: int) -> None:
        self.name, self.slot = name, slot
        super().__init__(
            f"the output of layer '{name}' is modified in place later in the forward pass (e.g. by a "
            "ReLU(inplace=True)), so it cannot be captured as the layer gave it; capture the module that "
            "modifies it, or make that operation out of place"
        )


def _aliases(model: nn.Module) -> dict[str, str]:
    """{second name of a shared module: its first name}: a module registered under two names (weight
    tying) is listed once by named_modules(), under the first."""
    first = {id(module): name for name, module in model.named_modules()}
    return {name: first[id(module)] for name, module in model.named_modules(remove_duplicate=False)
            if name and first[id(module)] != name}


def resolve_layer_calls(model: nn.Module, names: str | Sequence[str]) -> list[str]:
    """Full layer names for ``names`` (exported as ``auditkit.models.resolve_layers``): module names
    resolved by :func:`.layer_names.resolve_layers` ("net." optional, "_orig_mod." anywhere, unknown
    names answered with the closest), a second name of a shared module as its first, and a call
    ("#2") kept. A layer given twice raises ModelError (a bare name and its "#1" are the same layer
    when the module runs once)."""
    if isinstance(names, str):
        names = [names]
    aliases = _aliases(model)
    resolved: list[str] = []
    seen: set[tuple[str, int]] = set()
    for name in names:
        name = str(name).strip()
        module, call = split_call(name)
        for candidate in (module, f"net.{module}"):
            if candidate in aliases:
                module = aliases[candidate]
                break
        full = resolve_layers(model, [module])[0]
        if (full, call or 1) in seen:
            raise ModelError(f"layer '{call_name(full, call)}' is listed twice")
        seen.add((full, call or 1))
        resolved.append(call_name(full, call))
    return resolved


def calls_problem(layer: str, ran: int, earlier: int | None = None) -> str | None:
    """Why ``layer`` (a name from :func:`resolve_layer_calls`) has no single output in a forward pass
    that ran its module ``ran`` times (``earlier``: the count of an earlier forward), or None."""
    module, call = split_call(layer)
    if ran == 0:
        return f"layer '{module}' did not run during the forward pass; choose a layer the model uses"
    calls = f"'{call_name(module, 1)}' (the first) to '{call_name(module, ran)}' (the last)"
    if call is None and ran > 1:
        return (f"layer '{module}' ran {ran} times in one forward pass, so its output is ambiguous; "
                f"name one call: {calls}")
    if call is not None and call > ran:
        return (f"layer '{layer}' names call {call}, but '{module}' ran {ran} time(s) in the forward pass; "
                f"name one of {calls}")
    if earlier is not None and earlier != ran:
        return (f"layer '{module}' ran {ran} times in this forward pass but {earlier} in an earlier one, so "
                f"'{layer}' does not name the same call in each; capture a module that runs a fixed number of times")
    return None


@contextmanager
def capture_activations(
    model: nn.Module, layer_names: str | Sequence[str], *, copy: Sequence[int] = (),
    calls: dict[str, int] | None = None, rebuild: bool = True,
) -> Iterator[list[Any]]:
    """Yields a list that holds, after each forward pass of ``model``, the outputs of ``layer_names`` in that order.

    The list is reset at the start of every forward of ``model`` itself, so a
    training loop can keep one list across batches. The entries are the
    modules' output tensors, still attached to the autograd graph (nothing is
    detached), so a penalty on them backpropagates into the model.

    A name is a module's only call or, with "#k", its k-th call (module
    docstring). At the end of each forward a bare name whose module ran more
    than once, a call beyond the ones that ran, and a module that ran a
    different number of times than in an earlier forward (of this block, or
    recorded in ``calls``, {module: times}, which a caller keeps across
    blocks) raise ModelError in one line naming the module and its calls.

    A transformer's layer gives its (N, C, gh, gw) map instead (:class:`.tokens.MapViews`: token
    sequences without prefix tokens on the grid of the current input, channels-last maps permuted;
    views of the output, so gradients flow; a sequence that is no grid raises ModelError in one
    line naming the layer). ``rebuild=False``: the network goes on from the layer's own output,
    not from the map (no copy; the logits then do not depend on the map, so only a penalty on it,
    as TAP's, may be differentiated). Otherwise an entry is exactly what its layer returned: if the
    network later modifies that output in place (a ReLU(inplace=True) right after the captured
    module), the forward raises :class:`ModifiedInPlace` naming the layer,
    instead of handing over the modified values. Slots listed in ``copy`` are
    captured from a copy the network continues with (one extra tensor), which
    the in-place operation then modifies instead; Grad-CAM retries that way.

    Names are resolved with :func:`resolve_layer_calls` (unknown names raise
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
    names = resolve_layer_calls(model, layer_names)
    wanted: dict[str, list[tuple[int | None, int]]] = {}  # module -> [(call, slot)]
    for slot, name in enumerate(names):
        module, call = split_call(name)
        wanted.setdefault(module, []).append((call, slot))
    views = MapViews(model, names)
    outputs: list[Any] = []
    originals: list[Any] = []  # the layers' own outputs: the in-place check reads them, not the views
    versions: list[int | None] = []
    ran: dict[str, int] = {}
    earlier = calls if calls is not None else {}
    copied = set(copy)

    def reset(_module: nn.Module, _args: Any) -> None:
        outputs[:] = [None] * len(names)
        originals[:] = [None] * len(names)
        versions[:] = [None] * len(names)
        ran.clear()

    def store(module_name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if len(outputs) != len(names):  # a submodule run on its own, outside model.forward
                reset(model, ())
            ran[module_name] = count = ran.get(module_name, 0) + 1
            copy_output, continued = False, None
            for call, slot in wanted[module_name]:
                # A bare name keeps the latest call; the end of the forward refuses it if there were several.
                if call is None or call == count:
                    outputs[slot] = output
                    if views.active:  # a transformer's layer: its map, the network going on from it (tokens.py)
                        outputs[slot], continued = views.view(slot, output, rebuild)
                    originals[slot] = output
                    versions[slot] = output._version if isinstance(output, torch.Tensor) else None
                    copy_output = copy_output or slot in copied
            if copy_output and isinstance(output, torch.Tensor):
                return (output if continued is None else continued).clone()  # the network goes on with the copy
            return continued

        return hook

    def check_all_ran(_module: nn.Module, _args: Any, _output: Any) -> None:
        for module_name, slots in wanted.items():
            times = ran.get(module_name, 0)
            for call, _slot in slots:
                problem = calls_problem(call_name(module_name, call), times, earlier.get(module_name))
                if problem:
                    raise ModelError(problem)
            earlier[module_name] = times
        for slot, (output, version) in enumerate(zip(originals, versions)):
            if version is not None and output._version != version:
                raise ModifiedInPlace(names[slot], slot)

    handles = [model.register_forward_pre_hook(reset)]
    try:
        for module_name in wanted:
            handles.append(model.get_submodule(module_name).register_forward_hook(store(module_name)))
        handles.append(model.register_forward_hook(check_all_ran))
        handles += views.attach()
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def run_capturing(model: nn.Module, layer_names: str | Sequence[str], forward, copy: Sequence[int] = (),
                  calls: dict[str, int] | None = None, rebuild: bool = True):
    """``(forward(), [the layers' outputs], copy)``: runs ``forward`` (a forward pass of ``model``)
    capturing each named layer's output exactly as the layer gave it. When the network modifies one
    in place later, the pass is run again with that output captured from a copy (the slots are
    returned, so a training loop passes them in from then on and never runs a pass twice again).
    ``calls``: a dict a training loop keeps across steps, so a module that runs a different number of
    times in a later step is refused (see :func:`capture_activations`, also for ``rebuild``)."""
    copy = tuple(copy)
    while True:
        try:
            with capture_activations(model, layer_names, copy=copy, calls=calls, rebuild=rebuild) as outputs:
                result = forward()
            return result, list(outputs), copy
        except ModifiedInPlace as modified:
            if modified.slot in copy:  # pragma: no cover - a copy is never modified by the network
                raise
            copy = tuple(sorted({*copy, modified.slot}))
