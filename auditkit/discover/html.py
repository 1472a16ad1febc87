"""The discovery page, rendered from the discovery JSON alone: the verdict and next command, the
strategy clusters (mean heatmap, exemplars beside their heatmaps with the proposed mask outlined,
the causal test), and the probe table."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch

from ..audit.html import _LOADED_SCRIPT, _fmt, _head, _interval
from ..audit.tiles import decode_map, decode_picture
from ..explain.render import (
    captioned,
    colorize,
    grid,
    outline,
    overlay,
    png_data_uri,
    upscale,
)


def _picture(text: str) -> np.ndarray:
    pixels = decode_picture(text)
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels


def _exemplar(entry: dict, side: int = 80) -> np.ndarray:
    pixels = decode_picture(entry["image"])
    image = torch.from_numpy(pixels).float().div(255.0)
    image = image.unsqueeze(0) if image.dim() == 2 else image.permute(2, 0, 1)
    heat = decode_map(entry["heatmap"])
    if tuple(heat.shape) != tuple(image.shape[-2:]):
        heat = torch.nn.functional.interpolate(heat[None, None], size=image.shape[-2:], mode="nearest")[0, 0]
    pictures = [upscale(_picture(entry["image"]), side), upscale(overlay(image, heat, signed=False), side)]
    if entry.get("mask"):
        mask = decode_picture(entry["mask"])
        pictures = [outline(p, mask) for p in pictures]
    return np.concatenate(pictures, axis=1)


def cluster_figure(cluster: dict) -> str:
    """The cluster's mean heatmap, then its exemplars (image | heatmap, proposed mask outlined)."""
    mean = upscale(colorize(decode_map(cluster["mean_heatmap"]), signed=False), 80)
    mean = np.concatenate([mean, np.full_like(mean, 255)], axis=1)  # as wide as an exemplar (image | heatmap)
    tiles = [captioned(mean, "mean")] + [captioned(_exemplar(e), f"#{e['index']}") for e in cluster["exemplars"]]
    alt = f"class {cluster['class_name']} cluster {cluster['cluster']}: mean heatmap and exemplars"
    return f'<img alt="{html.escape(alt)}" src="{png_data_uri(grid(tiles, columns=4))}">'


def render_discovery_section(doc: dict, *, clusters: str = "candidates") -> list[str]:
    """The discovery's HTML (no page head): verdict, recommendation, probes, clusters
    (``clusters``: "candidates" shows the tested ones, "all" every one)."""
    verdict, recommendation = doc["verdict"], doc["recommendation"]
    css = ("reliant" if verdict["label"] == "shortcut found" else "notreliant" if verdict.get("complete", True)
           else "inconclusive")
    out = [f"<div class='verdict {css}'><b>Discovery: {html.escape(verdict['label'])}.</b> "
           f"{html.escape(verdict['summary'])}</div>",
           f"<p class=muted>Tested: {html.escape(verdict['tested'])}.</p>",
           f"<h2>Recommendation: {html.escape(recommendation['method'])}</h2>"
           f"<p>{html.escape(recommendation['reason'])}</p>"]
    if recommendation.get("command"):
        out.append(f"<pre>{html.escape(recommendation['command'])}</pre>")
    masks = doc.get("masks", {})
    if "without_mask" in masks:
        out.append(f"<p class=muted>Proposed masks: {masks['images']} images; {masks['without_mask']} have no proposed "
                   "region and get no mask (never an empty one).</p>")
    propagation = doc.get("propagation")  # absent in reports written before issue 28
    if propagation and propagation["images"]:  # found nowhere: the verdict's summary says 0
        score = propagation["score"]
        out.append(f"<p>The confirmed artefact was found on {propagation['images']} of {doc['data']['samples']} "
                   f"images ({propagation['beyond_clusters']} outside the clusters that confirmed it) by normalised "
                   f"cross-correlation with its template, each match &ge; {propagation['threshold']:g} (median "
                   f"{score['median']:.3f}, lowest {score['min']:.3f}); "
                   f"{propagation['members_without_match']} members of those clusters hold no match and get no "
                   "mask.</p>")
    out.append("<h2>Global probes (no mask needed)</h2><table><tr><th class=l>probe</th><th class=l>edit</th>"
               "<th>accuracy [interval]</th><th>drop [interval]</th><th>changed</th><th class=l>finding</th></tr>")
    for probe in doc["probes"]:
        if not probe["applicable"]:
            out.append(f"<tr><td class=l>{probe['probe']}</td><td class=l>{html.escape(probe['description'])}</td>"
                       f"<td>–</td><td>–</td><td>–</td><td class=l>{html.escape(probe['finding'])}</td></tr>")
            continue
        out.append(f"<tr><td class=l>{probe['probe']}</td><td class=l>{html.escape(probe['description'])}</td>"
                   f"<td>{_interval(probe['accuracy'])}</td><td>{_interval(probe['drop'])}</td>"
                   f"<td>{_fmt(probe['changed']['value'])}</td><td class=l>{html.escape(probe['finding'])}</td></tr>")
    out.append("</table>")
    out += _limits_section(doc)
    shown = [c for c in doc["clusters"] if clusters == "all" or c["candidate"]]
    shown.sort(key=lambda c: (not c["shortcut"], c["class"], c["cluster"]))
    out.append(f"<h2>Strategy clusters (SpRAy): {len(doc['clusters'])} in all, "
               f"{sum(c['candidate'] for c in doc['clusters'])} "
               "candidate regions tested</h2><p class=muted>Per cluster: its mean relevance, then exemplars (image | "
               "LRP-ε relevance), green: the proposed mask. A candidate is a shortcut when removing or transplanting "
               "its region matters beyond a control region of the same area and its content repeats across images.</p>")
    out.append("<table><tr><th class=l>class</th><th>cluster</th><th>images</th><th>accuracy</th><th>region area</th>"
               "<th>removal beyond control</th><th>transplant beyond control</th><th>dispersion / control</th>"
               "<th class=l>shortcut</th></tr>")
    for c in shown:
        test = c.get("test") or {}
        removal = _interval(test["removal_beyond_control"]) if test else "–"
        transplant = _interval(test["transplant_beyond_control"]) if test else "–"
        spread = test.get("dispersion", {})
        out.append(f"<tr><td class=l>{html.escape(c['class_name'])}</td><td>{c['cluster']}</td><td>{c['size']}</td>"
                   f"<td>{_fmt(c['accuracy'])}</td><td>{_fmt(c['region_area'])}</td><td>{removal}</td><td>{transplant}</td>"
                   f"<td>{_fmt(spread.get('candidate'))} / {_fmt(spread.get('control'))}</td>"
                   f"<td class=l>{'yes' if c['shortcut'] else 'no'}</td></tr>")
    out.append("</table>")
    if len(shown) > 24:
        out.append(f"<p class=muted>The figures of the first 24 of {len(shown)} clusters; every cluster is in "
                   "discovery.json.</p>")
    for c in shown[:24]:
        label = "shortcut" if c["shortcut"] else "candidate" if c["candidate"] else "cluster"
        out.append(f"<figure><figcaption><b>{html.escape(c['class_name'])}</b> · cluster {c['cluster']} · {label} · "
                   f"{c['size']} images</figcaption>{cluster_figure(c)}</figure>")
    return out


