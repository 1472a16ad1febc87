"""Discovery's settings and the labels of its verdict (see runner.py for what it does)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ParameterError
from ..explain.defaults import EPSILON_AUDIT

SCHEMA = "auditkit.discover/1"
SHORTCUT_FOUND, NO_SHORTCUT = "shortcut found", "no shortcut found"
# Nothing found, but some strategy clusters were not tested (a limit kept them out): never "no shortcut".
NOT_ALL_TESTED = "no shortcut among the tested candidates"


@dataclass(frozen=True)
class DiscoveryConfig:
    """Settings of ``run_discovery``; every threshold is a share (0..1)."""

    epsilon: float = EPSILON_AUDIT  # LRP-ε stabiliser (explain/defaults.py)
    batch_size: int = 128
    device: str | torch.device = "auto"  # where the model is ("auto"), cpu | cuda | cuda:N or a torch.device
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
    # Propagation (propagate.py, issue 28): a confirmed artefact is masked on every image whose best window
    # matches its template (NCC >= match_threshold, varying at least match_contrast x as much as the
    # template), with a context ring of match_margin pixels; False masks the confirming clusters' boxes only.
    propagate: bool = True
    match_threshold: float = 0.9
    match_contrast: float = 0.1
    match_margin: int = 1

    def validate(self) -> None:
        for name in ("batch_size", "analysis_side", "grid", "max_clusters", "min_cluster", "bootstrap", "max_tested"):
            if getattr(self, name) < 1:
                raise ParameterError(name, f"must be at least 1; got {getattr(self, name)}")
        for name in ("mass", "max_area", "confidence", "probe_retained", "box_level"):
            if not 0 < getattr(self, name) <= 1:
                raise ParameterError(name, f"must lie in (0, 1]; got {getattr(self, name)}")
        if not 0 <= self.max_control_overlap < 1:
            raise ParameterError("max_control_overlap", f"must lie in [0, 1); got {self.max_control_overlap}")
        if not 0 < self.match_threshold <= 1 or not 0 <= self.match_contrast <= 1:
            raise ParameterError("match_threshold" if not 0 < self.match_threshold <= 1 else "match_contrast",
                                 "must lie in (0, 1] (match_contrast in [0, 1])")
        if self.match_margin < 1:
            raise ParameterError("match_margin", f"must be at least 1 (a uniform artefact needs its context); "
                                                 f"got {self.match_margin}")
        if self.epsilon < 0 or self.probe_samples < 0 or self.exemplars < 0:
            raise ParameterError("epsilon" if self.epsilon < 0 else "probe_samples" if self.probe_samples < 0
                                 else "exemplars", "must not be negative")
