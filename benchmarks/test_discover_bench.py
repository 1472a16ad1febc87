"""Discovery's cost: `run_discovery` over 1,000 decoy-MNIST test images of 28x28 (masks withheld), and
the one LRP-ε pass inside it, timed in the same run.

Goals (reported, not asserted): the whole discovery under 120 s on a 2-core CPU; the LRP pass's
share of it and every stage's seconds (the report's ``timings``: relevance pass, clustering, causal
tests, probes, report) are reported.
The shortcut model is trained here (tap-cnn, 2 epochs, seed 0) so the run needs no files.

Run: python -m pytest benchmarks/test_discover_bench.py -q
"""

from __future__ import annotations

import pytest

from auditkit.data import AuditDataset, Record, open_dataset
from auditkit.discover import DiscoveryConfig, run_discovery
from auditkit.discover.runner import relevance_pass
from auditkit.distributed import Context
from auditkit.training import TrainConfig, train_model

from .conftest import REPORTS, device_name, median_seconds

CONFIG = "discover_1000x28"
GOAL_SECONDS = 120.0


@pytest.fixture(scope="module")
def model_and_data():
    data = open_dataset("builtin:decoy-mnist")
    model = train_model(data, "tap-cnn", TrainConfig(epochs=2, seed=0), variant="contaminated", val_split=None).model
    test = data.select(split="test", variant="contaminated")
    stripped = AuditDataset([Record(r.image, r.label, None, r.variant, r.group, r.split) for r in test.records],
                            test.info, channels=test.channels, image_size=test.image_size)
    return model, stripped


def test_discovery_whole(benchmark, model_and_data, record):
    model, data = model_and_data
    # The warm-up round pays the one-time imports (scikit-learn: ~1 s), which are not discovery's cost.
    report = benchmark.pedantic(lambda: run_discovery(model, data), rounds=2, iterations=1, warmup_rounds=1)
    record(CONFIG, "discovery_s", median_seconds(benchmark))
    record(CONFIG, "stages", report.data["timings"])
    record(CONFIG, "verdict", report.data["verdict"]["label"])
    record(CONFIG, "device", device_name("cpu"))


def test_discovery_lrp_pass(benchmark, model_and_data, record):
    model, data = model_and_data
    config = DiscoveryConfig(device="cpu", precision="fp32")
    benchmark.pedantic(lambda: relevance_pass(model, data, config, Context(), False), rounds=3, iterations=1)
    record(CONFIG, "lrp_pass_s", median_seconds(benchmark))


def _report(terminal, results):
    row = results.get(CONFIG, {})
    if "discovery_s" not in row or "lrp_pass_s" not in row:
        return
    total, lrp = row["discovery_s"], row["lrp_pass_s"]
    verdict = "met" if total < GOAL_SECONDS else "MISSED"
    terminal.write_line(f"discovery, 1000 images of 28x28 ({row.get('device')}): {total:.1f} s (goal < {GOAL_SECONDS:.0f} s: "
                        f"{verdict}); the LRP pass {lrp:.1f} s = {lrp / total:.0%} of it; verdict {row.get('verdict')!r}")
    stages = row.get("stages") or {}
    if stages:
        terminal.write_line("  stages (s): " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in stages.items()))


REPORTS.append(_report)
