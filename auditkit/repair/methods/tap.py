"""TAP, the Targeted Activation Penalty (TAP paper, AAAI 2024, Eq. 7-8): the mean over targeted layers
of the batch-mean penalty on positive activations inside the downscaled mask, through the fused
kernels. First-order only: a TAP step costs about a plain step."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ParameterError
from ...ops import tap_loss
from ...training import Objective
from .base import MethodSpec


@dataclass
class TapObjective(Objective):
    layers: tuple[str, ...] = ()
    kernel_size: int = 3
    name = "tap"

    def loss(self, model, batch, logits, activations):
        masks = model.masks_for_network(batch.masks) if hasattr(model, "masks_for_network") else batch.masks
        return tap_loss(activations, masks, self.kernel_size, defer_gradient=True)


@dataclass(frozen=True)
class TapOptions:
    layers: tuple[str, ...] | None = None  # targeted layers (default: the model's preset)
    kernel_size: int = 3  # the max pool of the mask downscaling, Eq. 7

    def validate(self) -> None:
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1:
            raise ParameterError("kernel_size", f"must be an integer >= 1; got {self.kernel_size!r}")


def build(model, options: TapOptions, teacher) -> TapObjective:
    layers = options.layers if options.layers is not None else tuple(model.meta.target_layers)
    if not layers:
        raise ParameterError("layers", "is empty and the model has no preset: name the layers TAP should target")
    return TapObjective(layers=tuple(layers), kernel_size=options.kernel_size)


SPEC = MethodSpec(
    name="tap",
    summary="penalise positive activations inside the masked region at the targeted layers (TAP Eq. 7-8)",
    masks="spurious",
    teacher="annotates",
    default_lambda=0.1,
    # Teacher masks cover far more of the image than an artefact's ground truth (17-73 % against 2 % on
    # decoy MNIST), so the same lambda penalises far more activation, much of it on the object. The TAP
    # paper lowers TAP's lambda 10-100x for teacher annotations (App. C, Tables 2-3; MNIST 1e-3 -> 1e-4).
    teacher_mask_lambda=0.01,
    # TAP App. C searches 1e-9 .. 1; the top decades are where its chosen values lie for small networks.
    sweep=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    training={"epochs": 3, "grad_clip": 0.0, "schedule": "constant"},
    options=TapOptions,
    build=build,
    doc="docs/methods/tap.md",
)
