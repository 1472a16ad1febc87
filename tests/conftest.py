"""Shared test settings: explicit seeds, hypothesis profile, device parametrisation."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic example generation: the same examples on every run and machine.
settings.register_profile(
    "auditkit",
    derandomize=True,
    deadline=None,
    max_examples=int(os.environ.get("AUDITKIT_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("auditkit")

CUDA_SKIP_REASON = "no CUDA GPU on this machine (CUDA kernels are compiled but cannot run here)"

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)],
    ),
]


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield
