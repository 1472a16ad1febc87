"""run_discovery: audit a model when nobody has masks or variants.

1. One LRP-ε pass (relevance of each image's label) over the analysed images — the dominant cost,
   sharded under torchrun.
2. Strategy clusters per class (SpRAy, spray.py).
3. Candidate artefacts: clusters of at least ``min_cluster`` images whose mean relevance lies in a
   region (the fewest pixels holding ``mass`` of it cover at most ``max_area`` of the image, 0.5 by
   default); each member's proposed mask is its own most relevant box within that region (regions.py).
   Every cluster that a limit keeps from the test is listed with the limit, its value and its flag
   (``discovery_limits``); then the verdict is never "no shortcut found".
4. The causal test of each candidate against a control region of the same area in the same images
   (causal.py): a candidate is a shortcut only when its effect clearly beats the control's. A box
   with no room for a disjoint control is tested against the least overlapping one (conservative).
5. Global probes that need no mask (probes.py): colour, texture and frequency.
6. A recommendation: localised shortcut -> mask-based repair with the proposed masks (``auto``: TAP,
   then RRR, ... until the repair proves itself; docs/repair.md "Which method for which shortcut");
   global -> TEA with a small clean teacher split; neither -> "no shortcut found", with what was tested,
   or "no shortcut among the tested candidates" with what was not and the rerun that tests it.

The report is data (schema ``auditkit.discover/1``); ``proposed_dataset`` turns it into a dataset
with the proposed masks that ``auditkit repair --data`` reads unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .._progress import progress_bar
from .._version import __version__
from ..audit import metrics as M
from ..audit.tiles import encode_map, encode_picture
from ..data import AuditDataset, DatasetInfo, Record, collate
from ..data.masks import annotated
from ..device import autocast, device_for, resolve_precision
from ..distributed import Context, gather
from ..errors import AuditkitError, DataError, ParameterError
from ..explain import attribute
from .causal import dispersion, edit_effects
from .probes import run_probes
from .regions import (
    box_mask,
    cluster_region,
    control_box,
    dilate,
    overlapping_control_box,
    proposed_box,
    scale_box,
)
from .spray import relevance_distribution, strategy_clusters

SCHEMA = "auditkit.discover/1"
SHORTCUT_FOUND, NO_SHORTCUT = "shortcut found", "no shortcut found"
# Nothing found, but some strategy clusters were not tested (a limit kept them out): never "no shortcut".
NOT_ALL_TESTED = "no shortcut among the tested candidates"


@dataclass(frozen=True)
class DiscoveryConfig:
    """Settings of ``run_discovery``; every threshold is a share (0..1)."""

    epsilon: float = 0.01  # LRP-ε stabiliser
    batch_size: int = 128
    device: str = "auto"  # where the model is ("auto") or cpu | cuda | cuda:N
    precision: str = "auto"
    seed: int = 0
    analysis_side: int = 64  # relevance maps are area-averaged to at most this many pixels a side
    grid: int = 8  # SpRAy features: relevance on grid x grid cells
    max_clusters: int = 8  # per class
    min_cluster: int = 10  # smaller clusters are listed, not tested
    mass: float = 0.5  # a cluster's region: the fewest pixels holding this share of its mean relevance
    # Candidate regions cover at most this share of the image. 0.5: a box larger than half the image is
    # taller and wider than half of it, so no control region of its size fits beside it; a region of
    # half the relevance spread over more than half the image is no localised artefact (the global
    # probes test those). It was 0.1 and silently skipped a ruler covering 20 % (issue 29).
    max_area: float = 0.5
    box_level: float = 0.1  # a member's box holds its pixels in the region with at least this x its peak relevance
    effect_threshold: float = 0.10  # candidate - control effect (share of images) that counts
    max_tested: int = 200  # images per candidate in the causal test (a seeded sample; all get masks)
    max_dispersion: float = 0.05  # mean absolute deviation of the candidate boxes' content (pixel units)
    max_dispersion_ratio: float = 0.5  # ... and relative to the control boxes'
    probe_samples: int = 1000  # images the global probes edit
    probe_drop: float = 0.10  # accuracy drop under a shape-preserving probe that counts
    probe_retained: float = 0.5  # share of above-chance accuracy kept under a shape-destroying probe that counts
    bootstrap: int = 1000
    confidence: float = 0.95
    exemplars: int = 6  # per cluster, in the report
    # A box without room for a disjoint control gets one of its size sharing at most this share of its
    # pixels with it (regions.overlapping_control_box: conservative); above it, the member is untested.
    max_control_overlap: float = 0.5

    def validate(self) -> None:
        for name in ("batch_size", "analysis_side", "grid", "max_clusters", "min_cluster", "bootstrap", "max_tested"):
            if getattr(self, name) < 1:
                raise ParameterError(name, f"must be at least 1; got {getattr(self, name)}")
        for name in ("mass", "max_area", "confidence", "probe_retained", "box_level"):
            if not 0 < getattr(self, name) <= 1:
                raise ParameterError(name, f"must lie in (0, 1]; got {getattr(self, name)}")
        if not 0 <= self.max_control_overlap < 1:
            raise ParameterError("max_control_overlap", f"must lie in [0, 1); got {self.max_control_overlap}")
        if self.epsilon < 0 or self.probe_samples < 0 or self.exemplars < 0:
            raise ParameterError("epsilon" if self.epsilon < 0 else "probe_samples" if self.probe_samples < 0
                                 else "exemplars", "must not be negative")


@dataclass
class DiscoveryReport:
    """``data``: the JSON document (schema auditkit.discover/1); ``masks``: dataset index -> proposed
    mask (H, W) float32 in the dataset's image size, for every image of a confirmed candidate that has
    a box (never an empty mask)."""

    data: dict
    masks: dict[int, np.ndarray]

    @property
    def found(self) -> bool:
        return self.data["verdict"]["label"] == SHORTCUT_FOUND

    @property
    def complete(self) -> bool:
        """Whether every candidate was tested (no limit kept one from its causal test)."""
        return bool(self.data["verdict"].get("complete", True))

    def exit_code(self, fail_on_shortcut: bool) -> int:
        """0; with ``fail_on_shortcut``: 1 when a shortcut is found, 3 when none was found but some
        candidates were never tested (a gate must not pass what it did not test; the audit's rule)."""
        if not fail_on_shortcut:
            return 0
        if self.found:
            return 1
        return 0 if self.complete else 3


def _analysis_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def relevance_pass(model, dataset: AuditDataset, config: DiscoveryConfig, context: Context,
                   show_progress: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Relevance distributions (N, h, w) float32 of every image's label, at the analysis size, and
    the model's predictions (N,)."""
    size = _analysis_size(dataset.image_size, config.analysis_side)
    starts = list(range(0, len(dataset), config.batch_size))[context.rank :: context.world_size]
    parts = []
    with progress_bar("explaining (LRP-ε)", total=len(starts), enabled=show_progress and context.is_main) as bar:
        for start in starts:
            indices = list(range(start, min(start + config.batch_size, len(dataset))))
            batch = collate([dataset[i] for i in indices]).to(config.device)
            with autocast(config.device, config.precision):
                with torch.no_grad():
                    predictions = model(batch.images).argmax(1)
                maps = attribute(model, batch.images, batch.labels, "lrp_epsilon", epsilon=config.epsilon)[:, 0]
            maps = maps.float().cpu()
            if tuple(maps.shape[-2:]) != size:
                maps = F.adaptive_avg_pool2d(maps[:, None], size)[:, 0]
            parts.append((start, relevance_distribution(maps).float().numpy(), predictions.cpu().numpy()))
            bar.advance(1)
    parts = sorted(gather(context, parts), key=lambda p: p[0])
    return (torch.from_numpy(np.concatenate([p[1] for p in parts])), np.concatenate([p[2] for p in parts]))


def _images(dataset: AuditDataset, indices, device) -> torch.Tensor:
    return torch.stack([dataset[int(i)].image for i in indices]).to(device)


class _ImageBatches:
    """The batches of ``indices``, decoded once and kept when they fit in 256 MB (the probes edit
    the same images six times; decoding them again cost as much as the model's forward passes)."""

    LIMIT_BYTES = 256 * 2**20

    def __init__(self, dataset: AuditDataset, indices, config) -> None:
        self.dataset, self.indices, self.config = dataset, indices, config
        height, width = dataset.image_size
        fits = len(indices) * dataset.channels * height * width * 4 <= self.LIMIT_BYTES
        self.kept = [self.load(start) for start in self.starts()] if fits else None

    def starts(self) -> range:
        return range(0, len(self.indices), self.config.batch_size)

    def load(self, start: int) -> torch.Tensor:
        return _images(self.dataset, self.indices[start : start + self.config.batch_size], self.config.device)

    def __iter__(self):
        for number, start in enumerate(self.starts()):
            yield start, (self.kept[number] if self.kept is not None else self.load(start))


def _predict_batches(model, dataset, indices, config, edit, batches: _ImageBatches) -> np.ndarray:
    """Predictions (N,) for ``batches`` of ``indices`` after ``edit(images, seed)`` (which must not
    change its input: the batches are reused)."""
    out = []
    for start, images in batches:
        if edit is not None:
            images = edit(images, config.seed + start)
        with torch.no_grad(), autocast(config.device, config.precision):
            out.append(model(images).argmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, int)


def _estimate(values: np.ndarray, seed: int, config: DiscoveryConfig) -> M.Estimate:
    values = values[~np.isnan(values)]
    return M.bootstrap_mean(values.tolist(), resamples=config.bootstrap, confidence=config.confidence, seed=seed)


def _candidates(clusters, distributions, labels, predictions, config):
    """Per cluster: its region and, for candidates, every member's proposed and control boxes
    (analysis size). A cluster that is not tested says why: row["untested"] = (limit, reason), the
    limit being the DiscoveryConfig field that kept it out (run_discovery lists them all)."""
    rows = []
    for number, cluster in enumerate(clusters):
        members = cluster.members
        region = cluster_region(distributions[members], config.mass)
        row = {"cluster": cluster, "region": region, "number": number, "boxes": {}, "controls": {}, "overlaps": {},
               "accuracy": float(np.mean(predictions[members] == labels[members])), "untested": None,
               "without_box": 0, "without_control": 0, "box_area": None}
        if len(members) < config.min_cluster:
            row["untested"] = ("min_cluster", f"{len(members)} images, fewer than {config.min_cluster}")
        elif region.area > config.max_area:
            row["untested"] = ("max_area", f"its region covers {region.area:.3f} of the image, more than "
                                           f"{config.max_area:g}")
        else:
            avoid = dilate(region.mask, 1)
            for position in members:
                distribution = distributions[position].double().numpy()
                box = proposed_box(distribution, region.mask, level=config.box_level)
                if box is None:  # no relevance of its own in the cluster's region
                    row["without_box"] += 1
                    continue
                control, overlap = control_box(distribution, box, avoid=avoid), 0.0
                if control is None:  # no room for a disjoint control: the least overlapping one
                    found = overlapping_control_box(distribution, box, max_overlap=config.max_control_overlap)
                    control, overlap = found if found is not None else (None, 0.0)
                if control is None:
                    row["without_control"] += 1
                    continue
                position = int(position)
                row["boxes"][position], row["controls"][position], row["overlaps"][position] = box, control, overlap
            # The members' own boxes must keep within max_area too (median), not only the cluster's region.
            areas = [b[2] * b[3] / region.mask.size for b in row["boxes"].values()]
            row["box_area"] = float(np.median(areas)) if areas else None
            if len(areas) < config.min_cluster:
                row["untested"] = ("boxed_members", f"{len(areas)} of its {len(members)} images have a proposed box "
                                   f"with a control ({row['without_box']} no relevance in the cluster's region, "
                                   f"{row['without_control']} no control region sharing at most "
                                   f"{config.max_control_overlap:.0%} of the box), fewer than {config.min_cluster}")
            elif row["box_area"] > config.max_area:
                row["untested"] = ("max_area", f"its images' boxes cover {row['box_area']:.3f} of the image "
                                               f"(median), more than {config.max_area:g}")
        row["candidate"] = row["untested"] is None
        rows.append(row)
    return rows


def _causal_tests(model, dataset, rows, labels, predictions, size, config):
    """Runs the causal test of every candidate row (adds row["test"] and row["shortcut"])."""
    scale = lambda box: scale_box(box, size, dataset.image_size)
    correct = predictions == labels
    # Recipients: correctly classified members of other classes' candidates (their own region is
    # removed before the transplant), else any correctly classified image of another class.
    boxed = {p: r["boxes"][p] for r in rows if r["candidate"] for p in r["boxes"] if correct[p]}
    rng = np.random.default_rng(config.seed)
    for row in [r for r in rows if r["candidate"]]:
        label = row["cluster"].label
        positions = sorted(row["boxes"])
        if len(positions) > config.max_tested:
            positions = sorted(int(p) for p in rng.choice(positions, config.max_tested, replace=False))
        images = _images(dataset, positions, config.device)
        others = np.array([p for p in boxed if labels[p] != label], int)
        if not len(others):
            others = np.flatnonzero(correct & (labels != label))
        chosen = [int(j) for j in others[rng.integers(len(others), size=len(positions))]] if len(others) else []
        recipients = [(dataset[j].image.to(config.device), scale(boxed[j]) if j in boxed else None) for j in chosen]
        recipients += [None] * (len(positions) - len(recipients))
        with autocast(config.device, config.precision):
            effects = edit_effects(model, images, predictions[positions], [scale(row["boxes"][p]) for p in positions],
                                   [scale(row["controls"][p]) for p in positions], recipients, label,
                                   seed=config.seed, batch_size=config.batch_size)
        seed = config.seed + 700 + 10 * row["number"]
        test = {kind: _estimate(effects[kind], seed + k, config).as_dict()
                for k, kind in enumerate(("removal", "control_removal", "transplant", "control_transplant"))}
        removal = _estimate(effects["removal"] - effects["control_removal"], seed + 5, config)
        transplant = _estimate(effects["transplant"] - effects["control_transplant"], seed + 6, config)
        test["removal_beyond_control"], test["transplant_beyond_control"] = removal.as_dict(), transplant.as_dict()
        spread = dispersion(images, [scale(row["boxes"][p]) for p in positions])
        control_spread = dispersion(images, [scale(row["controls"][p]) for p in positions])
        ratio = spread / control_spread if control_spread > 0 else (0.0 if spread == 0 else float("inf"))
        test["dispersion"] = {"candidate": spread, "control": control_spread, "ratio": ratio}
        shared = [row["overlaps"][p] for p in positions]
        # How the test was run: on a sample when the cluster has more boxed images than max_tested, and
        # with controls that share pixels with the candidate when its boxes are too large for a
        # disjoint one (conservative: see regions.overlapping_control_box).
        test["images"], test["boxed_images"] = len(positions), len(row["boxes"])
        test["control_overlap"] = {"mean": float(np.mean(shared)), "images": int(np.sum(np.asarray(shared) > 0))}
        threshold = config.effect_threshold
        # Removal alone cannot tell an artefact from the object's most telling part, and a transplant
        # misses artefacts the model needs but does not follow alone (decoy MNIST); so: the region must
        # matter beyond its control by either edit AND repeat itself across the images (causal.py).
        matters = removal.low > threshold or (transplant.samples > 0 and transplant.low > threshold)
        repeats = spread <= config.max_dispersion and ratio <= config.max_dispersion_ratio
        shortcut = matters and repeats
        test["rule"] = (f"removal beyond control {removal.value:.3f} [{removal.low:.3f}, {removal.high:.3f}], "
                        f"transplant beyond control {transplant.value:.3f} [{transplant.low:.3f}, {transplant.high:.3f}] "
                        f"(a lower end above {threshold:g}: {'yes' if matters else 'no'}); content dispersion "
                        f"{spread:.3f} <= {config.max_dispersion:g}, vs control {control_spread:.3f} (ratio {ratio:.2f} <= "
                        f"{config.max_dispersion_ratio:g}): "
                        f"{'yes' if repeats else 'no'})")
        if test["control_overlap"]["images"]:
            test["rule"] += (f"; the control shares {test['control_overlap']['mean']:.0%} of the box's pixels on "
                             f"average ({test['control_overlap']['images']} images: no room for a disjoint one), "
                             "which can hide a shortcut but not invent one")
        row["test"], row["shortcut"] = test, bool(shortcut)


def _heat_entry(values: np.ndarray) -> dict:
    return encode_map(torch.from_numpy(np.asarray(values, np.float32)))


def _exemplars(dataset, row, distributions, size, count):
    members = row["cluster"].members
    chosen = sorted(row["boxes"])[:count] if row["boxes"] else [int(p) for p in members[:count]]
    out = []
    for position in chosen:
        sample = dataset[int(position)]
        entry = {"index": int(position), "image": encode_picture(sample.image),
                 "heatmap": _heat_entry(distributions[position].numpy())}
        if position in row["boxes"]:
            box = scale_box(row["boxes"][position], size, dataset.image_size)
            entry["proposed_box"] = list(box)
            entry["mask"] = encode_picture(torch.from_numpy(box_mask(box, dataset.image_size))[None])
        out.append(entry)
    return out


def _limit(limit: str, flag: str | None, value, effect: str, skips: bool, clusters: int, images: int,
           description: str, lift=None, **extra) -> dict:
    return {"limit": limit, "flag": flag, "value": value, "effect": effect, "skips": skips, "clusters": clusters,
            "images": images, "lift": lift, "description": description, **extra}


def discovery_limits(rows: list[dict], clusters, samples: int, probed: int, config: DiscoveryConfig) -> list[dict]:
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
               "seeded sample; every image of a confirmed candidate still gets its mask)",
               max((len(r["boxes"]) for r in sampled), default=None)),
        _limit("probe_samples", "--probe-samples", config.probe_samples, "probed on a sample", False, 0,
               samples - probed, "images the global probes edit (a seeded sample)",
               samples if probed < samples else None),
    ]


