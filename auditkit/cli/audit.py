"""`auditkit audit`: does a checkpoint rely on the annotated signal? Terminal, JSON, HTML, exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    EPSILON_HELP_AUDIT,
    ClassesOption,
    FindingsOption,
    MasksMarkOption,
    DeviceOption,
    HeadOption,
    JsonOption,
    NormalizeOption,
    OutputOption,
    PrecisionOption,
    SeedOption,
    handles_errors,
    write_json,
)
from .checkpoints import ArchOption, TrustPickleOption


@handles_errors
def audit(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors or .pt checkpoint.")],
    data: Annotated[
        str, typer.Option("--data", help="Dataset with masks and/or variants (folder, csv, npz, builtin:NAME).")
    ],
    split: Annotated[str, typer.Option(help="Split to audit ('all' for every sample).")] = "test",
    methods: Annotated[
        str, typer.Option(help="Comma-separated attribution methods for localisation.")
    ] = "gradcam,lrp_epsilon,gradient",
    report_dir: Annotated[
        Optional[Path], typer.Option("--report-dir", help="Write report.json and report.html here.")
    ] = None,
    json_path: JsonOption = None,
    classes: ClassesOption = None,
    findings: FindingsOption = None,
    masks_mark: MasksMarkOption = None,
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
    layers: Annotated[
        Optional[str], typer.Option(help="Layers for the activation share (default: TAP targets).")
    ] = None,
    epsilon: Annotated[Optional[float], typer.Option(help=EPSILON_HELP_AUDIT)] = None,
    examples: Annotated[
        int, typer.Option(help="Example pictures kept in the report: this many correct and wrong predictions per "
                               "variant.")
    ] = 8,
    arch: ArchOption = None,
    normalize: NormalizeOption = None,
    output: OutputOption = None,
    head: HeadOption = None,
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
    from ..audit import AuditConfig, Thresholds, print_summary
    from ..discover.fallback import CheckpointAudit, audit_checkpoint
    from ..discover.summary import print_discovery, untested_line
    from ..models.loading import ReadOptions

    config = AuditConfig(
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()), task=task, positive_class=positive_class,
        thresholds=Thresholds(degradation_threshold, flip_threshold, removal_threshold), batch_size=batch_size,
        seed=seed, bootstrap=bootstrap, confidence=confidence, counterfactuals=counterfactuals, examples=examples,
        layers=tuple(layers.split(",")) if layers else None,
        **({"epsilon": epsilon} if epsilon is not None else {}),  # unset: the library's default
    )
    to_stdout = json_path is not None and str(json_path) == "-"

    def discovering() -> None:
        if not to_stdout:
            typer.echo("no masks and no variants to compare: running discovery (as `auditkit discover` does)")

    done = audit_checkpoint(
        CheckpointAudit(checkpoint, data, split=None if split == "all" else split, config=config,
                        reading=ReadOptions(arch, trust_pickle, normalize, output, head=head), classes=classes,
                        findings=findings, mask_meaning=masks_mark, report_dir=report_dir, device=device,
                        precision=precision),
        show_progress=not quiet, on_discovery=discovering)
    if done.is_main:
        if not to_stdout and done.kind == "discovery":
            print_discovery(done.data)
        elif not to_stdout:
            print_summary(done.report)
        if done.report_files is not None:
            typer.echo(f"report: {done.report_files[0]} and {done.report_files[1]}")
        write_json(json_path, done.data)
    code = done.exit_code(fail_on_shortcut)
    if code == 3 and done.is_main:
        if done.kind == "discovery":
            typer.echo(f"error: --fail-on-shortcut: {untested_line(done.data)}", err=True)
        else:
            verdict = done.data["verdict"]
            degenerate = verdict.get("constant_prediction") or verdict.get("at_chance") or verdict.get("degenerate")
            what = "no test can tell" if degenerate else "nothing was tested"
            typer.echo(f"error: --fail-on-shortcut: {what}: {verdict['summary']}", err=True)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
