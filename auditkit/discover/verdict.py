"""What a discovery could not test and what to do next: the limits that kept strategy clusters from the
causal test (stated, never silent; docs/discover.md "Limits"), and the recommendation."""

from __future__ import annotations

import numpy as np

from .config import DiscoveryConfig
from .record import LimitEntry, Recommendation, as_json


def _limit(limit: str, flag: str | None, value, effect: str, skips: bool, clusters: int, images: int,
           description: str, lift=None, **extra) -> LimitEntry:
    return LimitEntry(limit, flag, value, effect, skips, clusters, images, lift, description, extra)


def discovery_limits(rows: list[dict], clusters, samples: int, probed: int,
                     config: DiscoveryConfig) -> list[LimitEntry]:
    """Every setting that kept a strategy cluster (or some of its images) from the causal test, or
    tested it only in part, with what it did in this run: ``limit`` (the DiscoveryConfig field),
    ``flag`` (the `auditkit discover` option, None when there is none), ``value``, ``effect``,
    ``skips`` (True: clusters it applies to were not tested at all; they make the verdict incomplete),
    ``clusters`` and ``images`` it applied to, and ``lift``: the value that would let them all through
    (None when no value would). Discovery has no time budget: every cluster these limits let through
    is tested."""
    untested = lambda key: [r for r in rows if r["untested"] and r["untested"][0] == key]
    size = lambda r: len(r["cluster"].members)
    small, large, unboxed = untested("min_cluster"), untested("max_area"), untested("boxed_members")
    tested = [r for r in rows if r["candidate"]]
    area = lambda r: max(r["region"].area, r["box_area"] or 0.0)
    boxed_lift = min((len(r["boxes"]) for r in unboxed), default=0)
    per_class = np.bincount([c.label for c in clusters]) if len(clusters) else np.zeros(0, int)
    capped = int(np.sum(per_class >= config.max_clusters))
    sampled = [r for r in tested if len(r["boxes"]) > config.max_tested]
    lacking = [r for r in rows if r["without_control"]]
    overlapping = [r for r in tested if r["test"]["control_overlap"]["images"]]
    return [
        _limit("min_cluster", "--min-cluster", config.min_cluster, "not tested", True, len(small),
               sum(size(r) for r in small), "strategy clusters with fewer images are not tested (too few for a paired "
               "bootstrap interval)", min((size(r) for r in small), default=None)),
        _limit("max_area", "--max-area", config.max_area, "not tested", True, len(large), sum(size(r) for r in large),
               "strategy clusters whose region (the fewest pixels holding half their mean relevance), or their images' "
               "median box, covers a larger share of the image are not tested (0.5 by default: a box larger than half "
               "the image has no room for a control region of its size beside it)",
               min(1.0, float(np.ceil(max(area(r) for r in large) * 100) / 100)) if large else None),
        _limit("boxed_members", "--min-cluster", config.min_cluster, "not tested", True, len(unboxed),
               sum(size(r) for r in unboxed), "strategy clusters where fewer images than this have a proposed box "
               "(their own relevance in the cluster's region) with a control region are not tested",
               boxed_lift if unboxed and boxed_lift >= 1 else None),
        _limit("max_control_overlap", None, config.max_control_overlap, "images not tested", False, len(lacking),
               sum(r["without_control"] for r in lacking), "images whose box has no control region of its size sharing "
               "at most this share of its pixels get no test and no mask; boxes without room for a disjoint control "
               "are tested against the least overlapping one (conservative)",
               overlapping={"clusters": len(overlapping),
                            "images": sum(r["test"]["control_overlap"]["images"] for r in overlapping)}),
        _limit("max_clusters", "--max-clusters", config.max_clusters, "strategies merged", False, capped, 0,
               "per class at most this many strategy clusters; classes that reached it may merge strategies (the "
               "merged cluster is still tested)", config.max_clusters * 2 if capped else None, classes=capped),
        _limit("max_tested", "--max-tested", config.max_tested, "tested on a sample", False, len(sampled),
               sum(len(r["boxes"]) - config.max_tested for r in sampled), "images per candidate in the causal test (a "
               "seeded sample; the masks come from finding the confirmed artefact on every image)",
               max((len(r["boxes"]) for r in sampled), default=None)),
        _limit("probe_samples", "--probe-samples", config.probe_samples, "probed on a sample", False, 0,
               samples - probed, "images the global probes edit (a seeded sample)",
               samples if probed < samples else None),
    ]