def untested_summary(limits: list[dict], clusters: int) -> str | None:
    """One sentence on the strategy clusters that were not tested and how to test them; None when none."""
    parts, total = [], 0
    for entry in limits:
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


def _rerun_flags(limits: list[dict]) -> list[str]:
    flags: dict[str, float] = {}
    for entry in limits:
        if entry["skips"] and entry["clusters"] and entry["lift"] is not None:
            # --min-cluster serves two limits: the smaller value lets both through.
            flags[entry["flag"]] = min(flags.get(entry["flag"], entry["lift"]), entry["lift"])
    return [f"{flag} {value:g}" for flag, value in flags.items()]


def _recommendation(localised: list[dict], global_signals: list[str], data_spec: str, checkpoint: str | None,
                    out_dir: str | None, arch: str, untested: str | None = None, rerun: list[str] = ()) -> dict:
    ckpt = checkpoint or "MODEL.safetensors"
    stem = ckpt.rsplit(".", 1)[0]
    if localised:
        data = out_dir or "DISCOVERED"
        return {"method": "auto", "kind": "localised",
                "reason": "a localised shortcut: repair with the proposed masks, TAP first and RRR if TAP fails "
                          "(docs/repair.md, which method for which shortcut), proved on the masked validation split",
                "command": f"auditkit repair {ckpt} --data {data} --method auto --fail-on-shortcut --out {stem}-repaired.safetensors"}
    if global_signals:
        return {"method": "tea", "kind": "global",
                "reason": f"a global shortcut ({', '.join(global_signals)}): no region to mask; TEA distils the "
                          "explanations of a teacher trained on a small clean split (seed 004)",
                "command": (f"auditkit train --data CLEAN_DATA --arch {arch} --fraction 0.1 --out teacher.safetensors && "
                            f"auditkit repair {ckpt} --data {data_spec} --method tea --teacher teacher.safetensors "
                            f"--out {stem}-repaired.safetensors")}
    if untested:
        return {"method": "none", "kind": "untested",
                "reason": f"no tested candidate region beat its control and no global probe pointed at a signal, but "
                          f"{untested}",
                "command": (f"auditkit discover {ckpt} --data {data_spec} --out {out_dir or 'DISCOVERED'} --force "
                            + " ".join(rerun)) if rerun else None}
    return {"method": "none", "kind": "none", "reason": "no candidate region beat its control and no global probe "
            "pointed at a signal", "command": None}


