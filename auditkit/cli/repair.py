"""`auditkit repair` (fine-tune away a shortcut, then prove it) and `auditkit annotate` (teacher masks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    EPSILON_HELP_AUDIT,
    ClassesOption,
    MasksMarkOption,
    DeviceOption,
    ForceOption,
    JsonOption,
    NormalizeOption,
    HeadOption,
    OutputOption,
    PrecisionOption,
    QuietOption,
    SeedOption,
    fail,
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
    Optional[float],
    typer.Option("--quantile", help="Teacher masks: the fraction q of least salient pixels instead of --tau."),
]
AnnotationMethodOption = Annotated[
    str, typer.Option("--annotation-method", help="Teacher saliency: gradient (default), lrp_epsilon, gradcam, ...")
]


@handles_errors
def repair(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint to repair (never modified).")],
    data: Annotated[
        str, typer.Option("--data", help="Dataset with train/val/test splits (and masks for tap/rrr/energy).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The repaired checkpoint to write (.safetensors or .pt).")],
    method: Annotated[str, typer.Option(help="tap, tea, rrr, energy, masktune, or auto: try them in order of cost "
                                               "until one leaves the model not reliant on validation data.")] = "tap",
    lam: Annotated[
        str, typer.Option("--lambda", help="Weight of the explanation loss: a number, or auto (sweep). Default: TAP "
                                           "0.1 (0.01 with teacher masks, 1 on a vision transformer), RRR, Energy, "
                                           "TEA 1.")
    ] = "default",
    epochs: Annotated[
        Optional[int], typer.Option(help="Epochs (default: TAP, RRR, Energy 3; TEA 30; MaskTune 1).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    shift: Annotated[
        int, typer.Option(help="Augment: translate each image, and its mask with it, by up to this many pixels "
                               "(small training splits; on decoy MNIST it made TAP on a ViT collapse, "
                               "docs/reproductions.md).")
    ] = 0,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    grad_clip: Annotated[
        Optional[float], typer.Option(help="Max gradient norm, 0 = off (default: 1 for TEA, RRR, Energy; off for TAP).")
    ] = None,
    schedule: Annotated[
        Optional[str], typer.Option(help="constant or cosine learning rate (default: cosine for TEA, else constant).")
    ] = None,
    layers: Annotated[
        Optional[str], typer.Option(help="TAP: comma-separated layers (default: the arch's preset).")
    ] = None,
    kernel_size: Annotated[int, typer.Option(help="TAP: max-pool size κ of the mask downscaling (Eq. 7).")] = 3,
    dilation: Annotated[
        Optional[str],
        typer.Option(help="TAP: how the mask's dilation grows with depth: fixed (κ at every layer, Eq. 7), receptive "
                          "(each layer's receptive field), cumulative (the TAP authors' code) or auto (receptive when "
                          "the receptive fields fit in the image, else fixed). Default: auto; swept with "
                          "--lambda auto."),
    ] = None,
    teacher: TeacherOption = None,
    tau: TauOption = None,
    quantile: QuantileOption = None,
    annotation_method: AnnotationMethodOption = "gradient",
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache for teacher masks (default: beside --out).")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="TEA: " + EPSILON_HELP_AUDIT)] = None,
    tea_class: Annotated[
        str, typer.Option(help="TEA: explain the teacher's most likely classes or random logits.")
    ] = "teacher",
    tea_classes: Annotated[
        int, typer.Option(help="TEA: classes explained per image (the teacher's top K, or K random ones).")
    ] = 1,
    task_weight: Annotated[float, typer.Option(help="TEA: weight of the task loss (0 = explanations alone).")] = 0.0,
    distill_weight: Annotated[
        float, typer.Option(help="TEA: weight of distilling the teacher's class probabilities (0 = heatmaps alone).")
    ] = 1.0,
    temperature: Annotated[float, typer.Option(help="TEA: distillation temperature.")] = 1.0,
    option: Annotated[
        list[str],
        typer.Option("--option", "-o", help="A method option KEY=VALUE (e.g. -o sigmas=3 for masktune); repeatable."),
    ] = [],
    variant: Annotated[Optional[str], typer.Option(help="Training variant (default: contaminated).")] = None,
    audit_split: Annotated[str, typer.Option(help="Split audited before and after ('none' to skip).")] = "test",
    audit_methods: Annotated[str, typer.Option(help="Attribution methods of the audits.")] = "lrp_epsilon,gradient",
    fail_on_shortcut: Annotated[
        bool, typer.Option("--fail-on-shortcut", help="Exit 1 when the repaired model still relies on the signal "
                                                      "(behavioural audit of the validation split).")
    ] = False,
    max_accuracy_drop: Annotated[
        float, typer.Option(help="--method auto and --fail-on-shortcut: the most validation accuracy a repair may "
                                 "lose, judged on the accuracy the shortcut did not give (clean, else permuted, "
                                 "else mask-removed, else contaminated; a collapsed model is also 'not reliant').")
    ] = 0.03,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its saved state.")] = False,
    arch: ArchOption = None,
    normalize: NormalizeOption = None,
    output: OutputOption = None,
    head: HeadOption = None,
    trust_pickle: TrustPickleOption = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    seed: SeedOption = 0,
    force: ForceOption = False,
    json_path: JsonOption = None,
    classes: ClassesOption = None,
    masks_mark: MasksMarkOption = None,
    also_checkpoint: Annotated[
        Optional[Path], typer.Option(help="A model folder's repair: also write auditkit's own checkpoint here "
                                          "(.safetensors, .pt or .pth) beside the repaired folder.")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Fine-tune a checkpoint so it stops relying on the annotated signal, then audit before and after.

    Writes OUT, OUT's resumable state (OUT.state.pt, each epoch and on Ctrl-C) and the proof beside it:
    OUT.audit.json and OUT.audit.html. Under `torchrun` the training is data-parallel.

    With --method auto, TAP (λ and dilation swept), RRR, TEA (with --teacher, else a teacher trained by the
    one recipe when the data has a permuted or clean variant), Energy and MaskTune are tried in that order
    until one leaves the model not reliant on the validation split; every attempt is listed in the proof.
    With --fail-on-shortcut a repair that leaves the model reliant exits 1.

    Example: auditkit repair shortcut.safetensors --data builtin:decoy-mnist --method tap --out repaired.safetensors

    Example: auditkit repair shortcut.pt --data builtin:marker-mnist --method auto --fail-on-shortcut --out repaired.pt
    """
    from rich.console import Console

    from ..models.loading import ReadOptions
    from ..repair.checkpoint import CheckpointRepair, repair_checkpoint

    request = CheckpointRepair(
        checkpoint, data, out, method=method, lam=_lambda(lam, method, resume),
        training={"epochs": epochs, "grad_clip": grad_clip, "schedule": schedule, "batch_size": batch_size,
                  "lr": lr, "optimizer": optimizer, "shift": shift},
        options={"kernel_size": kernel_size, "dilation": dilation, "epsilon": epsilon, "explained_class": tea_class,
                 "classes": tea_classes, "task_weight": task_weight, "distill_weight": distill_weight,
                 "temperature": temperature},
        method_options=parse_params(option), layers=tuple(layers.split(",")) if layers else None, teacher=teacher,
        tau=tau, quantile=quantile, annotation_method=annotation_method, cache_dir=cache_dir, variant=variant,
        audit_split=audit_split, audit_methods=tuple(m for m in audit_methods.split(",") if m),
        judge=fail_on_shortcut, max_accuracy_drop=max_accuracy_drop, resume=resume, overwrite=force,
        classes=classes, reading=ReadOptions(arch, trust_pickle, normalize, output, head=head), seed=seed,
        device=device, precision=precision, mask_meaning=masks_mark, also_checkpoint=also_checkpoint)
    console = Console()

    def attempt(row) -> None:
        trained = row.get("teacher", {}).get("source") == "trained"  # say so: it cost time and no --teacher was given
        teacher = f" (teacher trained by the recipe on the {row['teacher']['variant']} variant)" if trained else ""
        console.print(f"  attempt {row['method']}{teacher}: {row['verdict']} on validation data "
                      f"({_accuracies(row['val_accuracy'])}; {_guarded_change(row)}) in {row['seconds']:.0f} s")

    done = repair_checkpoint(request, show_progress=not quiet, on_attempt=attempt,
                             on_start=repair_start(console, checkpoint, method, data, seed),
                             on_epoch=repair_epoch(console, method))
    if not done.is_main:
        return
    print_repair(console, done, out, json_path)
    if method == "auto" and not done.still_reliant:
        guarded = done.document["auto"]["guarded"]
        console.print(f"auto: kept {done.document['auto']['chosen']}, the first method that left the model not "
                      f"reliant on the validation data within {max_accuracy_drop:g} {guarded['accuracy']} accuracy "
                      f"(guarded because {guarded['why']})")
    if done.still_reliant and (fail_on_shortcut or method == "auto"):
        line = _still_reliant_line(done.document, method, method)
        if fail_on_shortcut:
            fail(line, code=1)  # the repair ran; its result is the failure (exit 1, as audit's)
        console.print(f"[yellow]{line}[/yellow]")


