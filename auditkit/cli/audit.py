"""`auditkit audit`: does a checkpoint rely on the annotated signal? Terminal, JSON, HTML, exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    ClassesOption,
    DeviceOption,
    JsonOption,
    NormalizeOption,
    OutputOption,
    PrecisionOption,
    SeedOption,
    handles_errors,
    write_json,
)
from .checkpoints import ArchOption, TrustPickleOption, load, model_data


@handles_errors
def audit(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors or .pt checkpoint.")],
    data: Annotated[str, typer.Option("--data", help="Dataset with masks and/or variants (folder, csv, npz, builtin:NAME).")],
    split: Annotated[str, typer.Option(help="Split to audit ('all' for every sample).")] = "test",
    methods: Annotated[
        str, typer.Option(help="Comma-separated attribution methods for localisation.")
    ] = "gradcam,lrp_epsilon,gradient",
    report_dir: Annotated[
        Optional[Path], typer.Option("--report-dir", help="Write report.json and report.html here.")
    ] = None,
    json_path: JsonOption = None,
    classes: ClassesOption = None,
    fail_on_shortcut: Annotated[
        bool, typer.Option("--fail-on-shortcut",
                           help="Exit 1 when the verdict is 'reliant', 3 when nothing could be tested (for CI gates)."),
    ] = False,
    task: Annotated[str, typer.Option(help="auto, multiclass (accuracy), binary (F-score) or ordinal (MAE).")] = "auto",
    positive_class: Annotated[
        Optional[str],
        typer.Option("--positive-class", help="Binary task: the class (name or index) whose F-score is scored; "
                                              "default: the minority class of the audited split."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 128,
    counterfactuals: Annotated[
        bool, typer.Option("--counterfactuals/--no-counterfactuals", help="Swap and removal tests on masked samples.")
    ] = True,
    degradation_threshold: Annotated[float, typer.Option(help="Δ-metric that counts as reliance.")] = 0.05,
    flip_threshold: Annotated[float, typer.Option(help="Swap flip rate that counts as reliance.")] = 0.10,
    removal_threshold: Annotated[float, typer.Option(help="Metric drop on removal that counts as reliance.")] = 0.05,
    confidence: Annotated[float, typer.Option(help="Confidence level of the bootstrap intervals.")] = 0.95,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    layers: Annotated[Optional[str], typer.Option(help="Layers for the activation share (default: TAP targets).")] = None,
    epsilon: Annotated[float, typer.Option(help="LRP-epsilon stabiliser for the audit's maps.")] = 0.01,
    examples: Annotated[
        int, typer.Option(help="Example pictures kept in the report: this many correct and wrong predictions per variant.")
    ] = 8,
    arch: ArchOption = None,
    normalize: NormalizeOption = None,
    output: OutputOption = None,
    trust_pickle: TrustPickleOption = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    seed: SeedOption = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Measure a checkpoint's reliance on a suspected spurious signal and report the evidence.

    Data without masks and without variants (nothing to compare against) is audited by discovery
    instead (see `auditkit discover`): the report is then the discovery's, and --fail-on-shortcut
    exits 1 when it finds a shortcut.

    Exit codes: 0 done (1 with --fail-on-shortcut and a 'reliant' verdict; 3 with --fail-on-shortcut when no
    behavioural test could run, e.g. every mask empty: a gate cannot pass what it did not test), 2 bad input.
    Under `torchrun --nproc_per_node N -m auditkit audit ...` the work is sharded over N processes.

    Example: auditkit audit shortcut.safetensors --data builtin:decoy-mnist --report-dir audit --fail-on-shortcut
    """
    from .. import distributed
    from ..audit import AuditConfig, Thresholds, print_summary, run_audit, write_html
    from ..models import resolve_layers
    from ..device import resolve_device, resolve_precision

    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    context = distributed.init_from_environment(device)
    try:
        model = load(checkpoint, arch, trust_pickle, normalize=normalize, output=output).to(device)
        dataset = model_data(data, model, split=None if split == "all" else split, classes=classes)
        if not dataset.has_masks and len(dataset.variants) == 1:
            # Nothing to compare against: find the shortcut instead of answering "inconclusive".
            code = _discover_instead(model, dataset, data, checkpoint, report_dir, json_path, fail_on_shortcut, context,
                                     batch_size=batch_size, epsilon=epsilon, device=str(device), precision=precision,
                                     seed=seed, bootstrap=bootstrap, confidence=confidence, quiet=quiet)
            raise typer.Exit(code)
        config = AuditConfig(
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
            task=task,
            positive_class=positive_class,
            thresholds=Thresholds(degradation_threshold, flip_threshold, removal_threshold),
            batch_size=batch_size,
            device=str(device),
            precision=precision,
            seed=seed,
            bootstrap=bootstrap,
            confidence=confidence,
            counterfactuals=counterfactuals,
            epsilon=epsilon,
            examples=examples,
            layers=tuple(resolve_layers(model, layers.split(","))) if layers else None,
        )
        report = run_audit(model, dataset, config, context=context, show_progress=not quiet,
                           data_spec=data, checkpoint=str(checkpoint))
        if context.is_main:
            if json_path is None or str(json_path) != "-":
                print_summary(report)
            if report_dir is not None:
                write_json(report_dir / "report.json", report.data)
                html_path = write_html(report.data, report_dir / "report.html")
                typer.echo(f"report: {report_dir / 'report.json'} and {html_path}")
            write_json(json_path, report.data)
    finally:
        distributed.finish(context)
    code = report.exit_code(fail_on_shortcut)
    if code == 3 and context.is_main:
        what = "no test can tell" if report.data["verdict"].get("constant_prediction") else "nothing was tested"
        typer.echo(f"error: --fail-on-shortcut: {what}: {report.data['verdict']['summary']}", err=True)
    raise typer.Exit(code)


def _discover_instead(model, dataset, data, checkpoint, report_dir, json_path, fail_on_shortcut, context, *, quiet,
                      **settings) -> int:
    """The audit of data without masks or variants: discovery (auditkit.discover), same outputs."""
    from .._io import atomic_write_text
    from ..discover import DiscoveryConfig, run_discovery
    from ..discover.html import render_discovery_html
    from ..discover.summary import print_discovery

    if context.is_main and (json_path is None or str(json_path) != "-"):
        typer.echo("no masks and no variants to compare: running discovery (as `auditkit discover` does)")
    report = run_discovery(model, dataset, DiscoveryConfig(**settings), context=context, show_progress=not quiet,
                           data_spec=data, checkpoint=str(checkpoint), out_dir="discovered")
    recommendation = report.data["recommendation"]
    if recommendation["method"] == "auto":  # the masks are written by `auditkit discover`, not by the audit
        recommendation["command"] = (f"auditkit discover {checkpoint} --data {data} --out discovered && "
                                     + recommendation["command"])
    if context.is_main:
        if json_path is None or str(json_path) != "-":
            print_discovery(report.data)
        if report_dir is not None:
            write_json(report_dir / "report.json", report.data)
            html_path = atomic_write_text(report_dir / "report.html", render_discovery_html(report.data), overwrite=True)
            typer.echo(f"report: {report_dir / 'report.json'} and {html_path}")
        write_json(json_path, report.data)
    code = report.exit_code(fail_on_shortcut)
    if code == 3 and context.is_main:
        from ..discover.summary import untested_line

        typer.echo(f"error: --fail-on-shortcut: {untested_line(report.data)}", err=True)
    return code


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
