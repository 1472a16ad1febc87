"""Collects benchmark medians and prints ratios against baselines measured in the same run.

Goals are reported (met / missed), never asserted: timings are not unit tests.
"""

from __future__ import annotations

import json
import os
import platform
from collections import defaultdict
from pathlib import Path

import pytest
import torch

# RESULTS[config][measure] = value; measures are medians in seconds, bytes, ...
RESULTS: dict[str, dict[str, float | None]] = defaultdict(dict)
REPORTS: list = []  # callables(terminalreporter) registered by benchmark modules


@pytest.fixture
def record():
    def _record(config: str, measure: str, value):
        RESULTS[config][measure] = value

    return _record


def median_seconds(benchmark) -> float:
    return benchmark.stats.stats.median


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    for report in REPORTS:
        report(terminalreporter, RESULTS)
    out = Path(os.environ.get("AUDITKIT_BENCH_JSON", ".benchmarks/auditkit_ratios.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2))
    terminalreporter.write_line(f"raw numbers: {out}")