def _lambda(lam: str, method: str, resume: bool):
    """--lambda as the library takes it, and the flags that cannot go with --method auto, in the
    command's own words."""
    from ..errors import AuditkitError

    if method == "auto" and lam != "default":
        raise AuditkitError("--lambda cannot be given with --method auto: auto chooses each method's lambda")
    if method == "auto" and resume:
        raise AuditkitError("--resume does not apply to --method auto; run it again without --resume")
    try:
        return lam if lam in ("auto", "default") else float(lam)
    except ValueError as error:
        raise AuditkitError(f"--lambda must be a number or auto; got {lam!r}") from error


def repair_start(console, checkpoint, method: str, data: str, seed: int):
    """The line that opens a repair (repair_checkpoint's on_start)."""
    from ..device import describe

    def start(where, precision) -> None:
        console.print(f"repairing [bold]{checkpoint}[/bold] with {method} on {data} "
                      f"({describe(where, precision)}, seed {seed})")

    return start


def repair_epoch(console, method: str):
    """One line per epoch of a repair (repair_checkpoint's on_epoch)."""

    def report(record) -> None:
        console.print(f"  epoch {record.epoch}: task loss {record.task_loss:.4f}, {method} loss "
                      f"{record.explanation_loss:.4g}, train accuracy {record.accuracy:.3f} ({record.seconds:.1f} s)")

    return report


