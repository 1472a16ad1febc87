"""The self-contained HTML report, rendered from the report's JSON alone (no model, data or device).

One file, images inline, no scripts or fonts from elsewhere. Sections: the verdict and its evidence;
the task metric per variant with its intervals as a plot (before and after side by side for a
repair); degradation and counterfactuals; a per-class table; where the model looks (attribution
inside the mask) and the per-layer activation share; example tiles (the image beside each method's
heatmap, the mask's outline drawn on both). A tiny inline script records on <body> how many images
decoded (data-images-loaded), which the browser test reads.

    page = render_html(report_json)                       # one audit
    page = render_comparison_html(before_json, after_json)  # a repair's before and after
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch

from ..data.meaning import SPURIOUS, WORDS
from ..explain.render import captioned, grid, outline, png_data_uri, upscale
from .metrics import HOW_CHOSEN
from .tiles import decode_map, decode_picture

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.verdict{padding:1rem;border-radius:.5rem;font-size:1.1rem;margin:.5rem 0}
.reliant{background:#fde2e1;border:2px solid #c0392b}.notreliant{background:#e3f6e5;border:2px solid #27ae60}
.inconclusive{background:#fff6d6;border:2px solid #d4a017}
.muted{color:#666;font-size:.9rem}img{max-width:100%}figure{margin:.5rem 0}
.pair{display:flex;gap:2rem;flex-wrap:wrap}.pair>div{flex:1;min-width:20rem}
"""
COLOURS = {"before": "#c0392b", "after": "#27ae60", "": "#2c3e50"}
_LOADED_SCRIPT = ("<script>addEventListener('load',()=>{const i=[...document.images];"
                  "document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>")


def masks_mark(report: dict) -> str:
    """What the audited masks mark, as people read it: "the artefact" or "the object" (reports that
    predate ``data.mask_meaning`` audited artefact masks)."""
    return WORDS.get(report["data"].get("mask_meaning", SPURIOUS), WORDS[SPURIOUS])


def _fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(entry: dict) -> str:
    if entry["value"] is None and entry.get("reason"):
        return f"– <span class=muted>({html.escape(entry['reason'])})</span>"
    low, high = entry["ci"]
    return f"{_fmt(entry['value'])} <span class=muted>[{_fmt(low)}, {_fmt(high)}]</span>"


def metric_name(report: dict) -> str:
    """The task metric as the report names it ("F1 of 'pneumonia'"); older reports: its short name."""
    return report["task"].get("metric_label", report["task"]["metric"])


def _positive_note(report: dict) -> str:
    positive = report["task"].get("positive_class")
    if not positive:
        return ""
    how = HOW_CHOSEN.get(positive["chosen"], positive["chosen"])
    return (f"<p>The F-score is of class <b>{html.escape(positive['name'])}</b> ({html.escape(how)}: "
            f"{positive['count']} of {positive['of']} {html.escape(positive['variant'])} images).</p>")


def _head(title: str) -> list[str]:
    return [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
            f"<style>{STYLE}</style></head><body data-images-loaded=pending>"]


def _verdict_box(report: dict, label: str = "Verdict") -> str:
    verdict = report["verdict"]
    css_class = verdict["label"].replace(" ", "")
    return (f"<div class='verdict {css_class}'><b>{label}: {html.escape(verdict['label'])}.</b> "
            f"{html.escape(verdict['summary'])}</div>")


# ---- plots (inline SVG) ------------------------------------------------------------------------


