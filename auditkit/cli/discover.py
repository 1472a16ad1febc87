"""`auditkit discover`: find a model's shortcuts without masks; write the data with proposed masks."""

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
    OutputOption,
    PrecisionOption,
    QuietOption,
    SeedOption,
    handles_errors,
    write_json,
)
from .checkpoints import ArchOption, TrustPickleOption, load, model_data


@handles_errors
def discover(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors or .pt checkpoint.")],
    data: Annotated[str, typer.Option(
        "--data", help="Labelled images; no masks or variants needed (folder, csv, npz, builtin:NAME).")],
    out: Annotated[Path, typer.Option(
        "--out", help="Folder to write: the data with the proposed masks (manifest.csv), discovery.json, "
                      "discovery.html.")],
    split: Annotated[str, typer.Option(
        help="Split to analyse ('all': every split, so the repair finds train and val masks).")] = "all",
    variant: Annotated[str | None, typer.Option(
        help="Variant to analyse when the data has several (default: contaminated, else original, else the "
             "first).")] = None,
    json_path: JsonOption = None,
    classes: ClassesOption = None,
    masks_mark: MasksMarkOption = None,
    fail_on_shortcut: Annotated[bool, typer.Option(
        "--fail-on-shortcut", help="Exit 1 when a shortcut is found, 3 when none was found but candidates went "
                                   "untested (a limit), 0 when none.")] = False,
    probe_drop: Annotated[float, typer.Option(
        help="Accuracy drop under a colour or low-pass probe that counts as a global shortcut.")] = 0.10,
    max_area: Annotated[float, typer.Option(
        help="Largest share of the image a candidate region may cover (0.5: above it no control region of its size "
             "fits beside it). Clusters above it are listed as not tested.")] = 0.5,
    min_cluster: Annotated[int, typer.Option(
        help="Smallest strategy cluster (images) causally tested; smaller ones are listed as not tested.")] = 10,
    max_clusters: Annotated[int, typer.Option(help="Most strategy clusters per class.")] = 8,
    max_tested: Annotated[int, typer.Option(
        help="Images per candidate in the causal test (a seeded sample; the masks come from finding the "
             "confirmed artefact on every image).")] = 200,
    effect_threshold: Annotated[float, typer.Option(
        help="Effect beyond the control region (share of images) that counts.")] = 0.10,
    probe_samples: Annotated[int, typer.Option(help="Images the global probes edit.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 128,
    epsilon: Annotated[Optional[float], typer.Option(help=EPSILON_HELP_AUDIT)] = None,
    arch: ArchOption = None,
    normalize: NormalizeOption = None,
    output: OutputOption = None,
    trust_pickle: TrustPickleOption = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    seed: SeedOption = 0,
    force: ForceOption = False,
    quiet: QuietOption = False,
) -> None:
    """Find a model's shortcuts without masks; propose masks and the repair.

    Strategy clusters of the LRP heatmaps (SpRAy), candidate regions tested causally against a control
    region of the same area, global probes (colour, texture, frequency), and the next command. OUT is a
    dataset with the proposed masks that `auditkit repair --data OUT` reads unchanged.

    Every limit that kept a cluster from the causal test (--min-cluster, --max-area, ...) is listed with
    its count and flag in the summary, discovery.json ("limits", "skipped") and the page; then the
    verdict is "no shortcut among the tested candidates", never "no shortcut found".

    Exit codes: 0 done (1 with --fail-on-shortcut when a shortcut is found), 2 bad input.
    Under `torchrun --nproc_per_node N -m auditkit discover ...` the LRP pass is sharded over N processes.

    Example: auditkit discover shortcut.safetensors --data my-images/ --out discovered
    """
    from .. import distributed
    from .._io import atomic_write_text
    from ..data import write_dataset
    from ..device import resolve_device, resolve_precision
    from ..discover import DiscoveryConfig, proposed_dataset, run_discovery
    from ..discover.html import render_discovery_html
    from ..discover.summary import print_discovery
    from ..errors import AuditkitError

    if out.exists() and not force:
        raise AuditkitError(f"{out} already exists; choose another --out or pass --force to replace it")
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    context = distributed.init_from_environment(device)
    try:
        model = load(checkpoint, arch, trust_pickle, normalize=normalize, output=output).to(device)
        dataset = model_data(data, model, split=None if split == "all" else split, classes=classes,
                             mask_meaning=masks_mark)
        dataset = analysed_variant(dataset, variant)
        given = {"epsilon": epsilon} if epsilon is not None else {}  # unset: the library's default
        config = DiscoveryConfig(**given, batch_size=batch_size, device=device, precision=precision, seed=seed,
                                 max_area=max_area, effect_threshold=effect_threshold, probe_samples=probe_samples,
                                 probe_drop=probe_drop, min_cluster=min_cluster, max_clusters=max_clusters,
                                 max_tested=max_tested)
        report = run_discovery(model, dataset, config, context=context, show_progress=not quiet, data_spec=data,
                               checkpoint=str(checkpoint), out_dir=str(out))
        if context.is_main:
            proposed = proposed_dataset(dataset, report)
            masked = sum(record.mask is not None for record in proposed.records)
            write_dataset(proposed, out, overwrite=force)
            write_json(out / "discovery.json", report.data)
            atomic_write_text(out / "discovery.html", render_discovery_html(report.data), overwrite=True)
            if json_path is None or str(json_path) != "-":
                print_discovery(report.data)
                typer.echo(f"written: {out} (data with {masked} proposed masks; {len(proposed) - masked} images have "
                           f"no proposed region and no mask), {out / 'discovery.json'}, {out / 'discovery.html'}")
            write_json(json_path, report.data)
    finally:
        distributed.finish(context)
    code = report.exit_code(fail_on_shortcut)
    if code == 3 and context.is_main:
        from ..discover.summary import untested_line

        typer.echo(f"error: --fail-on-shortcut: {untested_line(report.data)}", err=True)
    raise typer.Exit(code)


def analysed_variant(dataset, variant: str | None):
    """The one variant discovery looks at: ``variant``, else contaminated, else original, else the first."""
    if variant is None:
        variants = dataset.variants
        variant = next((v for v in ("contaminated", "original") if v in variants), variants[0] if variants else None)
    return dataset.select(variant=variant) if variant is not None else dataset


def register(app: typer.Typer) -> None:
    app.command("discover")(discover)
