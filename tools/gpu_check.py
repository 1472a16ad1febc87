"""`make gpu-check`: everything auditkit needs to learn on a GPU machine, in one go (issue 13).

A GPU machine is lent to us now and then, for minutes, bare, with no network: this program is
rehearsed beforehand and runs start to finish without help, within about 8 minutes:

1. finds the GPU (without one: one line saying the GPU part was skipped and why, exit 0);
2. installs what the machine's python lacks from the wheels in .whl/ (tools/gpu_wheels.sh);
3. builds the extension for this GPU only (its compute capability, all cores), in place;
4. `auditkit doctor`: which kernels are live;
5. every CUDA test (pytest -m cuda: kernels vs reference over hypothesis cases, opcheck, float64
   gradcheck, half precision, layouts, empty batches, grid-stride and 64-bit paths, a tensor past
   2^31 elements, TAP and TEA end to end);
6. the demo on the GPU (`auditkit demo --device cuda`);
7. the GPU benchmarks (benchmarks/gpu_bench.py);

and writes every figure, with the device name, the versions (Python, torch, setuptools, nvcc) and
command, to $OUT/gpu-results.md and .json (OUT unset: ./gpu-check-results). Exit status: 0 when
every step passed, 1 when a CUDA test failed or a step broke.

Nothing is kept for the end: gpu-results.md and .json are rewritten (atomically) before and after
every step, saying ``"complete": false`` and which step is running until the last write, and the
benchmarks write their own gpu-bench.md and .json into $OUT before each measurement. A check
killed from outside (the device call's time limit) still returns every figure it had measured.
A step that would start with less than 10 s of the budget left is skipped (and says so).

Run: bash tools/gpu_check.sh   (or make gpu-check; GPU_CHECK_PYTHON picks the interpreter)
     python3 tools/gpu_check.py --versions   (the versions alone: Python, torch, setuptools, nvcc)

Rehearsal without a GPU: `tools/gpu_check.sh --rehearse` runs every step on the CPU (the build for
compute capability 9.0, the CUDA tests, which then skip, the demo and the benchmarks at toy sizes),
so the machinery is proven on a CPU machine with the GPU image's software before GPU time is spent.
"""

from __future__ import annotations

import json
import os
import runpy
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET", "480"))  # the whole check, build included
STEP_LIMITS = {"build": 240, "doctor": 120, "tests": 240, "demo": 150, "bench": 240}
MIN_STEP_S = 10.0  # a step is not started with less of the budget left


def versions() -> dict:
    """The software the check runs on: Python, torch (and its CUDA), setuptools, nvcc."""
    found = {"python": sys.version.split()[0]}
    try:
        import torch

        found["torch"], found["torch_cuda"] = torch.__version__, torch.version.cuda
    except ImportError:
        found["torch"] = found["torch_cuda"] = None
    try:
        import setuptools

        found["setuptools"] = setuptools.__version__
    except ImportError:
        found["setuptools"] = None
    find_cuda = runpy.run_path(str(ROOT / "tools" / "find_cuda.py"))
    home = find_cuda["find_cuda_home"]()
    found["nvcc"] = f"{find_cuda['nvcc_version'](home)} ({home}/bin/nvcc)" if home else None
    return found


def write_atomically(path: Path, text: str) -> None:
    """The old or the new text at every moment, never half of one (temporary file, then rename)."""
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f"{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def gpu_or_reason() -> tuple[dict | None, str | None]:
    """({name, capability, ...}, None) when a CUDA GPU is usable, else (None, why not)."""
    try:
        import torch
    except ImportError:
        return None, f"{sys.executable} has no torch"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return None, f"no CUDA GPU visible (torch {torch.__version__}, CUDA {torch.version.cuda})"
    major, minor = torch.cuda.get_device_capability(0)
    free, total = torch.cuda.mem_get_info(0)
    return {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "capability": f"{major}.{minor}",
        "memory_gib": round(total / 2**30, 1),
        "free_gib": round(free / 2**30, 1),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }, None