def _limits_section(doc: dict) -> list[str]:
    """Every limit with what it did in this run, and the clusters that were not tested (and why)."""
    limits = doc.get("limits")
    if limits is None:  # a report written before the limits were recorded
        return []
    out = ["<h2>Limits</h2><p class=muted>Every setting that can keep a strategy cluster from the causal test or "
           "test it only in part, and what it did here. A cluster that was not tested makes the verdict incomplete."
           "</p><table><tr><th class=l>limit</th><th class=l>flag</th><th>value</th><th class=l>effect</th>"
           "<th>clusters</th><th>images</th><th>lifted by</th><th class=l>what it does</th></tr>"]
    for e in limits:
        lift = f"{html.escape(e['flag'])} {e['lift']:g}" if e["flag"] and e["lift"] is not None else "–"
        count = e.get("classes", e["clusters"]) if e["limit"] == "max_clusters" else e["clusters"]
        unit = " classes" if e["limit"] == "max_clusters" else ""
        out.append(f"<tr><td class=l>{html.escape(e['limit'])}</td><td class=l>{html.escape(e['flag'] or '–')}</td>"
                   f"<td>{e['value']:g}</td><td class=l>{html.escape(e['effect'])}</td><td>{count}{unit}</td>"
                   f"<td>{e['images']}</td><td>{lift}</td><td class=l>{html.escape(e['description'])}</td></tr>")
    out.append("</table>")
    skipped = doc.get("skipped", [])
    if skipped:
        out.append(f"<h3>Not tested: {len(skipped)} strategy clusters</h3><table><tr><th class=l>class</th>"
                   "<th>cluster</th><th>images</th><th class=l>limit</th><th class=l>why</th></tr>")
        for c in skipped:
            out.append(f"<tr><td class=l>{html.escape(c['class_name'])}</td><td>{c['cluster']}</td><td>{c['size']}</td>"
                       f"<td class=l>{html.escape(c['limit'])}</td><td class=l>{html.escape(c['reason'])}</td></tr>")
        out.append("</table>")
    return out


def render_discovery_html(doc: dict) -> str:
    """The whole page of one discovery (its JSON document, auditkit.discover/1)."""
    out = _head(f"auditkit discover: {doc['verdict']['label']}")
    out += [f"<h1>Shortcut discovery for "
            f"{html.escape(str(doc['checkpoint']['path'] or doc['checkpoint']['arch']))}</h1>",
            f"<p class=muted>{html.escape(doc['checkpoint']['arch'])} on {html.escape(doc['data']['spec'])} "
            f"({doc['data']['samples']} images, accuracy {_fmt(doc['accuracy'])}), auditkit {doc['auditkit_version']}, "
            f"{doc['created']}, {doc['seconds']} s</p>"]
    out += render_discovery_section(doc)
    out += [_LOADED_SCRIPT, "</body></html>"]
    return "\n".join(out)


def write_discovery_html(doc: dict, path: str | Path) -> Path:
    from .._io import atomic_write_text

    return atomic_write_text(path, render_discovery_html(doc), overwrite=True)
