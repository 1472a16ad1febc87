"""Repairing a shortcut: fine-tune a checkpoint with TAP, TEA, RRR, Energy or MaskTune, then prove it.

    result = run_repair(model, dataset, RepairConfig(method="tap"))
    result.before.verdict, result.after.verdict        # audits on the test split

See docs/repair.md for each method's loss and when to choose it.
"""

from __future__ import annotations

from .objectives import (
    EnergyObjective,
    Objective,
    RrrObjective,
    TapObjective,
    TeaObjective,
    heat_distance,
    multiresolution_heat_loss,
)
from .runner import DEFAULT_LAMBDA, METHODS, SWEEP, RepairConfig, RepairResult, run_repair
from .teacher import AnnotationConfig, annotate, saliency_masks
from .trainer import FitConfig, Interrupted, TrainingStopped, fit

__all__ = [
    "DEFAULT_LAMBDA",
    "METHODS",
    "SWEEP",
    "AnnotationConfig",
    "EnergyObjective",
    "FitConfig",
    "Interrupted",
    "Objective",
    "RepairConfig",
    "RepairResult",
    "RrrObjective",
    "TapObjective",
    "TeaObjective",
    "TrainingStopped",
    "annotate",
    "fit",
    "heat_distance",
    "multiresolution_heat_loss",
    "run_repair",
    "saliency_masks",
]
