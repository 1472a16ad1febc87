"""Repairing a shortcut: fine-tune a checkpoint with TAP, TEA, RRR, Energy or MaskTune, then prove it.

    result = run_repair(model, dataset, RepairConfig(method="tap"))
    result.before.verdict, result.after.verdict        # audits on the test split
    result = run_auto_repair(model, dataset, config)   # the methods in order of cost until one works

The methods are a registry (``METHODS``, one file each in auditkit/repair/methods/); see
docs/repair.md for each method's loss and when to choose it.
"""

from __future__ import annotations

from .auto import AUTO_ORDER, AutoConfig, decision_audit, repair_decision, run_auto_repair
from .methods import METHODS, MethodSpec
from .methods.energy import EnergyObjective, energy_in_mask
from .methods.rrr import RrrObjective
from .methods.tap import TapObjective
from .methods.tea import TeaObjective, distillation_loss, heat_distance, multiresolution_heat_loss
from .runner import RepairConfig, RepairResult, default_lambda, run_repair
from .teacher import AnnotationConfig, annotate, saliency_masks

__all__ = [
    "AUTO_ORDER",
    "METHODS",
    "AutoConfig",
    "AnnotationConfig",
    "EnergyObjective",
    "MethodSpec",
    "RepairConfig",
    "RepairResult",
    "repair_decision",
    "RrrObjective",
    "TapObjective",
    "TeaObjective",
    "annotate",
    "decision_audit",
    "default_lambda",
    "distillation_loss",
    "energy_in_mask",
    "heat_distance",
    "multiresolution_heat_loss",
    "run_auto_repair",
    "run_repair",
    "saliency_masks",
]
