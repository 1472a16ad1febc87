"""Repairing a checkpoint file, ``method="auto"`` included: read the checkpoint, the data and the
teacher, repair (one method, or the methods in their auto order until one works), write the
repaired checkpoint and its proof beside it.

    done = repair_checkpoint(CheckpointRepair(Path("shortcut.safetensors"), "builtin:decoy-mnist",
                                              Path("repaired.safetensors"), method="auto"))
    done.path, done.document["auto"]["succeeded"], done.still_reliant

Writes OUT, OUT.audit.json (the document) and OUT.audit.html (before/after, when both audits ran);
a model read from a Hugging Face or timm folder is written as a folder of the same kind when OUT has
no checkpoint suffix (auditkit/models/folders.py), and also as auditkit's checkpoint at
``also_checkpoint`` when that is given;
a single method also keeps its resumable state in OUT.state.pt. The device is resolved here, once
per run, and passed down as a ``torch.device``. Under torchrun only the main rank writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed
from .._io import atomic_write_text
from .._json import dumps
from ..audit import AuditConfig, render_comparison_html
from ..data import open_dataset
from ..device import resolve_device, resolve_precision
from ..errors import OutputExistsError, ParameterError
from ..models import resolve_layers, save_checkpoint
from ..models.loading import ReadOptions, load_model
from ..training import TrainConfig, align_dataset_to_model
from .auto import AutoConfig, repair_decision, run_auto_repair
from .methods import METHODS, MethodSpec
from .runner import RepairConfig, RepairResult, check_data, run_repair
from .teacher import AnnotationConfig, same_classes_as_student

AUTO = "auto"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class CheckpointRepair:
    """What to repair, with what, and where the result goes. Settings left None take the method's
    defaults (MethodSpec.training, its options' defaults)."""

    checkpoint: Path
    data: str  # a dataset spec with train/val/test splits (auditkit.data.open_dataset)
    out: Path  # the repaired checkpoint (.safetensors or .pt) or model folder (_write); the input is never modified
    method: str = "tap"  # a METHODS name, or "auto"
    lam: float | str = "default"  # a number, "default" or "auto" (a sweep); auto chooses its own
    training: dict = field(default_factory=dict)  # TrainConfig settings over the method's (epochs, lr, ...)
    options: dict = field(default_factory=dict)  # method options by name: each method takes those it knows
    method_options: dict = field(default_factory=dict)  # the named method's options (auto: each method's own)
    layers: tuple[str, ...] | None = None  # TAP's layers, names resolved against the model
    teacher: Path | None = None  # TEA's teacher, or the annotator of masks (TAP §4.2)
    tau: float | None = None  # teacher masks: 1 where normalised saliency < tau
    quantile: float | None = None  # teacher masks: the least salient fraction instead of tau
    annotation_method: str = "gradient"
    cache_dir: Path | None = None  # teacher masks (default: .auditkit-cache beside out)
    variant: str | None = None  # training variant (default: contaminated)
    audit_split: str = "test"  # audited before and after; "none": no proof audits
    audit_methods: tuple[str, ...] = ("lrp_epsilon", "gradient")
    judge: bool = False  # decide on validation data whether a single method worked (auto always does)
    max_accuracy_drop: float = 0.03  # the guarded validation accuracy a repair may lose (auto.guarded_accuracy)
    resume: bool = False  # continue from OUT.state.pt (a single method only)
    overwrite: bool = False
    classes: str | None = None  # class names in index order, comma-separated
    mask_meaning: str | None = None  # what the masks mark, over dataset.json's (auditkit/data/meaning.py)
    reading: ReadOptions = ReadOptions()
    seed: int = 0
    device: str | torch.device = "auto"
    precision: str = "auto"
    also_checkpoint: Path | None = None  # a model folder's repair: auditkit's own checkpoint here too

    @property
    def state_path(self) -> Path:
        return self.out.with_name(self.out.name + ".state.pt")

    @property
    def proof_path(self) -> Path:
        return self.out.with_name(self.out.name + ".audit.json")

    def check(self) -> None:
        """ParameterError (named) for settings that cannot go together; before anything is read."""
        if self.method != AUTO and self.method not in METHODS:
            raise ParameterError("method", f"must be one of {', '.join(METHODS)} or {AUTO}; got {self.method!r}")
        if self.method == AUTO and self.lam != "default":
            raise ParameterError("lam", "cannot be given with method 'auto', which chooses each method's lambda")
        if self.method == AUTO and self.resume:
            raise ParameterError("resume", "does not apply to method 'auto'; run it again from the start")
        if self.out.resolve() == self.checkpoint.resolve():
            raise ParameterError("out", "is the input checkpoint; auditkit never overwrites the model it repairs")
        for out in (self.out, self.also_checkpoint):
            if out is not None and out.exists() and not self.overwrite and not self.resume:
                raise OutputExistsError("overwrite", f"is off and {out} already exists: choose another path, "
                                        "or allow replacing it")
        if self.also_checkpoint is not None and self.also_checkpoint.suffix.lower() not in _CHECKPOINT_SUFFIXES:
            raise ParameterError("also_checkpoint", f"must end in .safetensors, .pt or .pth: {self.also_checkpoint}")
        if self.resume and not self.state_path.is_file():
            raise ParameterError("resume", f"is set but there is no saved state at {self.state_path}; "
                                 "start without it")
        if self.teacher is None and (self.tau is not None or self.quantile is not None):
            raise ParameterError("teacher", "must be given with tau or quantile: its saliency makes the masks")


@dataclass
class RepairedCheckpoint:
    """What ``repair_checkpoint`` did: the files it wrote and the numbers behind them."""

    path: Path | None  # the repaired checkpoint (None on a rank that writes nothing)
    document: dict  # what OUT.audit.json holds (auditkit.repair/1)
    result: RepairResult
    device: torch.device
    precision: str
    still_reliant: bool  # auto found no method that worked, or a judged repair did not work
    is_main: bool = True  # False on the other ranks under torchrun


def annotation_config(teacher: bool, tau: float | None, quantile: float | None, method: str, batch_size: int,
                      precision: str) -> AnnotationConfig | None:
    """The teacher masks' settings (tau 0.1 unless a tau or quantile is given); None without a teacher."""
    if not teacher:
        if tau is not None or quantile is not None:
            raise ParameterError("teacher", "must be given with tau or quantile: its saliency makes the masks")
        return None
    chosen = tau is not None or quantile is not None
    return AnnotationConfig(method=method, tau=tau if chosen else 0.1, quantile=quantile if tau is None else None,
                            batch_size=batch_size, precision=precision)


def repair_checkpoint(
    request: CheckpointRepair,
    *,
    show_progress: bool = True,
    on_start: Callable[[torch.device, str], None] | None = None,
    on_epoch: Callable | None = None,
    on_attempt: Callable[[dict], None] | None = None,
) -> RepairedCheckpoint:
    """Repairs ``request.checkpoint`` and writes the result (module docstring). ``on_start(device,
    precision)`` runs once the inputs are read and checked, before any training; ``on_epoch(record)``
    after each epoch of a single method; ``on_attempt(row)`` after each attempt of auto. Callbacks run
    on the main rank only. Raises ParameterError / DataError before any training for bad settings."""
    request.check()
    device = resolve_device(request.device)  # once per run: everything below takes this torch.device
    precision = resolve_precision(request.precision, device)
    context = distributed.init_from_environment(device)
    main = context.is_main

    def only_main(callback):
        return None if callback is None else (lambda *args: callback(*args) if main else None)

    try:
        model, dataset, teacher = _inputs(request, device)
        config, auto, training_for, options_for = _configs(request, model, dataset, teacher, device, precision)
        if main and on_start is not None:
            on_start(device, precision)
        if request.method == AUTO:
            result = run_auto_repair(model, dataset, config, auto, training_for=training_for, options_for=options_for,
                                     context=context, show_progress=show_progress, on_attempt=only_main(on_attempt))
            still_reliant = not result.document["auto"]["succeeded"]
        else:
            result = run_repair(model, dataset, config, state_path=request.state_path, resume=request.resume,
                                context=context, show_progress=show_progress, on_epoch=only_main(on_epoch))
            still_reliant = False
            if request.judge:
                result.document["decision"] = repair_decision(model, result.model, dataset, config,
                                                              request.max_accuracy_drop, context)
                still_reliant = not result.document["decision"]["succeeded"]
        path, document = _write(request, dataset, result) if main else (None, result.document)
    finally:
        distributed.finish(context)
    return RepairedCheckpoint(path, document, result, device, precision, still_reliant, main)


def _inputs(request: CheckpointRepair, device: torch.device):
    """The model, the data in its input format and the teacher, all on ``device``."""
    model = load_model(request.checkpoint, request.reading).to(device)
    dataset = open_dataset(request.data, classes=request.classes, mask_meaning=request.mask_meaning)
    dataset = align_dataset_to_model(dataset, model)
    teacher = None
    if request.teacher is not None:
        teacher = load_model(request.teacher, ReadOptions(trust_pickle=request.reading.trust_pickle)).to(device)
        same_classes_as_student(teacher, model)
        align_dataset_to_model(dataset, teacher)  # bare weights adopt the data's classes; sizes checked
    return model, dataset, teacher


def _configs(request: CheckpointRepair, model, dataset, teacher, device: torch.device, precision: str):
    """The repair's config (of the named method; TAP's for auto), auto's, and each method's training
    settings and options (auto builds one per method it tries)."""
    auto_run = request.method == AUTO
    spec = METHODS["tap" if auto_run else request.method]
    given = {k: v for k, v in request.training.items() if v is not None}
    flags = {k: v for k, v in request.options.items() if v is not None}
    if request.layers:
        flags["layers"] = tuple(resolve_layers(model, list(request.layers)))

    def training_for(spec: MethodSpec) -> TrainConfig:
        return TrainConfig(**{"data_order": "permutation", **spec.training, **given}, seed=request.seed,
                           device=device, precision=precision)

    def options_for(spec: MethodSpec) -> dict:
        known = {f.name for f in dataclasses.fields(spec.options)}
        chosen = {name: value for name, value in flags.items() if name in known}
        # The explicit options: every key for the named method; with auto, the keys each method takes.
        chosen.update({k: v for k, v in request.method_options.items() if not auto_run or k in known})
        return chosen

    training = training_for(spec)
    annotates = spec.teacher == "annotates" or auto_run
    config = RepairConfig(
        method=spec.name, training=training, lam=request.lam, options=options_for(spec), variant=request.variant,
        teacher=teacher, teacher_name=str(request.teacher or ""),
        annotation=annotation_config(annotates and request.teacher is not None, request.tau, request.quantile,
                                     request.annotation_method, training.batch_size, precision),
        cache_dir=request.cache_dir or request.out.parent / ".auditkit-cache",
        audit=None if request.audit_split == "none" else AuditConfig(
            methods=tuple(request.audit_methods), precision=precision, seed=request.seed),
        audit_split=request.audit_split,
    )
    config.validate()
    auto = AutoConfig(max_accuracy_drop=request.max_accuracy_drop)
    if auto_run:
        auto.validate()
    else:
        check_data(dataset, config)  # fail in one line before any work is shown
    return config, auto, training_for, options_for


def _write(request: CheckpointRepair, dataset, result: RepairResult) -> tuple[Path, dict]:
    """OUT (with a summary of the repair in its metadata), OUT.audit.json and, with both audits,
    OUT.audit.html. Returns the checkpoint's path and the document."""
    provenance = {"input": str(request.checkpoint), "data": request.data,
                  "teacher": str(request.teacher) if request.teacher else None}
    summary = {"method": request.method, **provenance, "data_fingerprint": dataset.fingerprint(), **result.summary()}
    model = result.model.cpu()
    if getattr(model, "folder", None) is not None and request.out.suffix.lower() not in _CHECKPOINT_SUFFIXES:
        # A Hugging Face or timm model folder's repair: a folder of the same kind (from_pretrained / timm load it)
        from ..models.folders import save_folder

        path = save_folder(model, request.out, overwrite=True, extra={"repair": summary})
    else:
        path = save_checkpoint(model, request.out, extra={"repair": summary}, overwrite=True)
    document = {**result.document, "checkpoint": str(path), **provenance}
    if request.also_checkpoint is not None:
        document["auditkit_checkpoint"] = str(save_checkpoint(model, request.also_checkpoint,
                                                              extra={"repair": summary}, overwrite=True))
    atomic_write_text(request.proof_path, dumps(document, indent=2, default=str) + "\n", overwrite=True)
    if result.before is not None and result.after is not None:
        page = render_comparison_html(result.before.data, result.after.data, title=f"Repair with {request.method}")
        atomic_write_text(request.out.with_name(request.out.name + ".audit.html"), page, overwrite=True)
    return path, document


__all__ = ["AUTO", "CheckpointRepair", "RepairedCheckpoint", "annotation_config", "repair_checkpoint"]
