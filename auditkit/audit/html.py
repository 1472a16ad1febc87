"""The self-contained HTML report: one file, images inline, no scripts or fonts from elsewhere.

Sections: verdict and evidence, task metric per variant with intervals, degradation,
counterfactuals, confusion matrices, attribution localisation, a per-layer activation-share chart
(inline SVG) and heatmap grids of correct and wrong predictions on each variant for each method.
A tiny inline script records on <body> how many images decoded (data-images-loaded), which the
browser test reads.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import cv2
import numpy as np
import torch

from ..data import collate
from ..explain import attribute
from ..explain.render import captioned, grid, overlay, upscale

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:70rem;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.verdict{padding:1rem;border-radius:.5rem;font-size:1.1rem}
.reliant{background:#fde2e1;border:2px solid #c0392b}.notreliant{background:#e3f6e5;border:2px solid #27ae60}
.inconclusive{background:#fff6d6;border:2px solid #d4a017}
.muted{color:#666;font-size:.9rem}img{max-width:100%}figure{margin:.5rem 0}
"""


def _png_data_uri(picture: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", picture[:, :, ::-1])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB array
        raise RuntimeError("could not encode a PNG")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(entry: dict) -> str:
    low, high = entry["ci"]
    return f"{_fmt(entry['value'])} <span class=muted>[{_fmt(low)}, {_fmt(high)}]</span>"


def _confusion(matrix: list[list[int]], classes: list[str]) -> str:
    largest = max(1, max(max(row) for row in matrix))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    rows = []
    for name, row in zip(classes, matrix):
        cells = "".join(
            f'<td style="background:rgba(41,128,185,{0.85 * v / largest:.2f})">{v}</td>' for v in row
        )
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<table><tr><th class=l>true \\ predicted</th>{head}</tr>{''.join(rows)}</table>"


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
        for offset, value, colour in ((0, entry["share"]["value"] or 0.0, "#c0392b"), (bar, entry["chance"], "#95a5a6")):
            h = height * max(0.0, min(1.0, value))
            parts.append(f'<rect x="{x + offset}" y="{10 + height - h}" width="{bar - 2}" height="{h}" fill="{colour}">'
                         f"<title>{value:.3f}</title></rect>")
        label = html.escape(entry["layer"].removeprefix("net."))
        parts.append(f'<text x="{x}" y="{height + 28}" font-size="11">{label}</text>')
    parts.append(f'<text x="{left}" y="{height + 50}" font-size="11" fill="#c0392b">share inside the mask</text>'
                 f'<text x="{left + 150}" y="{height + 50}" font-size="11" fill="#7f8c8d">chance (mask area after D)</text>')
    return "".join(parts) + "</svg>"


def _example_grids(model, dataset, examples: dict, methods: list[str], classes, epsilon: float, device) -> list[str]:
    sections = []
    for variant, chosen in examples.items():
        for kind in ("correct", "wrong"):
            indices = chosen[kind]
            if not indices:
                continue
            batch = collate([dataset[i] for i in indices]).to(device)
            with torch.no_grad():
                predictions = model(batch.images).argmax(1)
            for method in methods:
                options = {"epsilon": epsilon} if method == "lrp_epsilon" else {}
                maps = attribute(model, batch.images, predictions, method, **options)[:, 0]
                tiles = [
                    captioned(upscale(overlay(batch.images[k], maps[k]), 96),
                              f"{classes[int(batch.labels[k])]}->{classes[int(predictions[k])]}")
                    for k in range(len(indices))
                ]
                alt = f"{method} heatmaps, {kind} predictions, {variant} variant"
                sections.append(f"<figure><figcaption><b>{html.escape(variant)}</b> · {kind} · {method}</figcaption>"
                                f'<img alt="{html.escape(alt)}" src="{_png_data_uri(grid(tiles, columns=8))}"></figure>')
    return sections


def render_html(report, model, dataset, device="cpu") -> str:
    """The HTML page for an AuditReport (``dataset`` as audited, for the example heatmaps)."""
    data = report.data
    verdict = data["verdict"]
    classes = data["checkpoint"]["classes"]
    metric = data["task"]["metric"]
    css_class = verdict["label"].replace(" ", "")
    out = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>auditkit audit: {html.escape(verdict['label'])}</title>",
           f"<style>{STYLE}</style></head><body data-images-loaded=pending>",
           f"<h1>Shortcut audit of {html.escape(str(data['checkpoint']['path'] or data['checkpoint']['arch']))}</h1>",
           f"<p class=muted>{html.escape(data['checkpoint']['arch'])} on {html.escape(data['data']['spec'])} "
           f"({data['data']['samples']} samples, {data['data']['with_masks']} with masks), auditkit {data['auditkit_version']}, "
           f"{data['created']}, {data['seconds']} s, {data['config']['processes']} process(es)</p>",
           f"<div class='verdict {css_class}'><b>Verdict: {html.escape(verdict['label'])}.</b> {html.escape(verdict['summary'])}</div>",
           "<h2>Evidence</h2><table><tr><th class=l>test</th><th>value [interval]</th><th>threshold</th><th class=l>finding</th></tr>"]
    for e in verdict["evidence"]:
        out.append(f"<tr><td class=l>{html.escape(e['test'])}</td><td>{_interval(e)}</td><td>{e['threshold']}</td>"
                   f"<td class=l>{html.escape(e['finding'])}</td></tr>")
    out.append("</table>")
    if verdict["supporting"]:
        out.append("<p>Supporting (localisation, does not decide):</p><ul>"
                   + "".join(f"<li>{html.escape(s)}</li>" for s in verdict["supporting"]) + "</ul>")
    out.append(f"<h2>Task performance ({metric})</h2><table><tr><th class=l>variant</th><th>{metric} [interval]</th><th>samples</th></tr>")
    for variant, entry in data["task"]["per_variant"].items():
        out.append(f"<tr><td class=l>{html.escape(variant)}</td><td>{_interval(entry)}</td><td>{entry['samples']}</td></tr>")
    out.append("</table>")
    for other, entry in data["degradation"].items():
        out.append(f"<p>Degradation contaminated → {html.escape(other)}: {_interval(entry)}"
                   f" <span class=muted>({'paired' if entry['paired'] else 'independent'} bootstrap)</span></p>")
    if data["counterfactual"]:
        out.append("<h2>Counterfactuals</h2><ul>")
        swap = data["counterfactual"].get("swap")
        if swap:
            out.append(f"<li>Swapping in another class's masked region changes {_interval(swap['flip_rate'])} of the "
                       f"predictions; {_interval(swap['follow_rate'])} follow the pasted region's class.</li>")
        removal = data["counterfactual"].get("removal")
        if removal:
            out.append(f"<li>Filling the masked region with background: {metric} {_fmt(removal['before'])} → "
                       f"{_fmt(removal['after'])}, drop {_interval(removal['drop'])}.</li>")
        out.append("</ul>")
    out.append("<h2>Confusion matrices</h2>")
    for variant, entry in data["task"]["per_variant"].items():
        out.append(f"<h3>{html.escape(variant)}</h3>{_confusion(entry['confusion'], classes)}")
    out.append("<h2>Where it looks: attribution inside the mask</h2>")
    for method, variants in data["localisation"].items():
        out.append(f"<h3>{html.escape(method)}</h3><table><tr><th class=l>variant</th><th>energy in mask</th>"
                   "<th>chance</th><th>top-25% recall</th><th>top-25% precision</th><th>IoU</th></tr>")
        for variant, entry in variants.items():
            out.append(f"<tr><td class=l>{html.escape(variant)}</td><td>{_interval(entry['energy_in_mask'])}</td>"
                       f"<td>{_fmt(entry['chance']['energy_in_mask'])}</td><td>{_interval(entry['top_quartile_recall'])}</td>"
                       f"<td>{_interval(entry['top_quartile_precision'])}</td><td>{_interval(entry['iou'])}</td></tr>")
        out.append("</table>")
    out.append("<h2>Activation inside the mask, per targeted layer</h2>" + _share_chart(data["activation_share"]))
    out.append("<h2>Heatmaps</h2><p class=muted>Red: evidence for the predicted class; blue: against.</p>")
    out += _example_grids(model, dataset, report.examples, data["config"]["methods"], classes, data["config"]["epsilon"], device)
    out.append("<script>addEventListener('load',()=>{const i=[...document.images];"
               "document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>")
    out.append("</body></html>")
    return "\n".join(out)


