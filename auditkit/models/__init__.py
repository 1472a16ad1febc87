"""Models auditkit builds, audits and repairs: architectures, activation capture, checkpoints.

    from auditkit.models import build_model, capture_activations, save_checkpoint, load_checkpoint

    model = build_model("resnet18", num_classes=2, in_channels=3, input_size=(64, 64))
    with capture_activations(model, model.meta.target_layers) as activations:
        logits = model(images)          # activations: one tensor per target layer
    save_checkpoint(model, "model.safetensors", extra={"epochs": 3})
    model = load_checkpoint("model.safetensors")
"""

from __future__ import annotations

from .checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint_meta, save_checkpoint
# resolve_layers: module names plus the call of a module run several times ("block#2", hooks.py)
from .hooks import ModifiedInPlace, capture_activations, run_capturing
from .hooks import resolve_layer_calls as resolve_layers
from .normalization import Normalization, NormalizationWarning, check_normalization
from .zoo import (
    ARCHITECTURES,
    CUSTOM_ARCH,
    ArchSpec,
    AuditModel,
    ModelMeta,
    build_model,
    get_arch,
)

__all__ = [
    "ARCHITECTURES",
    "CUSTOM_ARCH",
    "FORMAT_VERSION",
    "ArchSpec",
    "AuditModel",
    "ModelMeta",
    "Normalization",
    "NormalizationWarning",
    "build_model",
    "ModifiedInPlace",
    "capture_activations",
    "check_normalization",
    "run_capturing",
    "get_arch",
    "load_checkpoint",
    "read_checkpoint_meta",
    "resolve_layers",
    "save_checkpoint",
]
