"""Timing helpers shared by the benchmark modules."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")),
]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_ratio(candidate, baseline, pairs: int, device: str) -> float:
    """time(candidate) / time(baseline), measured interleaved (baseline, candidate, baseline, ...)
    and summarised by the median of the per-pair ratios, so drifting machine load cancels out."""
    ratios = []
    for _ in range(pairs):
        times = []
        for fn in (baseline, candidate):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        ratios.append(times[1] / times[0])
    return statistics.median(ratios)
