"""The evidence discovery gathers per image and per strategy cluster: the relevance pass, the candidate
regions with each member's proposed and control boxes, and their causal tests (runner.py steps 1, 3, 4)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .._progress import progress_bar
from ..audit import metrics as M
from ..data import AuditDataset, collate
from ..device import autocast
from ..distributed import Context, gather
from ..explain import attribute
from .causal import dispersion, edit_effects
from .config import DiscoveryConfig
from .regions import cluster_region, control_box, dilate, overlapping_control_box, proposed_box, scale_box
from .spray import relevance_distribution


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
                        f"transplant beyond control {transplant.value:.3f} "
                        f"[{transplant.low:.3f}, {transplant.high:.3f}] "
                        f"(a lower end above {threshold:g}: {'yes' if matters else 'no'}); content dispersion "
                        f"{spread:.3f} <= {config.max_dispersion:g}, vs control {control_spread:.3f} "
                        f"(ratio {ratio:.2f} <= "
                        f"{config.max_dispersion_ratio:g}): "
                        f"{'yes' if repeats else 'no'})")
        if test["control_overlap"]["images"]:
            test["rule"] += (f"; the control shares {test['control_overlap']['mean']:.0%} of the box's pixels on "
                             f"average ({test['control_overlap']['images']} images: no room for a disjoint one), "
                             "which can hide a shortcut but not invent one")
        row["test"], row["shortcut"] = test, bool(shortcut)
