"""`auditkit models`: the architectures auditkit can build, with their TAP and Grad-CAM layers."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._common import JsonOption, handles_errors, write_json


@handles_errors
def models(
    name: Annotated[Optional[str], typer.Argument(
        help="One architecture or a Hugging Face / timm model folder: its layers, found by a probe pass.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Also list every torchvision classification CNN.")] = False,
    json_path: JsonOption = None,
) -> None:
    """List the architectures with the layers TAP targets and the Grad-CAM layer.

    Any torchvision classification CNN, timm:NAME and package.module:factory work too; their layers are
    found by one probe forward pass (the outputs of the network's stages, one per resolution).

    Example: auditkit models timm:convnext_atto (or auditkit models my-vit-folder/)
    """
    from rich.console import Console
    from rich.table import Table

    from ..models import ARCHITECTURES, get_arch
    from ..models.zoo import found_presets, torchvision_classifiers

    rows = []
    from ..models.folders import is_model_folder

    if name is not None and is_model_folder(name):  # a Hugging Face or timm model folder: its own network
        from ..models.folders import load_folder

        model = load_folder(name)
        rows.append({"architecture": model.meta.arch, "source": model.folder.kind,
                     "tap_layers": list(model.meta.target_layers), "gradcam_layer": model.meta.gradcam_layer,
                     "notes": model.folder.describe()})
    elif name is not None:
        spec = get_arch(name)
        tap, gradcam = spec.tap_layers, spec.gradcam_layer
        if tap is None or gradcam is None:
            found = found_presets(spec.name, spec.build(3, 10), 3)
            tap, gradcam = found.tap_layers, found.gradcam_layer
        rows.append({"architecture": spec.name, "source": spec.source, "tap_layers": list(tap),
                     "gradcam_layer": gradcam, "notes": spec.description})
    else:
        for arch, spec in ARCHITECTURES.items():
            rows.append({"architecture": arch, "source": spec.source, "tap_layers": list(spec.tap_layers),
                         "gradcam_layer": spec.gradcam_layer, "notes": spec.description})
        if all_:
            rows += [{"architecture": arch, "source": "torchvision", "tap_layers": None, "gradcam_layer": None,
                      "notes": "presets found when built (auditkit models NAME shows them)"}
                     for arch in torchvision_classifiers() if arch not in ARCHITECTURES]
    if json_path is not None and str(json_path) == "-":
        write_json(json_path, rows)
        return
    table = Table("architecture", "TAP targets", "Grad-CAM layer", "notes")
    for row in rows:
        table.add_row(row["architecture"], ", ".join(row["tap_layers"]) if row["tap_layers"] else "(found when built)",
                      row["gradcam_layer"] or "", row["notes"])
    Console().print(table)
    if name is None:
        Console().print("Also: every torchvision classification CNN (--all), timm:NAME, package.module:factory.")
    write_json(json_path, rows)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