def metric_plot(reports: dict[str, dict]) -> str:
    """The task metric of every variant with its interval, one marker per report (``{"before": ..,
    "after": ..}`` side by side, or ``{"": report}``), on a 0..1 axis (or the metric's range)."""
    variants = list(dict.fromkeys(v for r in reports.values() for v in r["task"]["per_variant"]))
    entries = [e for r in reports.values() for e in r["task"]["per_variant"].values()]
    # Accuracy and F-score live in [0, 1]; an error (MAE) gets an axis up to its largest interval end.
    top = 1.0 if next(iter(reports.values()))["task"]["higher_is_better"] else max(
        [1e-9, *(e["value"] for e in entries if e["value"] is not None),
         *(e["ci"][1] for e in entries if e["ci"][1] is not None)])
    left, row, width, plot = 110, 26, 460, 320
    height = 30 + row * len(variants) * max(1, len(reports)) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="task metric per variant with intervals">']
    for tick in np.linspace(0, top, 5):
        x = left + plot * tick / top
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="20" y2="{height - 25}" stroke="#e5e5e5"/>'
                     f'<text x="{x:.1f}" y="{height - 10}" font-size="11" text-anchor="middle">{tick:.2f}</text>')
    y = 30
    for variant in variants:
        parts.append(f'<text x="4" y="{y + 4 + row * (len(reports) - 1) / 2:.1f}" font-size="12">'
                     f"{html.escape(variant)}</text>")
        for name, report in reports.items():
            entry = report["task"]["per_variant"].get(variant)
            if entry and entry["value"] is not None:
                colour = COLOURS.get(name, "#2c3e50")
                low, high = (entry["ci"][0] or entry["value"]), (entry["ci"][1] or entry["value"])
                x0, x1, xv = (left + plot * v / top for v in (low, high, entry["value"]))
                parts.append(f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2"/>'
                             f'<circle cx="{xv:.1f}" cy="{y}" r="4" fill="{colour}"><title>{name} {variant}: '
                             f'{entry["value"]:.3f} [{low:.3f}, {high:.3f}]</title></circle>')
            y += row
    legend = [f'<tspan fill="{COLOURS.get(n, "#2c3e50")}">● {html.escape(n or "value")}</tspan>' for n in reports]
    parts.append(f'<text x="{left}" y="14" font-size="11">{" ".join(legend)} (line: interval)</text>')
    return "".join(parts) + "</svg>"


