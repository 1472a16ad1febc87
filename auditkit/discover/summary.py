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


def limit_lines(doc: dict) -> list[str]:
    """One line per limit that applied in this run (skipped clusters first), with its flag; [] when none
    did. Reports written before the limits were recorded have none."""
    lines = []
    for entry in sorted(doc.get("limits", []), key=lambda e: not e["skips"]):
        count = entry.get("classes") or entry["clusters"] or entry["images"]
        if not count:
            continue
        what = (f"{entry['clusters']} clusters ({entry['images']} images)" if entry["skips"] else
                f"{entry['classes']} classes" if entry["limit"] == "max_clusters" else
                f"{entry['images']} images" + (" left out" if "sample" in entry["effect"] else "")
                + (f" in {entry['clusters']} clusters" if entry["clusters"] else ""))
        setting = entry["flag"] or f"DiscoveryConfig.{entry['limit']}"
        lift = f"; {entry['flag']} {entry['lift']:g} lifts it" if entry["flag"] and entry["lift"] is not None else ""
        lines.append(f"{entry['effect']}: {what} by {setting} {entry['value']:g}{lift}")
    overlap = next((e.get("overlapping") for e in doc.get("limits", []) if e["limit"] == "max_control_overlap"), None)
    if overlap and overlap["clusters"]:
        lines.append(f"conservative control: {overlap['images']} images in {overlap['clusters']} clusters were tested "
                     "against a control sharing pixels with their box (no room for a disjoint one)")
    return lines


def untested_line(doc: dict) -> str:
    """One line for a gate that found nothing but could not test everything: the verdict's summary,
    which names the limits and the flags that lift them."""
    return " ".join(doc["verdict"]["summary"].split())


def print_discovery(doc: dict, console: Console | None = None) -> None:
    console = console or Console()
    verdict, recommendation = doc["verdict"], doc["recommendation"]
    colour = "red" if verdict["label"] == "shortcut found" else "green" if verdict.get("complete", True) else "yellow"
    summary = verdict["summary"]
    if summary.startswith(verdict["label"] + ";"):  # "no shortcut among the tested candidates; ...": said once
        summary = summary[len(verdict["label"]) + 1 :].strip()
    console.print(Panel(f"[bold {colour}]{verdict['label'].upper()}[/bold {colour}]  {summary}",
                        title=f"discovery on {doc['checkpoint']['path'] or doc['checkpoint']['arch']}"))
    tested = [c for c in doc["clusters"] if c["candidate"]]
    if len(tested) > 15:
        console.print(f"{len(tested)} clusters tested; the 15 first below, every one in discovery.json")
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
            probes.add_row(p["probe"], _interval(p["accuracy"]), _interval(p["drop"]),
                           f"[{style}]{p['finding']}[/{style}]")
        else:
            probes.add_row(p["probe"], "–", "–", p["finding"])
    console.print(probes)
    propagation = doc.get("propagation")  # reports written before issue 28 have none
    if propagation and propagation["images"]:  # found nowhere: the verdict's summary says 0
        score = propagation["score"]
        console.print(f"[bold]artefact on {propagation['images']} of {doc['data']['samples']} images[/bold] (masked; "
                      f"{propagation['beyond_clusters']} outside the clusters that confirmed it): NCC match >= "
                      f"{propagation['threshold']:g}, median {score['median']:.3f}, lowest {score['min']:.3f}"
                      + (f"; {propagation['members_without_match']} members of those clusters hold no match and get "
                         "no mask" if propagation["members_without_match"] else ""), soft_wrap=True, highlight=False)
    lines = limit_lines(doc)
    if lines:
        console.print("[bold]limits applied:[/bold]")
        for line in lines:
            console.print(f"  {line}", soft_wrap=True, highlight=False)
    console.print(f"[bold]next:[/bold] {recommendation['reason']}")
    if recommendation.get("command"):
        console.print(f"  {recommendation['command']}", soft_wrap=True, highlight=False)