def real_masks(masks: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], int]:
    """The proposed masks that mark something (a pixel above 0.5), and how many were empty: an empty
    proposed mask would make every later mask test of that image vacuous, so it is never a mask."""
    kept = {k: m for k, m in masks.items() if annotated(np.asarray(m)).any()}
    return kept, len(masks) - len(kept)


def run_discovery(
    model,
    dataset: AuditDataset,
    config: DiscoveryConfig | None = None,
    *,
    context: Context | None = None,
    show_progress: bool = False,
    data_spec: str | None = None,
    checkpoint: str | None = None,
    out_dir: str | None = None,
) -> DiscoveryReport:
    """Finds the shortcuts of ``model`` (an auditkit model) on labelled ``dataset`` without masks.

    Returns a DiscoveryReport: strategy clusters, candidate artefacts with their causal tests,
    global probes, the limits that kept clusters from the test (``data["limits"]``, ``data["skipped"]``),
    the verdict ("shortcut found" / "no shortcut found" / "no shortcut among the tested candidates"
    when a limit kept some out) and the recommendation
    (``data["recommendation"]["method"]``: auto, tea or none, and the next command). ``out_dir``
    only names the folder the recommendation's command reads. Raises AuditkitError for empty data
    and ParameterError for bad settings. The model is explained in eval mode and left as it was.
    Source: SpRAy (Lapuschkin et al. 2019), the audit's counterfactuals, docs/discover.md."""
    config = config or DiscoveryConfig()
    context = context or Context()
    config.validate()
    if len(dataset) == 0:
        raise AuditkitError("the data has no samples to analyse (check the split asked for)")
    device = device_for(model, config.device, "discovery")
    config = replace(config, device=str(device), precision=resolve_precision(config.precision, device))
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    timings = {}  # seconds per stage, in the report: where the time goes

    def lap(stage: str) -> None:
        timings[stage] = round(time.perf_counter() - start - sum(timings.values()), 3)

    try:
        distributions, predictions = relevance_pass(model, dataset, config, context, show_progress)
        lap("relevance_pass")
        labels = np.array([r.label for r in dataset.records], int)
        size = tuple(distributions.shape[-2:])
        clusters = strategy_clusters(distributions, labels, grid=config.grid, max_clusters=config.max_clusters,
                                     seed=config.seed)
        rows = _candidates(clusters, distributions, labels, predictions, config)
        lap("clustering")
        _causal_tests(model, dataset, rows, labels, predictions, size, config)
        lap("causal_tests")
        rng = np.random.default_rng(config.seed)
        probe_indices = np.sort(rng.permutation(len(dataset))[: config.probe_samples])
        probe_labels = labels[probe_indices]
        batches = _ImageBatches(dataset, probe_indices, config)  # loaded once for every probe
        probes = run_probes(lambda edit: _predict_batches(model, dataset, probe_indices, config, edit, batches),
                            probe_labels,
                            predictions[probe_indices], dataset.num_classes, channels=dataset.channels,
                            seed=config.seed, resamples=config.bootstrap, confidence=config.confidence,
                            drop_threshold=config.probe_drop, retained_threshold=config.probe_retained)
        lap("probes")
        masks, empty = real_masks({position: box_mask(scale_box(box, size, dataset.image_size), dataset.image_size)
                                   for row in rows if row.get("shortcut") for position, box in row["boxes"].items()})
        cluster_entries = []
        for row in rows:
            cluster, region = row["cluster"], row["region"]
            cluster_entries.append({
                "class": int(cluster.label), "class_name": dataset.classes[cluster.label], "cluster": cluster.number,
                "size": len(cluster.members), "accuracy": row["accuracy"], "eigengap": cluster.eigengap,
                "region_area": region.area, "agreement": region.agreement, "box_area": row.get("box_area"),
                "candidate": row["candidate"], "shortcut": row.get("shortcut", False), "test": row.get("test"),
                "untested": ({"limit": row["untested"][0], "reason": row["untested"][1]} if row["untested"] else None),
                "without_box": row["without_box"], "without_control": row["without_control"],
                "masked": sum(p in masks for p in row["boxes"]) if row.get("shortcut") else 0,
                "mean_heatmap": _heat_entry(region.mean_map),
                "exemplars": _exemplars(dataset, row, distributions, size, config.exemplars),
            })
        confirmed = [e for e in cluster_entries if e["shortcut"]]
        global_signals = sorted({p["points_at"] for p in probes if p.get("points_at")})
        found = bool(confirmed or global_signals)
        limits = discovery_limits(rows, clusters, len(dataset), len(probe_indices), config)
        untested = untested_summary(limits, len(clusters))
        skipped = [{"class": e["class"], "class_name": e["class_name"], "cluster": e["cluster"], "size": e["size"],
                    **e["untested"]} for e in cluster_entries if e["untested"]]
        tested = (f"{len(clusters)} strategy clusters in {len(np.unique(labels))} classes, "
                  f"{sum(r['candidate'] for r in rows)} candidate regions causally tested"
                  + (f", {len(skipped)} not tested" if skipped else "")
                  + f", {sum(p['applicable'] for p in probes)} global probes")
        if confirmed:
            summary = (f"a localised shortcut: {len(confirmed)} of {len(clusters)} strategy clusters rely on a "
                       f"region ({len(masks)} images masked)")
        elif global_signals:
            summary = f"a global shortcut: the probes point at {', '.join(global_signals)}"
        elif untested:
            summary = f"no shortcut among the tested candidates; {untested}"
        else:
            summary = f"no shortcut found ({tested})"
        if found and untested:
            summary += f" ({untested})"
        label = SHORTCUT_FOUND if found else NOT_ALL_TESTED if untested else NO_SHORTCUT
        recommendation = _recommendation(confirmed, global_signals, data_spec or dataset.info.name, checkpoint, out_dir,
                                         model.meta.arch, untested, _rerun_flags(limits))
        lap("report")
    finally:
        model.train(was_training)
    meta = model.meta
    document = {
        "schema": SCHEMA,
        "auditkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": {"path": checkpoint, "arch": meta.arch, "classes": list(meta.class_names),
                       "input_size": list(meta.input_size), "in_channels": meta.in_channels,
                       "normalization": {"mean": list(meta.mean), "std": list(meta.std), "source": meta.normalization}},
        "data": {"spec": data_spec or dataset.info.name, "fingerprint": dataset.fingerprint(), "samples": len(dataset),
                 "splits": sorted({r.split for r in dataset.records}), "analysis_size": list(size)},
        "config": {k: v for k, v in config.__dict__.items()},
        "accuracy": float(np.mean(predictions == labels)),
        "clusters": cluster_entries,
        "probes": probes,
        "verdict": {"label": label, "summary": summary, "tested": tested, "localised": bool(confirmed),
                    "global": global_signals, "complete": not skipped, "untested": untested},
        "limits": limits,
        "skipped": skipped,
        "recommendation": recommendation,
        # Images without a real proposed region get no mask (never an empty one); their count is stated.
        "masks": {"images": len(masks), "without_mask": len(dataset) - len(masks), "empty_dropped": empty,
                  "mean_area": float(np.mean([m.mean() for m in masks.values()])) if masks else None},
        "seconds": round(time.perf_counter() - start, 2),
        "timings": timings,
    }
    return DiscoveryReport(document, masks)