def print_repair(console, done, out: Path, json_path) -> None:
    """The sweep, the teacher masks' quality, the before/after audits, where the files are; --json."""
    from rich.table import Table

    result = done.result
    if result.sweep:
        swept = [k for k in result.sweep[0] if k not in ("lambda", "round", "val_loss", "val_accuracy")]
        table = Table("round", "lambda", *swept, "val accuracy", "val loss")
        for row in result.sweep:
            table.add_row(str(row["round"]), f"{row['lambda']:g}", *(str(row[k]) for k in swept),
                          f"{row['val_accuracy']:.3f}", f"{row['val_loss']:.4f}")
        console.print(table)
        chosen = "".join(f", {k} = {result.document['options'][k]}" for k in swept)
        console.print(f"chose lambda = {result.lam:g}{chosen} (highest accuracy on permuted/counterfactual "
                      "validation data, then lowest loss)")
    if result.annotation:
        a = result.annotation
        console.print(f"teacher masks cover {a['mean_mask_area']:.1%} of the pixels; against ground truth: "
                      f"recall {a['recall'] if a['recall'] is None else round(a['recall'], 3)}, "
                      f"precision {a['precision'] if a['precision'] is None else round(a['precision'], 3)}")
    if result.before is not None and result.after is not None:
        multilabel = result.after.data.get("findings") is not None
        table = Table("mean AUROC" if multilabel else "", "verdict", *result.after.data["task"]["per_variant"].keys())
        for label, audit in (("before", result.before), ("after", result.after)):
            table.add_row(label, audit.verdict, *("–" if v["value"] is None else f"{v['value']:.3f}"
                                                   for v in audit.data["task"]["per_variant"].values()))
        console.print(table)
        if multilabel:  # per finding: the verdict and the AUROC per variant, before -> after
            findings = Table("finding", "before", "after", *result.after.data["task"]["per_variant"].keys())
            before = {e["name"]: e for e in result.before.data["findings"]}
            for entry in result.after.data["findings"]:
                was = before.get(entry["name"], {}).get("per_variant", {})
                findings.add_row(entry["name"], before.get(entry["name"], {}).get("verdict", "–"), entry["verdict"],
                                 *(f"{_auroc(was.get(v))} -> {_auroc(m)}" for v, m in entry["per_variant"].items()))
            console.print(findings)
    console.print(f"repaired checkpoint: [bold]{done.path}[/bold]; proof: {out.name}.audit.json / .audit.html")
    write_json(json_path, done.document)


