"""Which part of a model's output is the logits: the one adapter every command and explanation uses.

A classifier's forward may return its (N, classes) logits as one tensor, or inside a container: a
dict or a Hugging Face ``ModelOutput`` (``{"logits": ...}``), a tuple such as torchvision
Inception's ``(logits, aux)`` or a training script's ``(logits, features)``, a namedtuple or a
dataclass. :func:`select_logits` finds the logits in any of them, by the caller's ``spec`` or by
the stated rule below, and says in one line when it cannot:

``spec`` None (the rule):

* a tensor is the logits as it is;
* a mapping, dataclass or namedtuple (fields with names): the one field that holds a tensor; else
  the one field named like logits (:data:`LOGIT_NAMES`); else, when the class count is known, the
  one tensor of shape (N, classes); else :class:`OutputError` naming the fields;
* a tuple or list (a namedtuple whose names decide nothing too): the first element that is a
  tensor, the convention of torchvision's Inception/GoogLeNet, Hugging Face's
  ``return_dict=False`` and most training code (logits first, auxiliary outputs after). When the
  class count is known, the first tensor of shape (N, classes), so a ``(features, logits)`` pair
  gives its logits; no such tensor is an :class:`OutputError` naming the shapes.

A field or element that is itself a container is resolved by the same rule (a tuple holding a dict).

``spec`` given: a key or field name (str), an index (int) or a function of the output; what it picks
is resolved by the rule when it is still a container. Under torch.fx tracing the tensors are
proxies, whose shapes are unknown: shapes then decide nothing and the names and order do.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch

from ..errors import ModelError, ParameterError

#: What a spec may be: None (the rule), a key or field name, a sequence index or a function.
OutputSpec = Union[str, int, Callable[[Any], Any], None]

#: Field names that mean "the logits" (the rule for dicts, dataclasses and namedtuples), as
#: Hugging Face, torchvision, timm heads and common training code name them.
LOGIT_NAMES = ("logits", "logit", "cls_logits", "class_logits", "output", "out", "outputs", "scores", "y_hat",
               "pred", "preds", "prediction", "predictions")


class OutputError(ParameterError, ModelError):
    """A model output in which the logits cannot be found (or ``output`` picks nothing). Names the
    ``output`` parameter, which the command line shows as ``--output``."""

    def __init__(self, problem: str) -> None:
        super().__init__("output", problem)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, torch.fx.Proxy))


def _fields(output: Any) -> dict[str, Any] | None:
    """{name: value} of a mapping, a namedtuple or a dataclass instance; None for anything else."""
    if isinstance(output, Mapping):
        return {str(key): value for key, value in output.items()}
    if isinstance(output, tuple) and hasattr(type(output), "_fields"):
        return dict(zip(type(output)._fields, output))
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return {field.name: getattr(output, field.name) for field in dataclasses.fields(output)}
    return None


def _kind(output: Any) -> str:
    if isinstance(output, Mapping):
        return "dict" if type(output) is dict else f"{type(output).__name__} (a mapping)"
    if isinstance(output, tuple) and hasattr(type(output), "_fields"):
        return f"{type(output).__name__} (a namedtuple)"
    if dataclasses.is_dataclass(output):
        return f"{type(output).__name__} (a dataclass)"
    return type(output).__name__


def _shape(value: Any) -> tuple[int, ...] | None:
    """A real tensor's shape; None for proxies (tracing) and anything else."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _fits(value: Any, num_classes: int | None) -> bool:
    shape = _shape(value)
    return num_classes is not None and shape is not None and len(shape) == 2 and shape[1] == num_classes


def _describe(items: list[tuple[str, Any]]) -> str:
    shown = []
    for name, value in items[:8]:
        shape = _shape(value)
        shown.append(f"{name} {list(shape)}" if shape is not None else f"{name} ({type(value).__name__})")
    return ", ".join(shown) + (", ..." if len(items) > 8 else "")


