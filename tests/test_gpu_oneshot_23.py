"""The GPU check as one shot that cannot be wasted (issue 23): TF32 off in the tests, benchmark and
check results written as they come (a killed run keeps them, marked incomplete), steps that cannot
outlive their limit, and the README's one device call."""

from __future__ import annotations

import itertools
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import CUDA_SKIP_REASON, _float32_state, _set_float32_state, disable_tf32, tf32_settings

ROOT = Path(__file__).resolve().parent.parent
gpu_check = runpy.run_path(str(ROOT / "tools" / "gpu_check.py"), run_name="gpu_check")
HAS_FP32_PRECISION = hasattr(torch.backends.cuda.matmul, "fp32_precision")


# ---- TF32 off -------------------------------------------------------------------------------------


def assert_tf32_off():
    now = tf32_settings()
    assert now["cuda.matmul.allow_tf32"] is False and now["cudnn.allow_tf32"] is False, now
    assert now["float32_matmul_precision"] == "highest", now
    for key, value in now.items():
        if key.endswith("fp32_precision"):
            assert value == "ieee", now


class _no_warning:
    """Setting the legacy flags must not warn (a -W error run would fail on it)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def test_tf32_is_off_in_every_test():
    # conftest's autouse fixture: what a CUDA float32 conv or matmul in any test may use (read here on
    # the CPU too: the flags are process-wide, whatever the device).
    assert_tf32_off()


def test_turning_tf32_off_gives_back_the_setting_it_found():
    with _no_warning():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        saved = _float32_state()
        disable_tf32()
        assert_tf32_off()
        _set_float32_state(saved)
    now = tf32_settings()
    assert (now["cuda.matmul.allow_tf32"], now["cudnn.allow_tf32"], now["float32_matmul_precision"]) == (
        True, True, "high")
    # (the fixture puts TF32 off back for the rest of this test and the process's setting after it)


@pytest.mark.skipif(not HAS_FP32_PRECISION, reason=f"torch {torch.__version__} has no fp32_precision settings")
def test_a_setting_made_through_fp32_precision_alone_is_given_back_too():
    # Set through the new view alone, the legacy flags can no longer be read (torch raises): the
    # state is then kept and restored through the new view.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    saved = _float32_state()
    assert saved[0] == "fp32_precision"
    disable_tf32()
    assert_tf32_off()
    _set_float32_state(saved)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
def test_cuda_float32_convolution_and_matmul_are_full_float32_in_tests():
    # Dot products of K = 576 unit-variance terms (64 channels x 3x3, and a 576-long matmul), results
    # ~ sqrt(K) = 24. Float32 rounding: ~ K * 2^-24 = 3.4e-5 absolute, 1.4e-6 relative at most (a
    # Winograd convolution some 10x more). TF32 rounds each operand to 10 bits (2^-11 = 4.9e-4): an
    # error of a few 1e-4 per product, so ~ sqrt(K) * 3e-4 / 24 = 3e-4 relative. Simulated on the CPU
    # with these very inputs: 2.9e-4 (operands rounded as TF32) against 2.2e-7 (float32). 5e-5 lies
    # 6x under the one and far above the other: the test fails only when TF32 is on.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 32, 32, generator=g, dtype=torch.float64)
    w = torch.randn(64, 64, 3, 3, generator=g, dtype=torch.float64)
    want = torch.nn.functional.conv2d(x, w, padding=1)
    got = torch.nn.functional.conv2d(x.float().cuda(), w.float().cuda(), padding=1).double().cpu()
    assert ((got - want).norm() / want.norm()).item() < 5e-5
    a = torch.randn(64, 576, generator=g, dtype=torch.float64)
    b = torch.randn(576, 64, generator=g, dtype=torch.float64)
    got_mm = (a.float().cuda() @ b.float().cuda()).double().cpu()
    assert ((got_mm - a @ b).norm() / (a @ b).norm()).item() < 5e-5


# ---- the benchmark keeps its figures ----------------------------------------------------------------


def test_a_killed_benchmark_leaves_results_that_parse_and_say_incomplete(tmp_path):
    # The GPU check kills the benchmark at its limit; the device call kills the whole check at its
    # own. Whatever was measured before the kill must be in gpu-bench.json and .md.
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu_bench", "--device", "cpu", "--smoke", "--out", str(out),
         "--budget", "120", "--only", "copy,tap_ops,lrp,training"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    path = out / "gpu-bench.json"
    try:
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline and child.poll() is None:
            if path.is_file() and json.loads(path.read_text())["sections"].get("copy", {}).get("gb_per_s"):
                break
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert path.is_file(), "the first section's results never appeared"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    report = json.loads(path.read_text())
    assert report["complete"] is False and report["running"] in (None, "tap_ops", "lrp", "training")
    assert report["sections"]["copy"]["gb_per_s"] > 0
    text = (out / "gpu-bench.md").read_text()
    assert "**INCOMPLETE**" in text and "Device-to-device copy:" in text


def test_the_budget_stops_a_section_between_measurements_and_keeps_its_figures(tmp_path):
    from benchmarks import gpu_bench

    # A clock that advances 1 s per reading: the 5.5 s budget runs out at the 6th reading, inside
    # tap_ops (after the bfloat16 figures), long before torch.compile.
    ticks = itertools.count()
    budget = gpu_bench.Budget(5.5, clock=lambda: float(next(ticks)))
    report = gpu_bench.run("cpu", True, 5.5, ("copy", "tap_ops", "lrp"), out=tmp_path, budget=budget)
    assert report["complete"] is True and report["running"] is None
    assert report["sections"]["copy"]["gb_per_s"] > 0
    tap = report["sections"]["tap_ops"]
    assert tap["bfloat16"]["forward_gb_per_s"] > 0 and tap["bfloat16"]["penalty_fused_vs_eager"] > 0
    assert "penalty_fused_vs_compiled" not in tap["bfloat16"]
    assert re.match(r"stopped: the 5.5 s budget ran out before tap_ops ", report["errors"]["tap_ops"])
    assert report["errors"]["lrp"].startswith("skipped")
    on_disk = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert on_disk["sections"] == json.loads(json.dumps(report["sections"])) and on_disk["complete"] is True
    assert "- tap_ops: stopped:" in (tmp_path / "gpu-bench.md").read_text()


def test_sections_put_the_kernel_figures_first():
    from benchmarks import gpu_bench

    assert gpu_bench.SECTIONS[:3] == ("copy", "tap_ops", "lrp")


# ---- the check writes as it goes --------------------------------------------------------------------


def new_check(tmp_path):
    check = gpu_check["Check"](tmp_path / "out", device="cpu")
    check.report["gpu"] = {"name": "test", "capability": "9.0", "count": 0, "torch": torch.__version__,
                           "python": "3"}
    return check


def test_the_check_saves_its_results_before_and_after_every_step(tmp_path):
    check = new_check(tmp_path)
    results = check.out / "gpu-results.json"
    peek = (f"import json; r = json.load(open({str(results)!r})); "
            "print('during:', r['running'], r['complete'], [s['name'] for s in r['steps']])")
    check.run("doctor", [sys.executable, "-c", "print('first')"])
    step = check.run("demo", [sys.executable, "-c", peek], "demo.log")
    assert "during: demo False ['doctor']" in step["tail"]
    assert "during: demo False" in (check.out / "demo.log").read_text()  # the log is a file as it runs
    after = json.loads(results.read_text())
    assert after["running"] is None and after["complete"] is False and after["ok"] is None
    assert "INCOMPLETE" in (check.out / "gpu-results.md").read_text()
    assert check.write() == 0
    assert json.loads(results.read_text())["complete"] is True


def test_a_step_at_its_limit_is_stopped_with_all_its_children(tmp_path):
    check = new_check(tmp_path)
    spawn = ("import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
             "print('grandchild', p.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    step = check.run("bench", [sys.executable, "-c", spawn], limit=3)
    assert step["rc"] == 124 and time.monotonic() - start < 30
    assert "stopped at its 3 s limit" in step["tail"]
    pid = int(re.search(r"grandchild (\d+)", step["tail"]).group(1))
    time.sleep(0.2)
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text()  # gone (or a zombie awaiting init)


def test_a_step_is_not_started_once_the_budget_is_spent(tmp_path):
    check = new_check(tmp_path)
    check.started -= 10 * gpu_check["BUDGET_S"]
    step = check.run("demo", [sys.executable, "-c", "raise SystemExit('must not run')"])
    assert step["rc"] == 124 and "skipped" in step["tail"] and step["seconds"] == 0.0
    assert check.write() == 1


# ---- the one device call ----------------------------------------------------------------------------


def test_the_readme_gives_the_one_device_call():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## On a GPU machine"):]
    section = section[: section.index("\n## ", 3)]
    call = re.search(r"run\(command=(?P<q>['\"])(?P<command>.*?)(?P=q), carry=\[\"\.whl\"\], "
                     r"timeout_s=(?P<timeout>\d+)\)", section, re.S)
    assert call, "no run(command=..., carry=[\".whl\"], timeout_s=...) in the README"
    command = call["command"]
    assert len(command) <= 2000  # the device tool's limit
    assert command.index("--version |") < command.index("gpu_check.py --versions") < command.index("gpu_check.sh")
    budget = float(re.search(r"GPU_CHECK_BUDGET\", \"(\d+)\"", (ROOT / "tools" / "gpu_check.py").read_text())[1])
    assert budget + 30 <= int(call["timeout"]) <= 600
    assert "make gpu-wheels" in section and "give_back" in section


def test_the_check_prints_the_versions_it_runs_on():
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--versions"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert list(found) == ["python", "torch", "torch_cuda", "setuptools", "nvcc"]
    assert found["python"] == sys.version.split()[0] and found["torch"] == torch.__version__
