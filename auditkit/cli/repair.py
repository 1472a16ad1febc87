"""`auditkit repair` (fine-tune away a shortcut, then prove it) and `auditkit annotate` (teacher masks)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    DeviceOption,
    ForceOption,
    JsonOption,
    PrecisionOption,
    QuietOption,
    SeedOption,
    handles_errors,
    parse_params,
    write_json,
)
from .checkpoints import ArchOption, TrustPickleOption, load

TeacherOption = Annotated[
    Optional[Path], typer.Option("--teacher", help="Teacher checkpoint (trained on a small clean split).")
]
TauOption = Annotated[
    Optional[float], typer.Option("--tau", help="Teacher masks: 1 where normalised saliency < tau (TAP Eq. 14).")
]
QuantileOption = Annotated[
    Optional[float], typer.Option("--quantile", help="Teacher masks: the fraction q of least salient pixels instead of --tau.")
]
AnnotationMethodOption = Annotated[
    str, typer.Option("--annotation-method", help="Teacher saliency: gradient (default), lrp_epsilon, gradcam, ...")
]


def _annotation(teacher, tau, quantile, method, batch_size, precision):
    from ..repair import AnnotationConfig

    if teacher is None:
        if tau is not None or quantile is not None:
            from ..errors import AuditkitError

            raise AuditkitError("--tau / --quantile need --teacher")
        return None
    return AnnotationConfig(method=method, tau=tau if (tau is not None or quantile is not None) else 0.1,
                            quantile=quantile if tau is None else None, batch_size=batch_size, precision=precision)


@handles_errors
def repair(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint to repair (never modified).")],
    data: Annotated[str, typer.Option("--data", help="Dataset with train/val/test splits (and masks for tap/rrr/energy).")],
    out: Annotated[Path, typer.Option("--out", help="The repaired checkpoint to write (.safetensors or .pt).")],
    method: Annotated[str, typer.Option(help="tap, tea, rrr, energy or masktune.")] = "tap",
    lam: Annotated[str, typer.Option("--lambda", help="Weight of the explanation loss: a number, or auto (sweep). Default: TAP 0.1 (0.01 with teacher masks), RRR, Energy, TEA 1.")] = "default",
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (default: TAP, RRR, Energy 3; TEA 30; MaskTune 1).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    grad_clip: Annotated[
        Optional[float], typer.Option(help="Max gradient norm, 0 = off (default: 1 for TEA, RRR, Energy; off for TAP).")
    ] = None,
    schedule: Annotated[
        Optional[str], typer.Option(help="constant or cosine learning rate (default: cosine for TEA, else constant).")
    ] = None,
    layers: Annotated[Optional[str], typer.Option(help="TAP: comma-separated layers (default: the arch's preset).")] = None,
    kernel_size: Annotated[int, typer.Option(help="TAP: max-pool size of the mask downscaling (Eq. 7).")] = 3,
    teacher: TeacherOption = None,
    tau: TauOption = None,
    quantile: QuantileOption = None,
    annotation_method: AnnotationMethodOption = "gradient",
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache for teacher masks (default: beside --out).")] = None,
    epsilon: Annotated[float, typer.Option(help="TEA: LRP-epsilon stabiliser.")] = 0.01,
    tea_class: Annotated[str, typer.Option(help="TEA: explain the teacher's most likely classes or random logits.")] = "teacher",
    tea_classes: Annotated[int, typer.Option(help="TEA: classes explained per image (the teacher's top K, or K random ones).")] = 1,
    task_weight: Annotated[float, typer.Option(help="TEA: weight of the task loss (0 = explanations alone).")] = 0.0,
    distill_weight: Annotated[
        float, typer.Option(help="TEA: weight of distilling the teacher's class probabilities (0 = heatmaps alone).")
    ] = 1.0,
    temperature: Annotated[float, typer.Option(help="TEA: distillation temperature.")] = 1.0,
    option: Annotated[
        list[str], typer.Option("--option", "-o", help="A method option KEY=VALUE (e.g. -o sigmas=3 for masktune); repeatable.")
    ] = [],
    variant: Annotated[Optional[str], typer.Option(help="Training variant (default: contaminated).")] = None,
    audit_split: Annotated[str, typer.Option(help="Split audited before and after ('none' to skip).")] = "test",
    audit_methods: Annotated[str, typer.Option(help="Attribution methods of the audits.")] = "lrp_epsilon,gradient",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its saved state.")] = False,
    arch: ArchOption = None,
    trust_pickle: TrustPickleOption = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    seed: SeedOption = 0,
    force: ForceOption = False,
    json_path: JsonOption = None,
    quiet: QuietOption = False,
) -> None:
    """Fine-tune a checkpoint so it stops relying on the annotated signal, then audit before and after.

    Writes OUT, OUT's resumable state (OUT.state.pt, each epoch and on Ctrl-C) and the proof beside it:
    OUT.audit.json and OUT.audit.html. Under `torchrun` the training is data-parallel.

    Example: auditkit repair shortcut.safetensors --data builtin:decoy-mnist --method tap --out repaired.safetensors
    """
    from rich.console import Console
    from rich.table import Table

    from .. import distributed
    from .._io import atomic_write_text
    from ..audit import AuditConfig, render_comparison_html
    from ..data import open_dataset
    from ..device import describe, resolve_device, resolve_precision
    from ..errors import AuditkitError
    from ..models import resolve_layers, save_checkpoint
    from ..repair import METHODS, RepairConfig, run_repair
    from ..repair.runner import check_data
    from ..training import TrainConfig, align_dataset_to_model

    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    if out.resolve() == checkpoint.resolve():
        raise AuditkitError("--out is the input checkpoint; auditkit never overwrites the model it repairs")
    if out.exists() and not force and not resume:
        raise AuditkitError(f"{out} already exists; choose another --out or pass --force to replace it")
    state_path = out.with_name(out.name + ".state.pt")
    if resume and not state_path.is_file():
        raise AuditkitError(f"--resume: no saved state at {state_path}; run without --resume to start")
    try:
        lam_value = lam if lam in ("auto", "default") else float(lam)
    except ValueError as error:
        raise AuditkitError(f"--lambda must be a number or auto; got {lam!r}") from error
    if method not in METHODS:
        raise AuditkitError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    spec = METHODS[method]
    context = distributed.init_from_environment(device)
    console = Console()
    try:
        model = load(checkpoint, arch, trust_pickle).to(device)
        dataset = align_dataset_to_model(open_dataset(data), model)
        teacher_model = load(teacher, None, trust_pickle).to(device) if teacher else None
        if teacher_model is not None:
            align_dataset_to_model(dataset, teacher_model)  # the teacher must know the same classes
        given = {k: v for k, v in {"epochs": epochs, "grad_clip": grad_clip, "schedule": schedule}.items() if v is not None}
        training = TrainConfig(**{"data_order": "permutation", **spec.training, **given}, batch_size=batch_size, lr=lr,
                               optimizer=optimizer, seed=seed, device=str(device), precision=precision)
        # The method's own options: the flags that belong to it, and any --option KEY=VALUE.
        flags = {"layers": tuple(resolve_layers(model, layers.split(","))) if layers else None,
                 "kernel_size": kernel_size, "epsilon": epsilon, "explained_class": tea_class, "classes": tea_classes,
                 "task_weight": task_weight, "distill_weight": distill_weight, "temperature": temperature}
        known = {f.name for f in dataclasses.fields(spec.options)}
        options = {name: value for name, value in flags.items() if name in known}
        options.update(parse_params(option))
        config = RepairConfig(
            method=method,
            training=training,
            lam=lam_value,
            options=options,
            variant=variant,
            teacher=teacher_model,
            teacher_name=str(teacher or ""),
            annotation=_annotation(teacher if spec.teacher == "annotates" else None, tau, quantile, annotation_method,
                                   batch_size, precision),
            cache_dir=cache_dir or out.parent / ".auditkit-cache",
            audit=None if audit_split == "none" else AuditConfig(
                methods=tuple(m for m in audit_methods.split(",") if m), precision=precision, seed=seed),
            audit_split=audit_split,
        )
        config.validate()
        check_data(dataset, config)  # fail in one line before any work is shown
        if context.is_main:
            console.print(f"repairing [bold]{checkpoint}[/bold] with {method} on {data} "
                          f"({describe(device, precision)}, seed {seed})")

        def report(record) -> None:
            if context.is_main:
                console.print(f"  epoch {record.epoch}: task loss {record.task_loss:.4f}, {method} loss "
                              f"{record.explanation_loss:.4g}, train accuracy {record.accuracy:.3f} ({record.seconds:.1f} s)")

        result = run_repair(model, dataset, config, state_path=state_path, resume=resume, context=context,
                            show_progress=not quiet, on_epoch=report)
        if context.is_main:
            provenance = {"input": str(checkpoint), "data": data, "teacher": str(teacher) if teacher else None}
            summary = {"method": method, **provenance, "data_fingerprint": dataset.fingerprint(), **result.summary()}
            path = save_checkpoint(result.model.cpu(), out, extra={"repair": summary}, overwrite=True)
            if result.sweep:
                table = Table("lambda", "val loss", "val accuracy")
                for row in result.sweep:
                    table.add_row(f"{row['lambda']:g}", f"{row['val_loss']:.4f}", f"{row['val_accuracy']:.3f}")
                console.print(table)
                console.print(f"chose lambda = {result.lam:g} (lowest validation loss on permuted/counterfactual data)")
            if result.annotation:
                a = result.annotation
                console.print(f"teacher masks cover {a['mean_mask_area']:.1%} of the pixels; against ground truth: "
                              f"recall {a['recall'] if a['recall'] is None else round(a['recall'], 3)}, "
                              f"precision {a['precision'] if a['precision'] is None else round(a['precision'], 3)}")
            document = {**result.document, "checkpoint": str(path), **provenance}
            write_json(out.with_name(out.name + ".audit.json"), document)
            if result.before is not None and result.after is not None:
                page = render_comparison_html(result.before.data, result.after.data, title=f"Repair with {method}")
                atomic_write_text(out.with_name(out.name + ".audit.html"), page, overwrite=True)
                table = Table("", "verdict", *result.after.data["task"]["per_variant"].keys())
                for label, audit in (("before", result.before), ("after", result.after)):
                    table.add_row(label, audit.verdict, *(f"{v['value']:.3f}" for v in audit.data["task"]["per_variant"].values()))
                console.print(table)
            console.print(f"repaired checkpoint: [bold]{path}[/bold]; proof: {out.name}.audit.json / .audit.html")
            write_json(json_path, document)
    finally:
        distributed.finish(context)


@handles_errors
def annotate(
    teacher: Annotated[Path, typer.Option("--teacher", help="Teacher checkpoint.")],
    data: Annotated[str, typer.Option("--data", help="Dataset to annotate.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the annotated dataset (images + masks).")],
    split: Annotated[str, typer.Option(help="Split to annotate ('all' for every sample).")] = "train",
    variant: Annotated[Optional[str], typer.Option(help="Variant to annotate (default: all).")] = None,
    tau: TauOption = None,
    quantile: QuantileOption = None,
    method: AnnotationMethodOption = "gradient",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 128,
    trust_pickle: TrustPickleOption = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    force: ForceOption = False,
    json_path: JsonOption = None,
) -> None:
    """Write teacher masks (TAP §4.2) for a dataset: 1 where the teacher's saliency is low.

    The output is a dataset folder (`--data OUT` for `auditkit repair`); precision and recall against the
    data's own masks are printed when it has them (TAP Fig. 8).

    Example: auditkit annotate --teacher teacher.safetensors --data builtin:decoy-mnist --tau 0.1 --out masks
    """
    from rich.console import Console

    from ..data import open_dataset, write_dataset
    from ..repair import annotate as annotate_dataset
    from ..device import resolve_device, resolve_precision
    from ..training import align_dataset_to_model

    target = resolve_device(device)
    config = _annotation(teacher, tau, quantile, method, batch_size, resolve_precision(precision, target))
    model = load(teacher, None, trust_pickle).to(target)
    dataset = align_dataset_to_model(
        open_dataset(data, split=None if split == "all" else split, variant=variant), model)
    annotated, stats = annotate_dataset(model, dataset, config, teacher_fingerprint=str(teacher))
    annotated.info.generator = {**dataset.info.generator, "annotation": stats}
    folder = write_dataset(annotated, out, overwrite=force)
    recall = "n/a" if stats["recall"] is None else f"{stats['recall']:.3f}"
    mask_precision = "n/a" if stats["precision"] is None else f"{stats['precision']:.3f}"
    Console().print(f"teacher masks for {len(annotated)} images -> [bold]{folder}[/bold]; they cover "
                    f"{stats['mean_mask_area']:.1%} of the pixels; against the data's masks: recall {recall}, "
                    f"precision {mask_precision}")
    write_json(json_path, {"out": str(folder), **stats})


def register(app: typer.Typer) -> None:
    app.command("repair")(repair)
    app.command("annotate")(annotate)