def _by_rule(output: Any, num_classes: int | None, depth: int = 0) -> Any:
    """The logits in ``output`` by the module docstring's rule (a tensor or proxy), or OutputError."""
    if _is_tensor(output):
        return output
    if depth > 4:  # containers of containers of ...: nothing a classifier returns
        raise OutputError(f"must pick the logits: the model's output is nested more than {depth} containers deep")
    named = _fields(output)
    if named is not None:
        candidates = [(name, value) for name, value in named.items() if _is_tensor(value) or _fields(value) is not None
                      or isinstance(value, (tuple, list))]
        tensors = [(name, value) for name, value in candidates if _is_tensor(value)]
        named_like = [(name, value) for name, value in candidates if name.lower() in LOGIT_NAMES]
        fitting = [(name, value) for name, value in tensors if _fits(value, num_classes)]
        for choice in (candidates if len(candidates) == 1 else [], named_like if len(named_like) == 1 else [],
                       fitting if len(fitting) == 1 else []):
            if choice:
                return _by_rule(choice[0][1], num_classes, depth + 1)
        if not (isinstance(output, tuple) and tensors):  # a namedtuple falls through to the tuple rule
            wanted = f" (N, {num_classes})" if num_classes is not None else ""
            example = next((name for name, _ in tensors or candidates), "NAME")
            raise OutputError(f"must name the logits: the model returns a {_kind(output)} with "
                              f"{_describe(candidates) or 'no tensor'}, and none is clearly the{wanted} logits "
                              f"(looked for one tensor, or one named {', '.join(LOGIT_NAMES[:3])}, ...); "
                              f"set it to the field's name, e.g. '{example}'")
    if isinstance(output, (tuple, list)):
        items = [(f"[{k}]", value) for k, value in enumerate(output)]
        tensors = [(name, value) for name, value in items if _is_tensor(value)]
        if num_classes is not None and any(_shape(value) is not None for _, value in tensors):
            fitting = [(name, value) for name, value in tensors if _fits(value, num_classes)]
            if fitting:
                return fitting[0][1]
            raise OutputError(f"must pick the logits: the model returns a {_kind(output)} of {_describe(items)} and "
                              f"none is (N, {num_classes}) logits; set it to the index of the logits")
        if tensors:
            return tensors[0][1]
        containers = [value for _, value in items if _fields(value) is not None or isinstance(value, (tuple, list))]
        if containers:
            return _by_rule(containers[0], num_classes, depth + 1)
        raise OutputError(f"must pick the logits: the model returns a {_kind(output)} without a tensor "
                          f"({_describe(items) or 'empty'})")
    raise OutputError(f"must pick the logits: the model returns a {_kind(output)}, not a tensor or a container of "
                      "tensors; give a function that returns the logits")


def _apply(output: Any, spec: str | int | Callable) -> Any:
    """What ``spec`` picks from ``output``."""
    if callable(spec):
        return spec(output)
    if isinstance(output, torch.Tensor):
        # Indexing a tensor would pick a sample of the batch, not an output: a name or an index only
        # applies to a model that returns a container.
        raise OutputError(f"= {spec!r} picks from a container, but the model returns one tensor of shape "
                          f"{tuple(output.shape)}; leave it unset")
    named = _fields(output)
    try:
        if isinstance(spec, str) and named is not None and not isinstance(output, Mapping):
            return named[spec]  # a dataclass's or namedtuple's field
        return output[spec]
    except (KeyError, IndexError, TypeError) as error:
        fields = f" (fields: {', '.join(list(named)[:8])})" if named is not None else \
            f" ({len(output)} elements)" if isinstance(output, (tuple, list)) else ""
        raise OutputError(f"= {spec!r} does not pick anything from the model's {_kind(output)} output{fields}"
                          f" ({type(error).__name__})") from error


