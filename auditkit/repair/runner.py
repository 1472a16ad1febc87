"""Repairing a checkpoint: data and masks, objective, optional λ sweep, training, proof.

    result = run_repair(model, dataset, RepairConfig(method="tap"))
    result.model, result.document          # the repaired copy, and its before/after JSON document

``dataset`` holds every split: the training split (its contaminated variant by default) is trained
on, the validation split scores the λ sweep, and the test split is audited before and after. What
each method needs and does comes from its MethodSpec (auditkit/repair/methods/); nothing the caller
passes is changed: the model is copied, the config is read, the teacher's mode is restored.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..audit import AuditConfig, run_audit
from ..audit.metrics import remove_region
from ..data import AuditDataset, collate, to_uint8
from ..data.dataset import Record
from ..data.masks import is_annotated
from ..data.meaning import SPURIOUS, masks_marking
from ..device import resolve_device, resolve_precision
from ..distributed import Context
from ..errors import DataError, ParameterError
from .._progress import progress_bar
from ..training import TrainConfig, choose_training_variant, fit
from ..training.classifier import check_label_kind
from ..training.losses import correct, task_loss
from .methods import METHODS, MethodSpec
from .teacher import AnnotationConfig, annotate, same_classes_as_student

SCHEMA = "auditkit.repair/1"


@dataclass(frozen=True)
class RepairConfig:
    """A repair: the method and its options, λ, the training settings, the data's splits, the
    teacher (TEA, or annotation of masks), the audits. Never changed by ``run_repair``."""

    method: str = "tap"
    training: TrainConfig | None = None  # None: TrainConfig with the method's own defaults
    lam: float | str = "default"  # a number, "default" (the method's) or "auto" (a sweep on validation data)
    options: dict = field(default_factory=dict)  # the method's own options (MethodSpec.options), by name
    train_split: str = "train"
    val_split: str = "val"
    variant: str | None = None  # training variant (default: contaminated, else the only one)
    teacher: torch.nn.Module | None = None
    teacher_name: str = ""
    annotation: AnnotationConfig | None = None  # teacher masks for the mask-based methods (TAP §4.2)
    cache_dir: Path | None = None
    sweep_epochs: int = 1
    sweep_samples: int = 1024
    audit: AuditConfig | None = field(default_factory=lambda: AuditConfig(methods=("lrp_epsilon", "gradient")))
    audit_split: str = "test"

    @property
    def spec(self) -> MethodSpec:
        if self.method not in METHODS:
            raise ParameterError("method", f"must be one of {', '.join(METHODS)}; got {self.method!r}")
        return METHODS[self.method]

    def training_config(self) -> TrainConfig:
        """The training settings: the given ones, else the method's defaults (repairs visit the data in
        a fresh numpy permutation per epoch)."""
        if self.training is not None:
            return self.training
        return TrainConfig(**{"data_order": "permutation", **self.spec.training})

    def validate(self) -> None:
        spec = self.spec
        spec.make_options(self.options)
        if spec.teacher == "required" and self.teacher is None:
            raise ParameterError("teacher", f"must be given: {spec.name} needs a teacher, a model trained on a small "
                                 "clean split (e.g. train_model with a fraction of 0.1)")
        if isinstance(self.lam, str) and self.lam not in ("default", "auto"):
            raise ParameterError("lam", f"must be a number, 'default' or 'auto'; got {self.lam!r}")
        if not isinstance(self.lam, str) and not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ParameterError("lam", f"must be a number >= 0; got {self.lam}")
        self.training_config().validate()


def default_lambda(config: RepairConfig, model=None) -> float:
    """The method's λ when the user gave none: for teacher masks (TAP App. C), else for a vision
    transformer's ``model`` where the method measured another (MethodSpec.transformer_lambda), else
    its default."""
    spec = config.spec
    if config.annotation is not None and spec.teacher_mask_lambda is not None:
        return spec.teacher_mask_lambda
    if spec.transformer_lambda is not None and model is not None:
        from ..models.tokens import is_transformer

        if is_transformer(getattr(model, "net", model)):
            return spec.transformer_lambda
    return spec.default_lambda


@dataclass
class RepairResult:
    model: torch.nn.Module  # the repaired copy
    lam: float
    history: list
    sweep: list = field(default_factory=list)
    annotation: dict | None = None
    before: Any = None  # AuditReport
    after: Any = None
    document: dict = field(default_factory=dict)  # the before/after document (auditkit.repair/1)

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


def check_data(dataset: AuditDataset, config: RepairConfig) -> AuditDataset:
    """Fails early, with one line, when the data cannot serve this repair; returns the training data."""
    spec = config.spec
    train = dataset.select(split=config.train_split)
    train = train.select(variant=choose_training_variant(train, config.variant))
    annotated = config.teacher is not None and config.annotation is not None and spec.teacher == "annotates"
    if spec.masks is not None and not annotated and not train.has_masks:
        raise ParameterError(
            "annotation",
            f"is needed: {spec.name} needs masks and the training data has none; annotate them with a "
            "teacher (teacher and annotation), or use a method that needs no masks (tea)",
        )
    if spec.masks is not None and not annotated:
        spec.check_masks(train.info.mask_meaning)  # masks of the wrong kind: one line, before any work
        require_annotated_masks(train, spec.name)
    if config.lam == "auto" and config.val_split not in dataset.splits:
        raise ParameterError("lam", f"'auto' needs a validation split; the data has {', '.join(dataset.splits)}")
    return train


def has_annotated_masks(data: AuditDataset) -> bool:
    """Whether any mask of ``data`` marks at least one pixel. Stops at the first that does, so it
    reads every mask only when none does (boxes need no reading)."""
    for k, record in enumerate(data.records):
        if record.mask is None:
            continue
        where = str(record.mask) if isinstance(record.mask, Path) else f"mask of sample {k} of {data.info.name}"
        if is_annotated(record.mask, where):
            return True
    return False


def require_annotated_masks(train: AuditDataset, method: str, *, teacher: bool = False) -> None:
    """Raises DataError (one line) when the training data has masks but none marks a pixel: a mask
    method's penalty would then be zero at every step, a plain fine-tune reported as a repair (e.g.
    0/1 masks once read on a 0-255 scale, or a teacher threshold that annotates nothing). A data-entry
    check, run once before training: it stops at the first annotated mask, so it reads every mask
    only when all are empty (boxes need no reading)."""
    with_masks = sum(r.mask is not None for r in train.records)
    if with_masks == 0 or has_annotated_masks(train):
        return  # (no masks at all: the caller's own check names that case)
    if teacher:
        raise DataError(f"{train.info.name}: the teacher annotated no pixel in any of the {with_masks} training "
                        f"images, so {method}'s penalty would be zero; raise the annotation's tau or quantile")
    raise DataError(f"{train.info.name}: all {with_masks} training masks are empty (no pixel above 0.5), so "
                    f"{method}'s penalty would be zero; check how the masks were saved (docs/data.md, Masks) or "
                    "annotate them with a teacher")


def training_data(dataset: AuditDataset, config: RepairConfig, model, options, training: TrainConfig,
                  show_progress: bool) -> tuple[AuditDataset, dict | None]:
    spec = config.spec
    train = check_data(dataset, config)
    stats = None
    if spec.masks is not None and spec.teacher == "annotates" and config.teacher is not None and config.annotation:
        train, stats = annotate(config.teacher, train, config.annotation, cache_dir=config.cache_dir,
                                teacher_fingerprint=config.teacher_name, show_progress=show_progress)
        require_annotated_masks(train, spec.name, teacher=True)
    train = spec.training_masks(train)  # what the method's masks must mark (auditkit/data/meaning.py)
    if spec.prepare_data is not None:
        train = spec.prepare_data(model, train, options, train.info.mask_meaning, training.batch_size,
                                  training.device, show_progress)
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
    # Object masks: everything but the object is filled, so no shortcut off the object can help. Only
    # candidates are compared on it; the audit, which judges, does not remove so much (audit/runner.py).
    reference = masks_marking(reference, SPURIOUS, "the counterfactual validation", convert=True)
    records = []
    for k in range(len(reference)):
        sample = reference[k]
        image = sample.image if sample.mask is None else remove_region(sample.image, sample.mask, seed + k)
        r = reference.records[k]
        # The artefact is filled in: its flag no longer holds (0 for the image's artefact; () when unknown).
        records.append(Record(to_uint8(image), r.label, None, "counterfactual", r.group, r.split,
                              tuple(0 for _ in r.artefact)))
    return AuditDataset(records, reference.info, channels=reference.channels, image_size=reference.image_size)


@torch.no_grad()
def validation_loss(model, val: AuditDataset, device: torch.device, batch_size: int = 256) -> tuple[float, float]:
    """(mean task loss, accuracy): the model's own loss (training/losses.py: cross-entropy over classes,
    BCE-with-logits over findings, without pos_weight so that every candidate is scored alike) and the
    accuracy (multilabel: the label-wise accuracy at z_k > 0)."""
    model.eval()
    total, right = 0.0, 0.0
    for start in range(0, len(val), batch_size):
        batch = collate([val[k] for k in range(start, min(start + batch_size, len(val)))]).to(device)
        logits = model(batch.images)
        total += float(task_loss(logits, batch.labels, reduction="sum"))
        right += correct(logits, batch.labels)
    return total / max(len(val), 1), right / max(len(val), 1)


def _objective(spec: MethodSpec, model, options, teacher, lam: float):
    objective = spec.build(model, options, teacher)
    objective.lam = float(lam)
    return objective


def _sweep_grid(spec: MethodSpec, config: RepairConfig) -> list[dict]:
    """The option combinations swept with λ: the product of spec.sweep_options the caller left unset."""
    grid = [{}]
    for name, candidates in spec.sweep_options.items():
        if name not in config.options:
            grid = [{**combo, name: value} for combo in grid for value in candidates]
    return grid


def _score(row: dict) -> tuple:
    # Validation data is where the shortcut does not help: the highest accuracy wins (to the
    # 0.5 %: 500 validation images resolve no finer), then the lowest loss.
    loss = row["val_loss"] if math.isfinite(row["val_loss"]) else math.inf
    return (-round(row["val_accuracy"] * 200), loss)


def sweep_lambda(model, train, val, config: RepairConfig, options, training: TrainConfig, context: Context,
                 show_progress: bool = False) -> tuple[float, Any, list]:
    """λ (and the options in spec.sweep_options the caller left unset) chosen by short runs from the
    same starting weights, scored on validation data where a shortcut does not help (permuted, else
    counterfactual). Successive halving: every candidate trains ``sweep_epochs`` on a subset of
    ``sweep_samples`` images; the best third trains once more on another subset; the best of those
    is left in ``model`` (the full training continues it). Returns (λ, options, table rows)."""
    if val is None or len(val) == 0:
        raise ParameterError("lam", "'auto' needs validation data (the val split) to score the candidates")
    spec = config.spec
    start = copy.deepcopy(model.state_dict())
    order = np.random.default_rng(training.seed).permutation(len(train))
    subsets = [train.select(indices=order[k * config.sweep_samples:(k + 1) * config.sweep_samples])
               for k in range(2)]
    if len(subsets[1]) == 0:
        subsets[1] = subsets[0]
    short = replace(training, epochs=config.sweep_epochs)
    candidates = [(lam, combo) for combo in _sweep_grid(spec, config) for lam in spec.sweep]
    rows: list[dict] = []
    states: dict[int, dict] = {}
    latest: dict[int, dict] = {}  # candidate -> its latest row
    with progress_bar("choosing lambda"
                      + (" and " + ", ".join(spec.sweep_options) if len(candidates) > len(spec.sweep) else ""),
                      total=len(candidates) + max(1, len(candidates) // 3), enabled=show_progress) as bar:
        alive = list(range(len(candidates)))
        for round_number, subset in enumerate(subsets):
            for k in alive:
                lam, combo = candidates[k]
                model.load_state_dict(start if round_number == 0 else states[k])
                chosen = replace(options, **combo)
                fit(model, subset, _objective(spec, model, chosen, config.teacher, lam), short, context=context,
                    show_progress=False)
                loss, accuracy = validation_loss(model, val, training.device)
                row = {"lambda": lam, **combo, "round": round_number + 1, "val_loss": loss, "val_accuracy": accuracy}
                rows.append(row)
                latest[k] = row
                states[k] = copy.deepcopy(model.state_dict())
                bar.advance(1)
            alive = sorted(alive, key=lambda k: _score(latest[k]))
            if round_number == 0:
                alive = alive[: max(1, len(alive) // 3)]
    best = alive[0]
    model.load_state_dict(states[best])
    lam, combo = candidates[best]
    return lam, replace(options, **combo), rows


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
    """Fine-tunes a copy of ``model`` with ``config.method``; audits it before and after on the audit
    split. Returns the repaired copy, the training history, the sweep, the annotation statistics, both
    audits and the document that records them (``result.document``). Raises ParameterError (a bad
    setting, named) or DataError (data that cannot serve the method) before any training."""
    config.validate()
    spec = config.spec
    options = spec.make_options(config.options)
    check_data(dataset, config)
    check_label_kind(dataset, model.meta)  # multilabel data needs a multilabel model, and the reverse (one line)
    if config.teacher is not None:
        same_classes_as_student(config.teacher, model)
    context = context or Context()
    training = config.training_config()
    # A name from a direct caller is resolved here; a resolved torch.device (repair_checkpoint's) passes through.
    device = resolve_device(training.device)
    training = replace(training, device=device, precision=resolve_precision(training.precision, device))
    model = copy.deepcopy(model).to(device)
    teacher_was_training = config.teacher.training if config.teacher is not None else None
    started = time.perf_counter()
    try:
        if config.teacher is not None:
            config.teacher.eval()
        audit_data = (dataset.select(split=config.audit_split)
                      if config.audit and config.audit_split in dataset.splits else None)
        # The model is still the input checkpoint here (a resumed state is loaded inside fit).
        before = run_audit(model, audit_data, config.audit, context=context) if audit_data is not None else None
        train, annotation = training_data(dataset, config, model, options, training, show_progress and context.is_main)
        sweep = []
        lam = default_lambda(config, model) if config.lam == "default" else config.lam
        if lam == "auto":
            lam, options, sweep = sweep_lambda(model, train, validation_data(dataset, config, training.seed), config,
                                               options, training, context, show_progress and context.is_main)
        objective = _objective(spec, model, options, config.teacher, lam)
        history = fit(model, train, objective, training, state_path=state_path, resume=resume, context=context,
                      show_progress=show_progress, on_epoch=on_epoch, on_step=on_step)
        after = run_audit(model, audit_data, config.audit, context=context) if audit_data is not None else None
    finally:
        if config.teacher is not None:
            config.teacher.train(teacher_was_training)
    result = RepairResult(model, float(lam), history, sweep, annotation, before, after)
    result.document = {
        "schema": SCHEMA,
        "auditkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": spec.name,
        "method_summary": spec.summary,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(options).items()},
        "training": training.as_dict(),
        "data_fingerprint": dataset.fingerprint(),
        # What the data's masks mark, and what the masks the method trained on marked (their complement,
        # or a teacher's; None: no masks read): auditkit/data/meaning.py.
        "mask_meaning": {"data": dataset.info.mask_meaning,
                         "trained": train.info.mask_meaning if spec.masks else None},
        "teacher": config.teacher_name or None,
        "seconds": round(time.perf_counter() - started, 2),
        **result.summary(),
        "before_audit": before.data if before is not None else None,
        "after_audit": after.data if after is not None else None,
    }
    return result
