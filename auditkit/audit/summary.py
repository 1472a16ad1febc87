"""The audit's readable terminal summary (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from .html import masks_mark
from .metrics import HOW_CHOSEN

COLOURS = {"reliant": "red", "not reliant": "green", "inconclusive": "yellow"}


def _interval(entry: dict) -> str:
    if entry["value"] is None:
        return f"– ({entry['reason']})" if entry.get("reason") else "–"
    low, high = entry["ci"]
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def print_summary(report, console: Console | None = None) -> None:
    console = console or Console()
    data = report.data
    verdict = data["verdict"]
    colour = COLOURS[verdict["label"]]
    console.print(Panel(f"[bold {colour}]{verdict['label'].upper()}[/bold {colour}]  {verdict['summary']}",
                        title=f"audit of {data['checkpoint']['path'] or data['checkpoint']['arch']}"))
    if data.get("findings") is not None:  # a multilabel model: one row per finding and variant
        _print_findings(data, console)
        return
    metric = data["task"].get("metric_label", data["task"]["metric"])  # reports before issue 29 lack the label
    positive = data["task"].get("positive_class")
    if positive:
        how = HOW_CHOSEN.get(positive["chosen"], positive["chosen"])
        console.print(escape(f"{metric}: the F-score of class {positive['name']!r} ({how}; {positive['count']} of "
                      f"{positive['of']} {positive['variant']} images)"))
    table = Table(f"variant ({data['data']['spec']})", f"{metric} [{int(data['config']['confidence'] * 100)}% CI]",
                  "samples")
    for variant, entry in data["task"]["per_variant"].items():
        table.add_row(variant, escape(_interval(entry)), str(entry["samples"]))
    console.print(table)
    evidence = Table("behavioural test", "value [CI]", "threshold", "finding")
    for e in verdict["evidence"]:
        style = {"shows reliance": "red", "clears": "green"}.get(e["finding"], "yellow")
        finding = f"not run: {e.get('reason') or 'no data'}" if e["finding"] == "not run" else e["finding"]
        evidence.add_row(e["test"], "–" if e["value"] is None else _interval(e), f"{e['threshold']:g}",
                         f"[{style}]{escape(finding)}[/{style}]")
    if verdict["evidence"]:
        console.print(evidence)
    marks = masks_mark(data)  # a high share in the object is good, in the artefact a shortcut
    localisation = Table("method", "variant", f"energy in mask ({marks}) [CI]", "chance", "top-25% recall", "IoU")
    for method, variants in data["localisation"].items():
        for variant, entry in variants.items():
            localisation.add_row(method, variant, _interval(entry["energy_in_mask"]),
                                 f"{entry['chance']['energy_in_mask']:.3f}", _interval(entry["top_quartile_recall"]),
                                 _interval(entry["iou"]))
    if any(data["localisation"].values()):  # a method with no masked variant has no rows
        console.print(localisation)
    if data["activation_share"]:
        shares = Table("targeted layer", f"activation inside the mask ({marks}) [CI]", "chance")
        for entry in data["activation_share"]:
            shares.add_row(entry["layer"], _interval(entry["share"]), f"{entry['chance']:.3f}")
        console.print(shares)


def _print_findings(data: dict, console: Console) -> None:
    """The per-finding tables of a multilabel audit: AUROC, sensitivity and specificity (at z > 0) per
    variant with their intervals, the gaps that decide, and each finding's verdict."""
    confidence = int(data["config"]["confidence"] * 100)
    console.print(escape(f"explained: {data.get('explained', 'each finding logit')}; threshold: probability 0.5"))
    table = Table("finding", "variant", f"AUROC [{confidence}% CI]", "sensitivity", "specificity", "positives")
    for entry in data["findings"]:
        for variant, values in entry["per_variant"].items():
            table.add_row(escape(entry["name"]), variant, escape(_interval(values["auroc"])),
                          escape(_interval(values["sensitivity"])), escape(_interval(values["specificity"])),
                          f"{values['positives']}/{values['samples']}")
    console.print(table)
    verdicts = Table("finding", "AUROC gap -> permuted", "AUROC gap -> clean", "subgroup gap (with - without)",
                     "verdict")
    for entry in data["findings"]:
        gaps = [escape(_interval(entry["auroc_gap"][v])) if v in entry["auroc_gap"] else "–"
                for v in ("permuted", "clean")]
        subgroup = escape(_interval(entry["subgroups"]["gap"])) if entry["subgroups"] else "–"
        colour = COLOURS[entry["verdict"]]
        why = f" ({entry['degenerate']})" if entry["degenerate"] and entry["verdict"] != "reliant" else ""
        verdicts.add_row(escape(entry["name"]), *gaps, subgroup, f"[{colour}]{entry['verdict']}[/{colour}]"
                         + escape(why))
    console.print(verdicts)
    for line in data["verdict"]["supporting"]:
        console.print(escape(f"  {line}"))