def _auroc(measured: dict | None) -> str:
    value = None if measured is None else measured["auroc"]["value"]
    return "–" if value is None else f"{value:.3f}"


def _accuracies(accuracy: dict) -> str:
    return ", ".join(f"{k} {'n/a' if v is None else format(v, '.3f')}" for k, v in accuracy.items())


def _guarded_change(row: dict) -> str:
    """'clean accuracy +0.120': the change of the accuracy the success rule guards (auto.guarded_accuracy)."""
    measure = row["guarded"]["accuracy"]
    what = "AUROC of the worst finding" if "finding_drops" in row else "accuracy"  # multilabel: per finding
    if row["accuracy_drop"] is None:
        return f"{measure} {what} not measured"
    return f"{measure} {what} {-row['accuracy_drop']:+.3f}"


def _still_reliant_line(document: dict, method: str, name: str) -> str:
    """One line: the repair did not remove the shortcut, its numbers, and what to try next."""
    if method == "auto":
        tried = [a for a in document["attempts"] if "skipped" not in a]
        numbers = "; ".join(f"{a['method']}: {a['verdict']}, {_accuracies(a['val_accuracy'])}" for a in tried)
        guarded = document["auto"]["guarded"]["accuracy"]
        return (f"no method left the model not reliant within the allowed {guarded} accuracy drop ({numbers}); kept "
                f"{document['auto']['chosen']}, the best on validation data. Try more epochs, a teacher (--teacher) "
                "for TEA, or masks that cover the signal")
    decision = document["decision"]
    accuracy = _accuracies(decision["val_accuracy"])
    hint = {"tap": "try --lambda auto (it sweeps λ and the dilation) or --method auto"}.get(
        name, "try --lambda auto or --method auto")
    if decision["verdict"] == "not reliant":  # not reliant, but it paid too much accuracy for it
        guarded = decision["guarded"]
        if decision["accuracy_drop"] is None:
            return (f"the repair cannot be judged: no {guarded['accuracy']} validation accuracy was measured "
                    f"({name}; validation accuracy {accuracy})")
        return (f"the repair lost {decision['accuracy_drop']:.3f} {guarded['accuracy']} validation accuracy "
                f"(more than --max-accuracy-drop, guarded because {guarded['why']}; {name}; validation accuracy "
                f"{accuracy}): {hint}")
    if decision["verdict"] == "inconclusive":
        return (f"the repair cannot be shown to work: the validation audit is inconclusive (e.g. a collapsed model "
                f"that predicts one class; {name}; validation accuracy {accuracy}): {hint}")
    return f"the repaired model still relies on the signal ({name}; validation accuracy {accuracy}): {hint}"



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
    classes: ClassesOption = None,
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
    from ..repair.checkpoint import annotation_config
    from ..training import align_dataset_to_model

    target = resolve_device(device)
    config = annotation_config(True, tau, quantile, method, batch_size, resolve_precision(precision, target))
    model = load(teacher, None, trust_pickle).to(target)
    dataset = align_dataset_to_model(
        open_dataset(data, split=None if split == "all" else split, variant=variant, classes=classes), model)
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
