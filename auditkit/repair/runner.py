"""Repairing a checkpoint: data and masks, objective, optional λ sweep, training, proof.

    result = run_repair(model, dataset, RepairConfig(method="tap"))

``dataset`` holds every split: the training split (its contaminated variant by default) is trained
on, the validation split scores the λ sweep, and the test split is audited before and after.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..audit import AuditConfig, run_audit
from ..audit.metrics import remove_region
from ..data import AuditDataset, collate, to_uint8
from ..data.dataset import Record
from ..device import resolve_device, resolve_precision
from ..distributed import Context
from ..errors import AuditkitError
from ..train import choose_training_variant
from .masktune import masktune_dataset
from .objectives import EnergyObjective, Objective, RrrObjective, TapObjective, TeaObjective
from .teacher import AnnotationConfig, annotate
from .trainer import FitConfig, fit

METHODS = ("tap", "tea", "rrr", "energy", "masktune")
DEFAULT_LAMBDA = {"tap": 0.1, "rrr": 1.0, "energy": 1.0, "tea": 1.0, "masktune": 0.0}
# Teacher masks cover far more of the image than an artefact's ground truth (17-73 % against 2 % on
# decoy MNIST), so the same lambda penalises far more activation, much of it on the object. The TAP
# paper lowers TAP's lambda 10-100x for teacher annotations (App. C, Tables 2-3; MNIST 1e-3 -> 1e-4).
TEACHER_MASK_LAMBDA = {"tap": 0.01}


def default_lambda(config: "RepairConfig") -> float:
    if config.annotation is not None and config.method in TEACHER_MASK_LAMBDA:
        return TEACHER_MASK_LAMBDA[config.method]
    return DEFAULT_LAMBDA[config.method]

# Training defaults per method (what the measured runs in docs/repair.md used). The double-backward
# losses need gradient clipping: the LRP-epsilon ratio's derivative grows like 1/epsilon^2 where a
# pre-activation nears 0, and unclipped steps blew TEA's logits up (to a constant prediction).
# TEA learns a new reasoning from the heatmaps alone, so it needs more epochs than a penalty does.
METHOD_DEFAULTS = {
    "tap": {"epochs": 3, "grad_clip": 0.0, "schedule": "constant"},
    "rrr": {"epochs": 3, "grad_clip": 1.0, "schedule": "constant"},
    "energy": {"epochs": 3, "grad_clip": 1.0, "schedule": "constant"},
    "tea": {"epochs": 30, "grad_clip": 1.0, "schedule": "cosine"},
    "masktune": {"epochs": 1, "grad_clip": 0.0, "schedule": "constant"},
}
# Log-spaced sweeps (TAP App. C searches 1e-9 .. 1 for TAP and RRR; the top decades are where
# its chosen values lie for small networks, so the sweep starts there to keep runs short).
SWEEP = {"tap": [1e-4, 1e-3, 1e-2, 1e-1, 1.0], "rrr": [1e-3, 1e-2, 1e-1, 1.0, 10.0],
         "energy": [0.1, 1.0, 10.0], "tea": [0.1, 1.0, 10.0], "masktune": [0.0]}


@dataclass
class RepairConfig:
    method: str = "tap"
    fit: FitConfig | None = None  # None: FitConfig with the method's METHOD_DEFAULTS
    lam: float | str = "default"  # a number, "default" (DEFAULT_LAMBDA) or "auto" (sweep)
    layers: tuple[str, ...] | None = None  # TAP targets (default: the model's preset)
    kernel_size: int = 3
    train_split: str = "train"
    val_split: str = "val"
    variant: str | None = None  # training variant (default: contaminated, else the only one)
    teacher: torch.nn.Module | None = None
    teacher_name: str = ""
    annotation: AnnotationConfig | None = None  # teacher masks for tap/rrr/energy
    cache_dir: Path | None = None
    tea_epsilon: float = 0.01
    tea_scales: int = 4
    tea_class: str = "teacher"
    tea_classes: int = 1  # classes explained per image (the teacher's top K; the loss is their mean)
    tea_task_weight: float = 0.0
    tea_distill_weight: float = 1.0  # distillation of the teacher's class probabilities (0: heatmaps alone)
    tea_temperature: float = 1.0
    masktune_sigmas: float = 2.0
    sweep_epochs: int = 1
    sweep_samples: int = 1024
    audit: AuditConfig | None = field(default_factory=lambda: AuditConfig(methods=("lrp_epsilon", "gradient")))
    audit_split: str = "test"

    def __post_init__(self) -> None:
        if self.fit is None:
            self.fit = FitConfig(**METHOD_DEFAULTS.get(self.method, {}))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise AuditkitError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.method == "tea" and self.teacher is None:
            raise AuditkitError("TEA needs a teacher: pass --teacher CHECKPOINT (e.g. trained with auditkit train on a small clean split)")
        if self.tea_class not in ("teacher", "random"):
            raise AuditkitError(f"--tea-class must be teacher or random; got {self.tea_class!r}")
        if self.tea_classes < 1:
            raise AuditkitError(f"--tea-classes must be at least 1; got {self.tea_classes}")
        if not (self.tea_distill_weight >= 0 and math.isfinite(self.tea_distill_weight)):
            raise AuditkitError(f"--distill-weight must be a number >= 0; got {self.tea_distill_weight}")
        if not (self.tea_temperature > 0 and math.isfinite(self.tea_temperature)):
            raise AuditkitError(f"--temperature must be a positive number; got {self.tea_temperature}")
        if isinstance(self.lam, str) and self.lam not in ("default", "auto"):
            raise AuditkitError(f"--lambda must be a number or auto; got {self.lam!r}")
        self.fit.validate()


@dataclass
class RepairResult:
    model: torch.nn.Module
    lam: float
    history: list
    sweep: list = field(default_factory=list)
    annotation: dict | None = None
    before: object | None = None  # AuditReport
    after: object | None = None
    audit_data: AuditDataset | None = None

    def summary(self) -> dict:
        def verdict(report):
            return None if report is None else report.data["verdict"]["label"]

        def accuracy(report):
            if report is None:
                return None
            return {k: v["value"] for k, v in report.data["task"]["per_variant"].items()}

        return {"lambda": self.lam, "history": self.history, "sweep": self.sweep, "annotation": self.annotation,
                "before": {"verdict": verdict(self.before), "metric": accuracy(self.before)},
                "after": {"verdict": verdict(self.after), "metric": accuracy(self.after)}}


def build_objective(config: RepairConfig, model) -> Objective:
    if config.method == "tap":
        layers = config.layers if config.layers is not None else tuple(model.meta.target_layers)
        if not layers:
            raise AuditkitError("TAP needs targeted layers: this model has no preset, pass --layers")
        return TapObjective(layers=tuple(layers), kernel_size=config.kernel_size)
    if config.method == "rrr":
        return RrrObjective()
    if config.method == "energy":
        return EnergyObjective()
    if config.method == "tea":
        config.teacher.eval()
        return TeaObjective(teacher=config.teacher, epsilon=config.tea_epsilon, scales=config.tea_scales,
                            explained_class=config.tea_class, classes=config.tea_classes, task_weight=config.tea_task_weight,
                            distill_weight=config.tea_distill_weight, temperature=config.tea_temperature)
    return Objective()  # masktune: plain cross-entropy on masked images


def _with_object_masks(dataset: AuditDataset) -> AuditDataset:
    """Energy needs masks of the object; spurious masks are turned into their complement."""
    records = []
    for r in dataset.records:
        mask = r.mask
        if mask is not None:
            pixels = dataset._read_mask(r, dataset._read_pixels(r).shape[:2])
            mask = to_uint8(1.0 - pixels)
        records.append(Record(r.image, r.label, mask, r.variant, r.group, r.split))
    return AuditDataset(records, dataset.info, channels=dataset.channels, image_size=dataset.image_size)


def check_data(dataset: AuditDataset, config: RepairConfig) -> AuditDataset:
    """Fails early, with one line, when the data cannot serve this repair; returns the training data."""
    train = dataset.select(split=config.train_split)
    train = train.select(variant=choose_training_variant(train, config.variant))
    needs_masks = config.method in ("tap", "rrr", "energy") and not (config.teacher is not None and config.annotation)
    if needs_masks and not train.has_masks:
        raise AuditkitError(
            f"{config.method} needs masks and the training data has none: pass --teacher CHECKPOINT --tau 0.1 "
            "to annotate them with a teacher, or use --method tea"
        )
    if config.lam == "auto" and config.val_split not in dataset.splits:
        raise AuditkitError(f"--lambda auto needs a validation split; the data has {', '.join(dataset.splits)}")
    return train


def training_data(dataset: AuditDataset, config: RepairConfig, model, show_progress: bool) -> tuple[AuditDataset, dict | None]:
    train = check_data(dataset, config)
    stats = None
    if config.method in ("tap", "rrr", "energy"):
        if config.teacher is not None and config.annotation is not None:
            train, stats = annotate(config.teacher, train, config.annotation, cache_dir=config.cache_dir,
                                    teacher_fingerprint=config.teacher_name, show_progress=show_progress)
        if config.method == "energy" and dataset.info.mask_meaning == "spurious":
            train = _with_object_masks(train)
    if config.method == "masktune":
        train = masktune_dataset(model, train, sigmas=config.masktune_sigmas, batch_size=config.fit.batch_size,
                                 device=config.fit.device, show_progress=show_progress)
    return train, stats


def validation_data(dataset: AuditDataset, config: RepairConfig, seed: int) -> AuditDataset | None:
    """Where a shortcut would not help: the permuted variant, else the reference variant with the
    masked region filled with background (a counterfactual), else plain validation data."""
    if config.val_split not in dataset.splits:
        return None
    val = dataset.select(split=config.val_split)
    if "permuted" in val.variants:
        return val.select(variant="permuted")
    reference = val.select(variant=choose_training_variant(val, config.variant))
    if not reference.has_masks:
        return reference
    records = []
    for k in range(len(reference)):
        sample = reference[k]
        image = sample.image if sample.mask is None else remove_region(sample.image, sample.mask, seed + k)
        r = reference.records[k]
        records.append(Record(to_uint8(image), r.label, None, "counterfactual", r.group, r.split))
    return AuditDataset(records, reference.info, channels=reference.channels, image_size=reference.image_size)


@torch.no_grad()
def validation_loss(model, val: AuditDataset, device: str, batch_size: int = 256) -> tuple[float, float]:
    """(mean cross-entropy, accuracy)."""
    model.eval()
    total, correct = 0.0, 0
    for start in range(0, len(val), batch_size):
        batch = collate([val[k] for k in range(start, min(start + batch_size, len(val)))]).to(device)
        logits = model(batch.images)
        total += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
        correct += int((logits.argmax(1) == batch.labels).sum())
    return total / max(len(val), 1), correct / max(len(val), 1)


def sweep_lambda(model, train, val, config: RepairConfig, context: Context, show_progress: bool) -> tuple[float, list]:
    """Short runs from the same starting weights, one per λ; the lowest validation loss wins."""
    if val is None or len(val) == 0:
        raise AuditkitError("--lambda auto needs a validation split (--val-split) to score the candidates")
    start = copy.deepcopy(model.state_dict())
    subset = train.select(indices=np.random.default_rng(config.fit.seed).permutation(len(train))[: config.sweep_samples])
    rows = []
    for lam in SWEEP[config.method]:
        model.load_state_dict(start)
        short = FitConfig(**{**vars(config.fit), "epochs": config.sweep_epochs, "lam": lam})
        fit(model, subset, build_objective(config, model), short, context=context, show_progress=False)
        loss, accuracy = validation_loss(model, val, config.fit.device)
        rows.append({"lambda": lam, "val_loss": loss, "val_accuracy": accuracy})
    model.load_state_dict(start)
    best = min(rows, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)
    return best["lambda"], rows


def run_repair(
    model,
    dataset: AuditDataset,
    config: RepairConfig,
    *,
    state_path: Path | None = None,
    resume: bool = False,
    context: Context | None = None,
    show_progress: bool = True,
    on_epoch=None,
    on_step=None,
) -> RepairResult:
    """Fine-tunes ``model`` in place; audits it before and after on the audit split."""
    config.validate()
    check_data(dataset, config)
    context = context or Context()
    device = resolve_device(config.fit.device)
    # A copy with the device and precision resolved (the caller's config is left as it was).
    config = replace(config, fit=replace(config.fit, device=str(device),
                                         precision=resolve_precision(config.fit.precision, device)))
    model.to(device)
    audit_data = dataset.select(split=config.audit_split) if config.audit and config.audit_split in dataset.splits else None
    # The model is still the input checkpoint here (a resumed state is loaded inside fit).
    before = run_audit(model, audit_data, config.audit, context=context) if audit_data is not None else None
    train, annotation = training_data(dataset, config, model, show_progress and context.is_main)
    sweep = []
    lam = default_lambda(config) if config.lam == "default" else config.lam
    if lam == "auto":
        lam, sweep = sweep_lambda(model, train, validation_data(dataset, config, config.fit.seed), config, context, show_progress)
    config.fit.lam = float(lam)
    objective = build_objective(config, model)
    history = fit(model, train, objective, config.fit, state_path=state_path, resume=resume, context=context,
                  show_progress=show_progress, on_epoch=on_epoch, on_step=on_step)
    after = run_audit(model, audit_data, config.audit, context=context) if audit_data is not None else None
    return RepairResult(model, float(lam), history, sweep, annotation, before, after, audit_data)