def _share_chart(shares: list[dict]) -> str:
    """Bars: share of activation inside the mask per layer, with the chance level marked."""
    if not shares:
        return "<p class=muted>No targeted layers or no masks.</p>"
    bar, gap, height, left = 28, 18, 180, 40
    width = left + len(shares) * (bar * 2 + gap) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 60}" role="img">']
    for tick in (0, 0.5, 1.0):
        y = 10 + height * (1 - tick)
        parts.append(f'<line x1="{left}" x2="{width}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                     f'<text x="4" y="{y + 4}" font-size="11">{tick:.1f}</text>')
    for k, entry in enumerate(shares):
        x = left + k * (bar * 2 + gap)
        bars = ((0, entry["share"]["value"] or 0.0, "#c0392b"), (bar, entry["chance"], "#95a5a6"))
        for offset, value, colour in bars:
            h = height * max(0.0, min(1.0, value))
            parts.append(f'<rect x="{x + offset}" y="{10 + height - h}" width="{bar - 2}" height="{h}" fill="{colour}">'
                         f"<title>{value:.3f}</title></rect>")
        label = html.escape(entry["layer"].removeprefix("net."))
        parts.append(f'<text x="{x}" y="{height + 28}" font-size="11">{label}</text>')
    parts.append(f'<text x="{left}" y="{height + 50}" font-size="11" fill="#c0392b">share inside the mask</text>'
                 f'<text x="{left + 150}" y="{height + 50}" font-size="11" fill="#7f8c8d">'
                 "chance (mask area after D)</text>")
    return "".join(parts) + "</svg>"


# ---- tables --------------------------------------------------------------------------------------


def _confusion(matrix: list[list[int]], classes: list[str]) -> str:
    largest = max(1, max(max(row) for row in matrix))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    rows = []
    for name, row in zip(classes, matrix):
        cells = "".join(f'<td style="background:rgba(41,128,185,{0.85 * v / largest:.2f})">{v}</td>' for v in row)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<table><tr><th class=l>true \\ predicted</th>{head}</tr>{''.join(rows)}</table>"


def per_class_table(reports: dict[str, dict]) -> str:
    """Accuracy per class and variant (from the confusion matrices), one column per report."""
    first = next(iter(reports.values()))
    classes = first["checkpoint"]["classes"]
    variants = list(first["task"]["per_variant"])
    head = "".join(f"<th>{html.escape(v)}{(' ' + html.escape(n)) if n else ''}</th>" for v in variants for n in reports)
    rows = []
    for c, name in enumerate(classes):
        cells = []
        for variant in variants:
            for report in reports.values():
                matrix = (report["task"]["per_variant"].get(variant) or {}).get("confusion")
                total = sum(matrix[c]) if matrix else 0
                cells.append(f"<td>{_fmt(matrix[c][c] / total) if total else '–'}</td>")
        rows.append(f"<tr><td class=l>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th class=l>class</th>{head}</tr>{''.join(rows)}</table>"


# ---- example tiles -------------------------------------------------------------------------------


def _tile_pictures(tile: dict, methods: list[str], side: int = 96) -> list[np.ndarray]:
    """The image, then each method's overlay, upscaled, the mask's outline drawn on each."""
    from ..explain.render import overlay

    pixels = decode_picture(tile["image"])
    image = torch.from_numpy(pixels).float().div(255.0)
    image = image.unsqueeze(0) if image.dim() == 2 else image.permute(2, 0, 1)
    mask = decode_picture(tile["mask"]) if tile.get("mask") else None
    pictures = [np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels]
    for method in methods:
        entry = tile["maps"].get(method)
        if entry is not None:
            pictures.append(overlay(image, decode_map(entry), signed=entry["signed"]))
    pictures = [upscale(p, side) for p in pictures]
    if mask is not None:
        pictures = [outline(p, mask) for p in pictures]
    return pictures


def example_figures(report: dict, variants: list[str] | None = None, methods: list[str] | None = None) -> list[str]:
    """One figure per variant and kind: for each example, the image beside its heatmaps."""
    classes = report["checkpoint"]["classes"]
    methods = methods or report["config"]["methods"]
    figures = []
    for variant, kinds in report.get("examples", {}).items():
        if variants is not None and variant not in variants:
            continue
        for kind, tiles in kinds.items():
            if not tiles:
                continue
            rows = []
            for tile in tiles:
                pictures = _tile_pictures(tile, methods)
                caption = f"{classes[tile['label']]}->{classes[tile['prediction']]}"
                rows.append(captioned(np.concatenate(pictures, axis=1), caption))
            alt = f"{kind} predictions on the {variant} variant: image, then {', '.join(methods)}"
            figures.append(f"<figure><figcaption><b>{html.escape(variant)}</b> · {kind} · image, "
                           f"{html.escape(', '.join(methods))} (green: the mask's outline)</figcaption>"
                           f'<img alt="{html.escape(alt)}" src="{png_data_uri(grid(rows, columns=2))}"></figure>')
    if not figures:
        figures.append("<p class=muted>No example pictures in this report.</p>")
    return figures


# ---- pages ---------------------------------------------------------------------------------------


def render_html(report: dict) -> str:
    """The HTML page of one audit report (its JSON document, auditkit.audit/1)."""
    verdict = report["verdict"]
    classes = report["checkpoint"]["classes"]
    metric = html.escape(metric_name(report))
    out = _head(f"auditkit audit: {verdict['label']}")
    audited = report["checkpoint"]["path"] or report["checkpoint"]["arch"]
    out += [f"<h1>Shortcut audit of {html.escape(str(audited))}</h1>",
            f"<p class=muted>{html.escape(report['checkpoint']['arch'])} on {html.escape(report['data']['spec'])} "
            f"({report['data']['samples']} samples, {report['data']['with_masks']} with masks of "
            f"{masks_mark(report)}), auditkit "
            f"{report['auditkit_version']}, {report['created']}, {report['seconds']} s, "
            f"{report['config']['processes']} process(es)</p>",
            _verdict_box(report),
            "<h2>Evidence</h2><table><tr><th class=l>test</th><th>value [interval]</th><th>threshold</th>"
            "<th class=l>finding</th></tr>"]
    for e in verdict["evidence"]:
        finding = f"not run: {e.get('reason') or 'no data'}" if e["finding"] == "not run" else e["finding"]
        value = "–" if e["value"] is None else _interval(e)
        out.append(f"<tr><td class=l>{html.escape(e['test'])}</td><td>{value}</td><td>{e['threshold']}</td>"
                   f"<td class=l>{html.escape(finding)}</td></tr>")
    out.append("</table>")
    if verdict["supporting"]:
        out.append("<p>Supporting (localisation, does not decide):</p><ul>"
                   + "".join(f"<li>{html.escape(s)}</li>" for s in verdict["supporting"]) + "</ul>")
    if report.get("findings") is not None:  # a multilabel model (issue 27): one block per finding
        out += _findings_section(report)
    out.append(f"<h2>Task performance ({metric})</h2>" + _positive_note(report) + metric_plot({"": report}))
    out.append(f"<table><tr><th class=l>variant</th><th>{metric} [interval]</th><th>samples</th></tr>")
    for variant, entry in report["task"]["per_variant"].items():
        out.append(f"<tr><td class=l>{html.escape(variant)}</td><td>{_interval(entry)}</td>"
                   f"<td>{entry['samples']}</td></tr>")
    out.append("</table>")
    for other, entry in report["degradation"].items():
        out.append(f"<p>Degradation contaminated → {html.escape(other)}: {_interval(entry)}"
                   f" <span class=muted>({'paired' if entry['paired'] else 'independent'} bootstrap)</span></p>")
    if report["counterfactual"]:
        out.append("<h2>Counterfactuals</h2><ul>")
        swap = report["counterfactual"].get("swap")
        if swap:
            out.append(f"<li>Swapping in another class's masked region changes {_interval(swap['flip_rate'])} of the "
                       f"predictions; {_interval(swap['follow_rate'])} follow the pasted region's class.</li>")
        removal = report["counterfactual"].get("removal")
        if removal:
            out.append(f"<li>Filling the masked region with background: {metric} {_fmt(removal['before'])} → "
                       f"{_fmt(removal['after'])}, drop {_interval(removal['drop'])}.</li>")
        out.append("</ul>")
    out.append("<h2>Per class (accuracy)</h2>" + per_class_table({"": report}))
    out.append("<h2>Confusion matrices</h2>")
    for variant, entry in report["task"]["per_variant"].items():
        if entry.get("confusion"):
            out.append(f"<h3>{html.escape(variant)}</h3>{_confusion(entry['confusion'], classes)}")
    out.append(f"<h2>Where it looks: attribution inside the mask ({masks_mark(report)})</h2>")
    for method, variants in report["localisation"].items():
        out.append(f"<h3>{html.escape(method)}</h3><table><tr><th class=l>variant</th><th>energy in mask</th>"
                   "<th>chance</th><th>top-25% recall</th><th>top-25% precision</th><th>IoU</th></tr>")
        for variant, entry in variants.items():
            out.append(f"<tr><td class=l>{html.escape(variant)}</td><td>{_interval(entry['energy_in_mask'])}</td>"
                       f"<td>{_fmt(entry['chance']['energy_in_mask'])}</td><td>{_interval(entry['top_quartile_recall'])}</td>"
                       f"<td>{_interval(entry['top_quartile_precision'])}</td><td>{_interval(entry['iou'])}</td></tr>")
        out.append("</table>")
    out.append(f"<h2>Activation inside the mask ({masks_mark(report)}), per targeted layer</h2>"
               + _share_chart(report["activation_share"]))
    out.append("<h2>Heatmaps</h2><p class=muted>Each example: the image, then one heatmap per method "
               "(red: evidence for the predicted class; blue: against); green: the mask's outline.</p>")
    out += example_figures(report)
    out += [_LOADED_SCRIPT, "</body></html>"]
    return "\n".join(out)


def _findings_section(report: dict) -> list[str]:
    """Per finding of a multilabel audit: AUROC, sensitivity and specificity per variant with intervals,
    the AUROC gaps and the subgroup gap, the verdict (and why a degenerate finding cannot be cleared)."""
    out = [f"<h2>Per finding</h2><p class=muted>Explained: {html.escape(report.get('explained', ''))}; "
           "threshold: probability 0.5 (z &gt; 0).</p>"]
    for entry in report["findings"]:
        gaps = [f"contaminated → {html.escape(v)}: {_interval(g)}" for v, g in entry["auroc_gap"].items()]
        if entry["subgroups"]:
            gaps.append(f"subgroup gap (positives with − without the artefact): {_interval(entry['subgroups']['gap'])}")
        why = f" <span class=muted>({html.escape(entry['degenerate'])})</span>" if entry["degenerate"] else ""
        out.append(f"<h3>{html.escape(entry['name'])}: {html.escape(entry['verdict'])}{why}</h3>"
                   f"<p>{'; '.join(gaps) or 'no AUROC gap measured'}</p>"
                   "<table><tr><th class=l>variant</th><th>AUROC</th><th>sensitivity</th><th>specificity</th>"
                   "<th>positives</th></tr>")
        for variant, m in entry["per_variant"].items():
            out.append(f"<tr><td class=l>{html.escape(variant)}</td><td>{_interval(m['auroc'])}</td>"
                       f"<td>{_interval(m['sensitivity'])}</td><td>{_interval(m['specificity'])}</td>"
                       f"<td>{m['positives']}/{m['samples']}</td></tr>")
        out.append("</table>")
        # The plot per finding: its AUROC per variant with intervals, on the task plot's 0..1 axis.
        aurocs = {"task": {"per_variant": {v: m["auroc"] for v, m in entry["per_variant"].items()},
                           "higher_is_better": True}}
        out.append(f"<p class=muted>AUROC of {html.escape(entry['name'])} per variant</p>" + metric_plot({"": aurocs}))
    return out


def write_html(report: dict, path: str | Path) -> Path:
    from .._io import atomic_write_text

    return atomic_write_text(path, render_html(report), overwrite=True)


def render_comparison_html(before: dict, after: dict, title: str = "Repair") -> str:
    """The before/after page of a repair from its two audit reports (JSON documents): verdicts,
    metrics side by side with intervals, changes, per-class table and both models' heatmaps."""
    b, a = before, after
    metric = metric_name(a)  # row() escapes its name

    def value(entry):
        return None if entry is None else entry.get("value")

    def row(name, x, y):
        change = "–" if x is None or y is None else f"{y - x:+.3f}"
        return f"<tr><td class=l>{html.escape(name)}</td><td>{_fmt(x)}</td><td>{_fmt(y)}</td><td>{change}</td></tr>"

    out = _head(f"auditkit {title}")
    out += [f"<h1>{html.escape(title)}: before and after</h1>",
            f"<p class=muted>{html.escape(a['data']['spec'])}, {a['data']['samples']} samples; "
            f"auditkit {a['auditkit_version']}</p>",
            _verdict_box(b, "Before"), _verdict_box(a, "After"),
            f"<h2>Task performance ({html.escape(metric)})</h2>" + _positive_note(a)
            + metric_plot({"before": b, "after": a}),
            "<h2>Changes</h2><table><tr><th class=l>measure</th><th>before</th><th>after</th><th>change</th></tr>"]
    for variant in a["task"]["per_variant"]:
        out.append(row(f"{metric}, {variant}", value(b["task"]["per_variant"].get(variant)),
                       value(a["task"]["per_variant"][variant])))
    for other in a["degradation"]:
        out.append(row(f"degradation to {other}", value(b["degradation"].get(other)), value(a["degradation"][other])))
    for name, path in (("swap flip rate", ("swap", "flip_rate")), ("removal drop", ("removal", "drop"))):
        x = b["counterfactual"].get(path[0], {}).get(path[1])
        y = a["counterfactual"].get(path[0], {}).get(path[1])
        if y is not None:
            out.append(row(name, value(x), value(y)))
    reference = a["reference_variant"]
    for method, variants in a["localisation"].items():
        if reference in variants:
            x = b["localisation"].get(method, {}).get(reference, {}).get("energy_in_mask")
            out.append(row(f"{method}: energy in mask ({reference})", value(x),
                           value(variants[reference]["energy_in_mask"])))
    for x, y in zip(b["activation_share"], a["activation_share"]):
        out.append(row(f"activation inside mask, {y['layer']}", value(x["share"]), value(y["share"])))
    out.append("</table>")
    out.append("<h2>Per class (accuracy)</h2>" + per_class_table({"before": b, "after": a}))
    out.append(f"<h2>Heatmaps ({html.escape(reference)} variant)</h2><div class=pair>")
    for label, report in (("before", b), ("after", a)):
        out.append(f"<div><h3>{label}</h3>" + "".join(example_figures(report, [reference])) + "</div>")
    out += ["</div>", _LOADED_SCRIPT, "</body></html>"]
    return "\n".join(out)