def proposed_dataset(dataset: AuditDataset, report: DiscoveryReport) -> AuditDataset:
    """``dataset`` with the proposed masks (mask = 1 on the suspected artefact, ``mask_meaning``
    "spurious"): what ``auditkit repair --data`` and ``auditkit audit --data`` read. Images without a
    proposed region keep no mask: an empty proposed mask (no pixel above 0.5) is never written, since
    it would make the later mask tests of that image vacuous; ``report.data["masks"]`` counts them.
    The records' splits, variants and groups are kept. Raises DataError when a proposed mask's shape
    is not the dataset's image size (a report of other data)."""
    masks, _ = real_masks(report.masks)
    for k, mask in masks.items():
        if not 0 <= k < len(dataset) or tuple(np.shape(mask)) != tuple(dataset.image_size):
            raise DataError(f"the discovery's proposed mask for image {k} does not fit this data ({len(dataset)} "
                            f"images of {dataset.image_size[0]}x{dataset.image_size[1]}): give the data it ran on")
    records = [
        Record(record.image, record.label, (masks[k] * 255).astype(np.uint8) if k in masks else None,
               record.variant, record.group, record.split)
        for k, record in enumerate(dataset.records)
    ]
    info = DatasetInfo(f"{dataset.info.name} (discovered masks)", dataset.info.source, dataset.classes,
                       mask_meaning="spurious")
    return AuditDataset(records, info, channels=dataset.channels, image_size=dataset.image_size)