def select_logits(output: Any, spec: OutputSpec = None, *, num_classes: int | None = None) -> torch.Tensor:
    """The (N, classes) logits in a model's ``output``: ``spec`` applied to it when given, then the
    rule of the module docstring. ``num_classes``: the model's class count when known (it lets shapes
    decide between tensors). Raises :class:`OutputError` (a ParameterError on ``output`` and a
    ModelError) in one line naming what the output holds."""
    if spec is None and type(output) is torch.Tensor:  # the common case, on every forward: no walk
        return output
    if spec is not None:
        output = _apply(output, spec)
    return _by_rule(output, num_classes)


def check_spec(spec: Any) -> str | int | None:
    """A spec that can be stored with a model (in its metadata, JSON): None, a non-empty name or an
    integer index; OutputError otherwise (a function works in the Python API, not in a file)."""
    if spec is None or (isinstance(spec, int) and not isinstance(spec, bool)):
        return spec
    if isinstance(spec, str) and spec.strip():
        return spec.strip()
    raise OutputError(f"must be a field name or an integer index to be stored with a model; got {spec!r}")


def parse_spec(text: str | None) -> str | int | None:
    """A command line's ``--output`` value: an integer ("0", "-1") is an index, anything else a name."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else check_spec(text)


def use_output(model, spec: str | int | None):
    """``model`` (an AuditModel) reading its logits from ``spec`` from now on (``meta.output``, which
    checkpoints keep); None leaves it as it is. ``spec``: a name or index, or command-line text
    (:func:`parse_spec`). OutputError for a spec that cannot be stored."""
    if spec is None:
        return model
    spec = parse_spec(spec) if isinstance(spec, str) else check_spec(spec)
    model.meta = dataclasses.replace(model.meta, output=spec)
    return model


# --------------------------------------------------------------------------- the head's kind

#: What a model's output means (``ModelMeta.head``): ``softmax``, one logit per mutually exclusive class;
#: ``binary``, one logit z whose sigmoid is the probability of class 1 (a BCEWithLogitsLoss head);
#: ``multilabel``, K independent sigmoids, one per finding (``class_names`` are the findings; a finding is
#: predicted present when its probability is above 0.5, z_k > 0; the loss is BCE-with-logits).
SOFTMAX, BINARY, MULTILABEL = "softmax", "binary", "multilabel"
HEADS = (SOFTMAX, BINARY, MULTILABEL)


class HeadError(ParameterError, ModelError):
    """A head kind auditkit cannot use, or one the network's output does not fit. Names the ``head``
    parameter, which the command line shows as ``--head``."""

    def __init__(self, problem: str) -> None:
        super().__init__("head", problem)


def check_head(head: str | None) -> str | None:
    """``head`` as stored (None: read it off the network); HeadError for an unknown kind."""
    if head is None:
        return None
    head = str(head).strip().lower()
    if head not in HEADS:
        raise HeadError(f"must be softmax, binary (one logit) or multilabel (K sigmoids); got {head!r}")
    return head


def binary_view(z: torch.Tensor) -> torch.Tensor:
    """The exact two-class view (N, 2) of a one-logit model's output z (N, 1) or (N,): [-z/2, z/2].

    Its softmax is [1 - σ(z), σ(z)] (the model's own probabilities), its cross-entropy with label y
    equals BCEWithLogits(z, y), its argmax is (z > 0) and its class-1 logit is z/2, its class-0 logit
    -z/2: every consumer of (N, classes) logits (evaluation, audit, explanations, repairs) then sees
    the sigmoid model unchanged, while the network keeps its one output. HeadError when z is not one
    logit per image."""
    if z.dim() == 1:
        z = z.unsqueeze(1)
    if z.dim() != 2 or z.shape[1] != 1:
        raise HeadError(f"is binary (one logit per image) but the network gives outputs of shape {tuple(z.shape)}; "
                        "set it to softmax for a network with one output per class")
    half = z / 2
    return torch.cat([-half, half], dim=1)


def use_head(model, head: str | None):
    """``model`` (an AuditModel) read as a ``head`` model from now on (``meta.head``, which checkpoints
    keep); None leaves it as it is. Binary: the network has one output and the model two classes
    (class 1 when z > 0). Multilabel: the network's K outputs are K independent findings (the model's
    class names). HeadError for a kind the network's output cannot be."""
    head = check_head(head)
    if head is None or head == model.meta.head:
        return model
    if head == SOFTMAX and model.meta.head == BINARY:
        raise HeadError("is softmax but the network has one output logit: a one-logit model is binary (sigmoid); "
                        "leave it unset")
    width = _last_linear_width(model.net)
    if head == MULTILABEL:
        if model.meta.head == BINARY:
            raise HeadError("is multilabel but the network has one output logit (a binary, sigmoid head); use binary "
                            "or leave it unset")
        if width not in (None, model.meta.num_classes) and "class_names" in getattr(model, "adopt_from_data", ()):
            # Bare weights: the file knows no findings, the network's last layer says how many (the data
            # names them when aligned).
            model.meta = dataclasses.replace(model.meta, num_classes=width,
                                             class_names=tuple(str(k) for k in range(width)))
        if width not in (None, model.meta.num_classes):
            raise HeadError(f"is multilabel over {model.meta.num_classes} findings but the network's last layer has "
                            f"{width} outputs")
        model.meta = dataclasses.replace(model.meta, head=head)
        return model
    if head == BINARY and model.meta.num_classes != 2:
        raise HeadError(f"is binary (one logit, two classes) but the model has {model.meta.num_classes} classes; "
                        "leave it unset")
    if head == BINARY and width not in (None, 1):
        raise HeadError(f"is binary (one logit) but the network's last layer has {width} outputs (a softmax head); "
                        "leave it unset")
    model.meta = dataclasses.replace(model.meta, head=head)
    return model