def untested_summary(limits: list, clusters: int) -> str | None:
    """One sentence on the strategy clusters that were not tested and how to test them; None when none."""
    parts, total = [], 0
    for entry in map(as_json, limits):  # records or their JSON (a report read back)
        if not entry["skips"] or not entry["clusters"]:
            continue
        total += entry["clusters"]
        n, value, lift, one = entry["clusters"], entry["value"], entry["lift"], entry["clusters"] == 1
        rerun = f"rerun with {entry['flag']} {lift:g}" if lift is not None else "no setting lifts this"
        what = {"min_cluster": f"{'is' if one else 'are'} smaller than {value} images",
                "max_area": f"cover{'s' if one else ''} more than {value:g} of the image",
                "boxed_members": f"{'has' if one else 'have'} fewer than {value} images with a proposed box and a "
                                 "control region"}
        parts.append(f"{n} {what[entry['limit']]} ({rerun})")
    if not total:
        return None
    return f"{total} of {clusters} strategy clusters were not tested because " + "; ".join(parts)


def _rerun_flags(limits: list) -> list[str]:
    flags: dict[str, float] = {}
    for entry in map(as_json, limits):
        if entry["skips"] and entry["clusters"] and entry["lift"] is not None:
            # --min-cluster serves two limits: the smaller value lets both through.
            flags[entry["flag"]] = min(flags.get(entry["flag"], entry["lift"]), entry["lift"])
    return [f"{flag} {value:g}" for flag, value in flags.items()]


def _recommendation(localised: list, global_signals: list[str], data_spec: str, checkpoint: str | None,
                    out_dir: str | None, arch: str, untested: str | None = None,
                    rerun: list[str] = ()) -> Recommendation:
    ckpt = checkpoint or "MODEL.safetensors"
    stem = ckpt.rsplit(".", 1)[0]
    if localised:
        data = out_dir or "DISCOVERED"
        return Recommendation(
            "auto", "localised",
            "a localised shortcut: repair with the proposed masks, TAP first and RRR if TAP fails "
            "(docs/repair.md, which method for which shortcut), proved on the masked validation split",
            f"auditkit repair {ckpt} --data {data} --method auto --fail-on-shortcut --out {stem}-repaired.safetensors")
    if global_signals:
        from ..repair.teacher import TEACHER_RECIPE  # here: discovery's import stays free of the repair package

        return Recommendation(
            "tea", "global",
            f"a global shortcut ({', '.join(global_signals)}): no region to mask; TEA distils the "
            "explanations of a teacher trained on a small clean split (Bassi et al. 2024, "
            "arXiv:2407.09788)",
            # the one teacher recipe (issue 28), as auto trains it
            TEACHER_RECIPE.command(arch, "CLEAN_DATA", variant=None) + " && "
            f"auditkit repair {ckpt} --data {data_spec} --method tea --teacher teacher.safetensors "
            f"--out {stem}-repaired.safetensors")
    if untested:
        return Recommendation(
            "none", "untested",
            f"no tested candidate region beat its control and no global probe pointed at a signal, but {untested}",
            (f"auditkit discover {ckpt} --data {data_spec} --out {out_dir or 'DISCOVERED'} --force "
             + " ".join(rerun)) if rerun else None)
    return Recommendation("none", "none", "no candidate region beat its control and no global probe pointed at a "
                          "signal", None)