def write_html(report, model, dataset, path: str | Path, device="cpu") -> Path:
    from .._io import atomic_write_text

    return atomic_write_text(path, render_html(report, model, dataset, device), overwrite=True)


def render_comparison_html(before, after, model_before, model_after, dataset, device="cpu", title="Repair") -> str:
    """Before/after page for a repair: verdicts, metric changes, and heatmaps of both models."""
    b, a = before.data, after.data
    metric = a["task"]["metric"]

    def value(entry):
        return None if entry is None else entry.get("value")

    def row(name, x, y):
        change = "–" if x is None or y is None else f"{y - x:+.3f}"
        return f"<tr><td class=l>{html.escape(name)}</td><td>{_fmt(x)}</td><td>{_fmt(y)}</td><td>{change}</td></tr>"

    out = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>auditkit {html.escape(title)}</title>",
           f"<style>{STYLE}</style></head><body data-images-loaded=pending>",
           f"<h1>{html.escape(title)}: before and after</h1>",
           f"<p class=muted>{html.escape(a['data']['spec'])}, {a['data']['samples']} samples; auditkit {a['auditkit_version']}</p>"]
    for label, report in (("Before", b), ("After", a)):
        css_class = report["verdict"]["label"].replace(" ", "")
        out.append(f"<div class='verdict {css_class}' style='margin:.5rem 0'><b>{label}: {html.escape(report['verdict']['label'])}.</b> "
                   f"{html.escape(report['verdict']['summary'])}</div>")
    out.append(f"<h2>Changes</h2><table><tr><th class=l>measure</th><th>before</th><th>after</th><th>change</th></tr>")
    for variant in a["task"]["per_variant"]:
        out.append(row(f"{metric}, {variant}", value(b["task"]["per_variant"].get(variant)), value(a["task"]["per_variant"][variant])))
    for other in a["degradation"]:
        out.append(row(f"degradation to {other}", value(b["degradation"].get(other)), value(a["degradation"][other])))
    for name, path in (("swap flip rate", ("swap", "flip_rate")), ("removal drop", ("removal", "drop"))):
        x = b["counterfactual"].get(path[0], {}).get(path[1])
        y = a["counterfactual"].get(path[0], {}).get(path[1])
        if y is not None:
            out.append(row(name, value(x), value(y)))
    for method, variants in a["localisation"].items():
        reference = a["reference_variant"]
        if reference in variants:
            x = b["localisation"].get(method, {}).get(reference, {}).get("energy_in_mask")
            out.append(row(f"{method}: energy in mask ({reference})", value(x), value(variants[reference]["energy_in_mask"])))
    for x, y in zip(b["activation_share"], a["activation_share"]):
        out.append(row(f"activation inside mask, {y['layer']}", value(x["share"]), value(y["share"])))
    out.append("</table>")
    reference = a["reference_variant"]
    for label, report, model in (("before", before, model_before), ("after", after, model_after)):
        examples = {reference: report.examples.get(reference, {"correct": [], "wrong": []})}
        out.append(f"<h2>Heatmaps {label} ({html.escape(reference)} variant)</h2>")
        out += _example_grids(model, dataset, examples, a["config"]["methods"][:1], a["checkpoint"]["classes"],
                              a["config"]["epsilon"], device)
    out.append("<script>addEventListener('load',()=>{const i=[...document.images];"
               "document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>")
    out.append("</body></html>")
    return "\n".join(out)