def head_of(model) -> str:
    """The head kind of ``model`` (an AuditModel or anything with ``meta``): softmax when it says nothing."""
    return getattr(getattr(model, "meta", None), "head", SOFTMAX) or SOFTMAX


def is_multilabel(model) -> bool:
    """Whether ``model``'s outputs are K independent sigmoids (a multilabel head)."""
    return head_of(model) == MULTILABEL


def _last_linear_width(net) -> int | None:
    """The output count of ``net``'s last Linear layer (its classifier, in most networks), None without one."""
    from torch import nn

    linears = [module for module in net.modules() if isinstance(module, nn.Linear)]
    return int(linears[-1].out_features) if linears else None


def output_width(net, in_channels: int, size: tuple[int, int]) -> int | None:
    """The number of outputs ``net`` returns per image, from one forward pass on zeros (2, C, H, W) in
    eval mode without gradients; None when the forward fails or returns anything but a (N,) or (N, K)
    tensor (a tuple, a dict: which entry is the logits is the output adapter's question). The layers'
    registration order cannot tell: a one-output Linear registered last may be a side head."""
    training = getattr(net, "training", False)
    try:
        net.eval()
        with torch.no_grad():
            out = net(torch.zeros(2, int(in_channels), *(int(side) for side in size)))
    except Exception:  # the user's network decides what fails; no width is the safe answer
        return None
    finally:
        if training:
            net.train()
    if not isinstance(out, torch.Tensor) or out.dim() not in (1, 2) or out.shape[0] != 2:
        return None
    return 1 if out.dim() == 1 else int(out.shape[1])


def one_logit_network(net, in_channels: int, size: tuple[int, int]) -> bool:
    """Whether ``net`` is a BCEWithLogitsLoss classifier: its last Linear layer has one output AND its
    forward returns one logit per image (a factory that ignores num_classes builds one whatever class
    count it is asked for). Both are checked: a two-class network may register a one-output side
    head (a quality or confidence score) after its classifier."""
    return _last_linear_width(net) == 1 and output_width(net, in_channels, size) == 1
