"""The terminal summary of a discovery (rich): verdict, confirmed clusters, probes, the next command."""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.table import Table


def _interval(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    low, high = entry["ci"]
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def print_discovery(doc: dict, console: Console | None = None) -> None:
    console = console or Console()
    verdict, recommendation = doc["verdict"], doc["recommendation"]
    colour = "red" if verdict["label"] == "shortcut found" else "green"
    console.print(Panel(f"[bold {colour}]{verdict['label'].upper()}[/bold {colour}]  {verdict['summary']}",
                        title=f"discovery on {doc['checkpoint']['path'] or doc['checkpoint']['arch']}"))
    tested = [c for c in doc["clusters"] if c["candidate"]]
    if tested:
        table = Table("class", "cluster", "images", "removal beyond control", "transplant beyond control",
                      "dispersion / control", "shortcut")
        for c in sorted(tested, key=lambda c: (not c["shortcut"], c["class"], c["cluster"]))[:15]:
            test, spread = c["test"], c["test"]["dispersion"]
            table.add_row(c["class_name"], str(c["cluster"]), str(c["size"]), _interval(test["removal_beyond_control"]),
                          _interval(test["transplant_beyond_control"]),
                          f"{spread['candidate']:.3f} / {spread['control']:.3f}",
                          "[red]yes[/red]" if c["shortcut"] else "no")
        console.print(table)
    probes = Table("global probe", "accuracy [CI]", "drop [CI]", "finding")
    for p in doc["probes"]:
        if p["applicable"]:
            style = "red" if p["points_at"] else "white"
            probes.add_row(p["probe"], _interval(p["accuracy"]), _interval(p["drop"]), f"[{style}]{p['finding']}[/{style}]")
        else:
            probes.add_row(p["probe"], "–", "–", p["finding"])
    console.print(probes)
    console.print(f"[bold]next:[/bold] {recommendation['reason']}")
    if recommendation.get("command"):
        console.print(f"  {recommendation['command']}", soft_wrap=True, highlight=False)