class Check:
    """Runs the steps, keeps their results, writes the report."""

    def __init__(self, out: Path, device: str = "cuda"):
        self.device = device  # "cpu" only in a rehearsal
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.steps: list[dict] = []
        self.env = dict(os.environ)
        self.report: dict = {"command": "make gpu-check (tools/gpu_check.sh)", "steps": self.steps,
                             "complete": False, "running": None}

    def left(self) -> float:
        return BUDGET_S - (time.perf_counter() - self.started)

    def save(self) -> None:
        """gpu-results.json and .md as they stand (``complete`` stays false until write())."""
        self.report["seconds"] = round(time.perf_counter() - self.started, 1)
        self.report["ok"] = self.passed() if self.report["complete"] else None
        write_atomically(self.out / "gpu-results.json", json.dumps(self.report, indent=2, default=str))
        write_atomically(self.out / "gpu-results.md", markdown(self.report))

    def passed(self) -> bool:
        tests = self.report.get("tests", {})
        return not any(s["rc"] != 0 for s in self.steps) and tests.get("failed", 0) + tests.get("errors", 0) == 0

    def run(self, name: str, command: list[str], log_name: str | None = None, limit: float | None = None) -> dict:
        """Runs one step with its time limit (never past the whole budget); keeps its tail."""
        if self.left() < MIN_STEP_S:
            step = {"name": name, "command": shlex.join(command), "rc": 124, "seconds": 0.0,
                    "tail": f"[gpu-check] {name} skipped: {max(self.left(), 0):.0f} s of the {BUDGET_S:.0f} s "
                            "budget left"}
            self.steps.append(step)
            print(f"gpu-check: {name}: skipped (budget spent)", flush=True)
            self.save()
            return step
        limit = min(limit or STEP_LIMITS.get(name, 120), self.left())
        start = time.perf_counter()
        self.report["running"] = name
        self.save()
        print(f"gpu-check: {name}: {shlex.join(command)} (limit {limit:.0f} s)", flush=True)
        # The output goes to its log file as it comes (a check killed mid-step keeps it), and the step
        # runs in its own process group: at its limit the whole group goes (ninja's compilers,
        # pytest's children), and nothing left holds a pipe open.
        if log_name:
            log_path = self.out / log_name
        else:
            handle, log_path = tempfile.mkstemp(prefix=f"gpu-check-{name}-", suffix=".log")
            os.close(handle)
            log_path = Path(log_path)
        with open(log_path, "w") as log:
            child = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            try:
                rc = child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended just now
                    pass
                child.wait()
                rc = 124
                log.write(f"\n[gpu-check] {name} stopped at its {limit:.0f} s limit\n")
        output = log_path.read_text(errors="replace")
        if not log_name:
            log_path.unlink()
        step = {"name": name, "command": shlex.join(command), "rc": rc,
                "seconds": round(time.perf_counter() - start, 1), "tail": output[-3000:]}
        self.steps.append(step)
        self.report["running"] = None
        self.save()
        print(f"gpu-check: {name}: rc {rc} in {step['seconds']} s", flush=True)
        return step

    # ---- steps -------------------------------------------------------------------------------------

    def install_wheels(self) -> None:
        wheels = sorted((ROOT / ".whl").glob("*.whl"))
        if not wheels:
            self.steps.append({"name": "wheels", "rc": 0, "seconds": 0, "tail": "no .whl/ folder: nothing to install"})
            return
        target = Path(tempfile.mkdtemp(prefix="auditkit-site-"))
        self.run("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)], limit=120)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(target), self.env.get("PYTHONPATH")) if p)

    def build(self, capability: str) -> dict:
        self.env.update({"TORCH_CUDA_ARCH_LIST": capability, "AUDITKIT_BUILD_CUDA": "1",
                         "MAX_JOBS": str(os.cpu_count() or 4)})
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH")) if p)
        return self.run("build", [sys.executable, "setup.py", "build_ext", "--inplace"], "build.log")

    def doctor(self) -> dict:
        path = self.out / "doctor.json"
        step = self.run("doctor", [sys.executable, "-m", "auditkit", "doctor", "--json", str(path)])
        if path.is_file():
            doctor = json.loads(path.read_text())
            self.report["doctor"] = {"kernels": doctor.get("kernels"), "self_test": doctor.get("self_test"),
                                     "gpu_capabilities": doctor.get("gpu_capabilities")}
            path.unlink()  # folded into gpu-results.json ($OUT returns at most 8 files)
            if doctor.get("kernels", {}).get("cuda", {}).get("backend") != "compiled":
                step["rc"] = step["rc"] or 3
                step["tail"] += "\n[gpu-check] the compiled CUDA kernels are not live: " + \
                    str(doctor.get("kernels", {}).get("cuda", {}).get("why"))
        return step

    def tests(self) -> dict:
        junit = self.out / "cuda-tests.xml"
        self.env["AUDITKIT_HYPOTHESIS_EXAMPLES"] = self.env.get("AUDITKIT_HYPOTHESIS_EXAMPLES", "100")
        step = self.run("tests", [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-q", "-p", "no:cacheprovider",
                                  "-rfEs", "--continue-on-collection-errors", f"--junitxml={junit}"], "cuda-tests.log")
        self.report["tests"] = summarise_junit(junit) if junit.is_file() else {"error": "no junit report"}
        if junit.is_file():
            junit.unlink()
        return step

    def demo(self) -> dict:
        folder = Path(tempfile.mkdtemp(prefix="auditkit-demo-"))
        summary = folder / "demo.json"
        step = self.run("demo", [sys.executable, "-m", "auditkit", "demo", "--device", self.device,
                                 "--out", str(folder / "demo"),
                                 "--force", "--quiet", "--json", str(summary)], "demo.log")
        if summary.is_file():
            self.report["demo"] = json.loads(summary.read_text())
        return step

    def bench(self) -> dict:
        # Straight into $OUT: the benchmark rewrites gpu-bench.json/.md before every measurement, so
        # its figures come back even if this whole check is killed in the middle of it.
        budget = max(MIN_STEP_S, min(STEP_LIMITS["bench"], self.left()) - 20)
        smoke = ["--smoke"] if self.device == "cpu" else []
        step = self.run("bench", [sys.executable, "-m", "benchmarks.gpu_bench", "--device", self.device,
                                  "--out", str(self.out), "--budget", f"{budget:.0f}", *smoke], limit=budget + 20)
        path = self.out / "gpu-bench.json"
        if path.is_file():  # complete, or what a stopped run had measured (it says so)
            self.report["bench"] = json.loads(path.read_text())
            self.report["bench_markdown"] = (self.out / "gpu-bench.md").read_text()
        return step

    # ---- report --------------------------------------------------------------------------------------

    def write(self) -> int:
        self.report["complete"], self.report["running"] = True, None
        self.save()
        print(markdown(self.report))
        print(f"gpu-check: results in {self.out / 'gpu-results.md'} and .json", flush=True)
        return 0 if self.report["ok"] else 1


def summarise_junit(path: Path) -> dict:
    """Counts and the failures (name, first line) of a pytest junit report."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], {}
    for suite in suites:
        for case in suite.iter("testcase"):
            counts["tests"] += 1
            name = f"{case.get('classname')}::{case.get('name')}"
            for kind, key in (("failure", "failed"), ("error", "errors")):
                node = case.find(kind)
                if node is not None:
                    counts[key] += 1
                    failures.append({"test": name, "message": (node.get("message") or "")[:300]})
            skipped = case.find("skipped")
            if skipped is not None:
                counts["skipped"] += 1
                reason = (skipped.get("message") or "")[:120]
                skips[reason] = skips.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {**counts, "failures": failures, "skip_reasons": skips}


def markdown(report: dict) -> str:
    gpu = report.get("gpu", {})
    found = report.get("versions", {})
    if report.get("complete", True):
        verdict = "PASSED" if report.get("ok") else "FAILED"
    else:
        verdict = f"INCOMPLETE (running: {report.get('running') or 'between steps'}; killed if this stays)"
    lines = [
        f"# auditkit GPU check: {verdict}",
        "",
        f"- device: {gpu.get('name')} (compute capability {gpu.get('capability')}, {gpu.get('memory_gib')} GiB, "
        f"{gpu.get('count')} GPU(s))",
        f"- software: python {gpu.get('python')}, torch {gpu.get('torch')} (CUDA {gpu.get('torch_cuda')}), "
        f"setuptools {found.get('setuptools')}, nvcc {found.get('nvcc')}",
        f"- command: `{report.get('command')}`; {report.get('seconds')} s in all",
        "",
        "| step | rc | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {s['name']} | {s['rc']} | {s['seconds']} |" for s in report.get("steps", [])]
    doctor = report.get("doctor")
    if doctor:
        cuda = (doctor.get("kernels") or {}).get("cuda", {})
        lines += ["", f"Kernels on CUDA: {cuda.get('backend')} ({cuda.get('why')}); self-test: "
                  + ", ".join(f"{t['device']} {'ok' if t['ok'] else 'MISMATCH'}"
                              for t in doctor.get("self_test") or [])]
    tests = report.get("tests")
    if tests and "tests" in tests:
        lines += ["", f"CUDA tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped (of {tests['tests']})"]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failures"][:40]]
        lines += [f"- skipped ({n}): {reason}" for reason, n in tests["skip_reasons"].items()]
    demo = report.get("demo")
    if demo:
        lines += ["", f"Demo on the GPU: before {demo['before']['label']}, after {demo['after']['label']}; accuracy "
                  f"before {demo['accuracy']['before']}, after {demo['accuracy']['after']}"]
    if report.get("bench_markdown"):
        lines += ["", report["bench_markdown"]]
    broken = [s for s in report.get("steps", []) if s["rc"] != 0]
    for step in broken:
        lines += ["", f"## {step['name']} failed (rc {step['rc']})", "", "```", step["tail"][-2000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if "--versions" in argv:  # printed first by the device call (README, "On a GPU machine")
        for name, value in versions().items():
            print(f"{name}: {value}")
        return 0
    rehearse = "--rehearse" in argv
    gpu, reason = gpu_or_reason()
    if gpu is None and not rehearse:
        print(f"gpu-check: skipped the GPU part: {reason}")
        return 0
    if gpu is None:
        import platform

        import torch

        gpu = {"name": f"rehearsal on the CPU ({platform.machine()}): {reason}", "count": 0, "capability": "9.0",
               "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0]}
    out = Path(os.environ.get("OUT") or ROOT / "gpu-check-results")
    check = Check(out, device="cpu" if rehearse and gpu["count"] == 0 else "cuda")
    check.report["gpu"] = gpu
    check.report["versions"] = versions()
    print("gpu-check: versions: " + ", ".join(f"{k} {v}" for k, v in check.report["versions"].items()), flush=True)
    check.save()
    check.install_wheels()
    if check.build(gpu["capability"])["rc"] == 0:
        check.doctor()
        check.tests()
        check.demo()
        check.bench()
    return check.write()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
