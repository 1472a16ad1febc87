"""The prepared GPU check (make gpu-check) and the GPU benchmarks, run where there is no GPU so that
they cannot rot between the rare GPU sessions (issue 13)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
gpu_check = runpy.run_path(str(ROOT / "tools" / "gpu_check.py"), run_name="gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_without_a_gpu_the_check_says_so_in_one_line_and_exits_0():
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable}
    done = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: skipped the GPU part: ")
    assert "no CUDA GPU visible" in lines[0] or "CPU-only" in lines[0]


def test_make_has_the_gpu_targets():
    makefile = (ROOT / "Makefile").read_text()
    assert "gpu-check:\n\tbash tools/gpu_check.sh" in makefile
    assert "gpu-wheels:\n\tbash tools/gpu_wheels.sh" in makefile
    wheels = (ROOT / "tools" / "gpu_wheels.sh").read_text()
    for package in ("mlxtend==", "zennit==", "captum==", "grad-cam==", "jsonschema=="):
        assert package in wheels
    assert "--python-version 3.12" in wheels


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_a" name="test_ok"/>
<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.test_b"
 name="test_broken"><error message="RuntimeError: no kernel image">trace</error></testcase>
<testcase classname="tests.test_b" name="test_two_gpus"><skipped message="needs two CUDA GPUs"/></testcase>
</testsuite></testsuites>
"""


def test_results_count_failures_and_say_failed(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    summary = gpu_check["summarise_junit"](path)
    counts = (summary["tests"], summary["passed"], summary["failed"], summary["errors"], summary["skipped"])
    assert counts == (4, 1, 1, 1, 1)
    assert summary["failures"][1] == {"test": "tests.test_b::test_broken", "message": "RuntimeError: no kernel image"}
    check = gpu_check["Check"](tmp_path / "out")
    check.report["gpu"] = {"name": "NVIDIA H200", "capability": "9.0", "count": 1, "torch": "2.11.0", "python": "3.12"}
    check.report["tests"] = summary
    check.steps.append({"name": "build", "rc": 0, "seconds": 12.0, "tail": ""})
    assert check.write() == 1  # a failed CUDA test fails the check
    text = (tmp_path / "out" / "gpu-results.md").read_text()
    assert text.startswith("# auditkit GPU check: FAILED") and "NVIDIA H200" in text and "torch 2.11.0" in text
    assert "FAILED tests.test_a::test_bad: assert 1 == 2" in text
    assert json.loads((tmp_path / "out" / "gpu-results.json").read_text())["ok"] is False


def test_gpu_benchmarks_run_at_toy_sizes_on_the_cpu(tmp_path):
    from benchmarks import gpu_bench

    # No budget to speak of: on a loaded CI machine the toy sizes can take minutes, and a section
    # stopped by the budget is an error (its figures are missing).
    code = gpu_bench.main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--budget", "100000"])
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert code == 0, report["errors"]
    assert report["complete"] is True and report["running"] is None
    assert set(report["sections"]) == set(gpu_bench.SECTIONS)
    for dtype in ("bfloat16", "float32"):
        entry = report["sections"]["tap_ops"][dtype]
        assert entry["forward_gb_per_s"] > 0 and entry["penalty_fused_vs_eager"] > 0
    training = report["sections"]["training"]
    for config in training.values():
        for method in ("tap", "rrr", "tea", "tea_cached"):
            assert f"{method}_time_ratio" in config, config.get(f"{method}_error")
    assert report["sections"]["lrp"]["bf16_map_cosine_min"] > 0.9
    text = (tmp_path / "gpu-bench.md").read_text()
    assert "training step (bf16)" in text and "Audit throughput" in text
    vit = report["sections"]["vit"]
    assert {"fp32_attnlrp_vs_gradient", "bf16_attnlrp_vs_gradient", "bf16_tap_step_vs_plain"} <= set(vit)
    assert "Vision transformer" in text
