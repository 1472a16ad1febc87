"""The GPU benchmarks in one go, for `make gpu-check` (tools/gpu_check.py runs this module).

GPU time is scarce for us, so this is one short program that measures everything the GPU tables of
benchmarks/RESULTS.md need and writes it to JSON and Markdown:

1. device-to-device copy bandwidth (the ceiling of every memory-bound kernel);
2. the TAP ops: weighted_relu_sum forward and its fused backward in GB/s against that copy, and the
   whole penalty (forward + backward, mask downscaling included) fused vs eager vs torch.compile;
3. LRP-epsilon on ResNet-18 at 64x224^2: (forward + LRP) / (forward + input gradient), against
   zennit and captum (interleaved ratios), in fp32 and in bf16 autocast;
4. repair training steps (plain, TAP, RRR, TEA with the teacher's maps computed in the step and
   cached) on ResNet-18 and ResNet-50 at 64x224^2 in bf16 autocast: time and peak-memory ratios;
5. audit throughput (images/s) of ResNet-18 at 224^2 with LRP, Grad-CAM and the gradient;
6. vision transformers (issue 25): AttnLRP / input gradient on ViT-B/16 at 64x224^2 in fp32 and
   bf16 autocast, and a TAP step on its tokens (the default: |A| of every block's qkv) / a plain
   step in bf16.

The kernel figures (1-3) come first. Each section is timed interleaved against its baseline where
it is a ratio (benchmarks/_timing.interleaved_ratio) and fails alone: an error is recorded and the
rest runs. The time budget is checked before every measurement, not only between sections, and
gpu-bench.json and .md in --out are rewritten (atomically: a temporary file, then a rename) at
each check: a run stopped by the budget keeps every figure measured before it, and a run killed
from outside (the GPU check's time limit) leaves files that parse and say ``"complete": false``
and which section was running.
``--smoke`` runs every section at toy sizes on any device (the unit test runs it on the CPU so
the program cannot rot between GPU sessions).

Run: python -m benchmarks.gpu_bench --device cuda --out DIR [--budget SECONDS] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from auditkit import ops
from auditkit._io import atomic_write_text
from auditkit.device import autocast
from auditkit.explain import attribute
from auditkit.models import build_model
from auditkit.ops._reference import tap_penalty_reference, weighted_relu_sum_reference

from ._memory import peak_bytes
from ._timing import interleaved_ratio, synchronize

SIZES = {
    "full": {
        "copy_bytes": 2 * 2**30,
        "tap_activation": (64, 256, 56, 56),
        "tap_mask": 224,
        "lrp": ("resnet18", 64, 224),
        "training": [("resnet18", 64, 224), ("resnet50", 64, 224), ("efficientnet_b0", 64, 224),
                     ("convnext_tiny", 64, 224)],
        "audit": ("resnet18", 64, 224, 4),  # arch, batch, size, batches
        "vit": ("timm:vit_base_patch16_224", 64, 224),
        "pairs": 15,
        "iterations": 20,
    },
    "smoke": {
        "copy_bytes": 8 * 2**20,
        "tap_activation": (2, 8, 14, 14),
        "tap_mask": 28,
        "lrp": ("resnet18", 2, 32),
        "training": [("tap-cnn", 4, 28), ("resnet18", 2, 32)],
        "audit": ("resnet18", 2, 32, 1),
        "vit": ("timm:vit_tiny_patch16_224", 2, 32),
        "pairs": 2,
        "iterations": 2,
    },
}
EPSILON = 0.01


class OutOfBudget(Exception):
    """The benchmark's time budget ran out inside a section (its figures so far are kept)."""


class Budget:
    """The whole benchmark's time budget, checked between sections and between the measurements
    inside them. Each check first saves the report as it stands (``on_check``), so a process killed
    in the next measurement keeps every figure measured before it."""

    def __init__(self, seconds: float, clock=time.perf_counter):
        self.seconds = seconds
        self.clock = clock
        self.started = clock()
        self.on_check = None

    def left(self) -> float:
        return self.seconds - (self.clock() - self.started)

    def check(self, where: str) -> None:
        if self.on_check is not None:
            self.on_check()
        if self.left() <= 0:
            raise OutOfBudget(f"the {self.seconds:g} s budget ran out before {where}")


def median_seconds(fn, device: str, iterations: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` (synchronised on CUDA) over ``iterations`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Each section fills ``result`` in place, checking the budget before each measurement: a section
# stopped by the budget (or an error) keeps what it measured.


def copy_bandwidth(device: str, size: dict, result: dict, budget: Budget, report: dict) -> None:
    n = size["copy_bytes"] // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, size["iterations"])
    result.update({"bytes": 2 * n * 4, "seconds": seconds, "gb_per_s": 2 * n * 4 / seconds / 1e9})


def tap_ops(device: str, size: dict, result: dict, budget: Budget, report: dict) -> None:
    copy_gbs = report["sections"].get("copy", {}).get("gb_per_s")
    n, c, h, w = size["tap_activation"]
    side = size["tap_mask"]
    mask = torch.zeros(n, 1, side, side, device=device)
    mask[..., : side // 7, : side // 7] = 1.0
    weights = ops.downscale_mask(mask, (h, w))
    leaves = {}
    # The op figures of both dtypes first; torch.compile (tens of seconds on a bare machine) last.
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        budget.check(f"tap_ops {name}")
        a = torch.randn(n, c, h, w, device=device, dtype=dtype)
        base = torch.randn_like(a)
        grad = torch.randn(n, device=device)
        entry = result[name] = {"activation": [n, c, h, w]}
        forward = median_seconds(lambda: ops.weighted_relu_sum(a, weights), device, size["iterations"])
        read = a.numel() * a.element_size() + weights.numel() * 4
        entry.update({"forward_s": forward, "forward_gb_per_s": read / forward / 1e9})
        backward = median_seconds(
            lambda: torch.ops.auditkit.weighted_relu_sum_backward(grad, a, weights, base), device, size["iterations"]
        )
        moved_backward = 3 * a.numel() * a.element_size() + weights.numel() * 4
        entry.update({"backward_with_base_s": backward, "backward_gb_per_s": moved_backward / backward / 1e9})
        if copy_gbs:
            entry["forward_fraction_of_copy"] = entry["forward_gb_per_s"] / copy_gbs
            entry["backward_fraction_of_copy"] = entry["backward_gb_per_s"] / copy_gbs
        eager_forward = median_seconds(lambda: weighted_relu_sum_reference(a, weights), device, size["iterations"])
        entry.update({"eager_forward_s": eager_forward, "fused_vs_eager_forward": forward / eager_forward})
        # The whole penalty: mask downscaling, forward and backward.
        leaf = leaves[name] = a.detach().requires_grad_(True)

        def fused(leaf=leaf):
            (g,) = torch.autograd.grad(ops.tap_penalty(leaf, mask).sum(), leaf)
            return g

        def eager(leaf=leaf):
            (g,) = torch.autograd.grad(tap_penalty_reference(leaf, mask).sum(), leaf)
            return g

        budget.check(f"tap_ops {name} penalty")
        entry["penalty_fused_vs_eager"] = interleaved_ratio(fused, eager, size["pairs"], device)
        entry["penalty_fused_peak_bytes"] = peak_bytes(fused, device)
        entry["penalty_eager_peak_bytes"] = peak_bytes(eager, device)
    compiled_reference = torch.compile(tap_penalty_reference)
    for name, leaf in leaves.items():
        budget.check(f"tap_ops {name} torch.compile")

        def fused(leaf=leaf):
            (g,) = torch.autograd.grad(ops.tap_penalty(leaf, mask).sum(), leaf)
            return g

        def compiled(leaf=leaf):
            (g,) = torch.autograd.grad(compiled_reference(leaf, mask).sum(), leaf)
            return g

        try:
            compiled()  # compiles
            result[name]["penalty_fused_vs_compiled"] = interleaved_ratio(fused, compiled, size["pairs"], device)
        except Exception as error:  # torch.compile may be unavailable (no compiler) on a machine
            result[name]["penalty_fused_vs_compiled_error"] = _one_line(error)


def _network(arch: str, batch: int, size: int, device: str):
    from torch import nn

    torch.manual_seed(0)
    model = build_model(arch, 10, 3, (size, size)).eval()
    for module in model.modules():  # realistic batch-norm statistics (random ones are all 0/1)
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, 10, (batch,), device=device)
    return model.to(device), x, targets


def lrp(device: str, size: dict, result: dict, budget: Budget, report: dict) -> None:
    from .test_explain_bench import captum_lrp, input_gradient, zennit_lrp

    arch, batch, side = size["lrp"]
    model, x, targets = _network(arch, batch, side, device)
    net = model.net
    result["network"] = f"{arch} {batch}x{side}^2"

    def ours():
        return attribute(net, x, targets, "lrp_epsilon", epsilon=EPSILON)

    def gradient():
        return input_gradient(net, x, targets)

    budget.check("lrp (time)")
    result["lrp_s"] = median_seconds(ours, device, size["iterations"])
    budget.check("lrp vs gradient")
    result["lrp_vs_gradient"] = interleaved_ratio(ours, gradient, size["pairs"], device)
    for library, fn in (("zennit", zennit_lrp), ("captum", captum_lrp)):
        budget.check(f"lrp vs {library}")
        try:
            fn(net, x, targets)

            def theirs(fn=fn):
                return fn(net, x, targets)

            result[f"lrp_vs_{library}"] = interleaved_ratio(ours, theirs, size["pairs"], device)
        except Exception as error:  # a library that refuses the network is a result too
            result[f"{library}_error"] = _one_line(error)

    def ours_bf16():
        with autocast(device, "bf16"):
            return ours()

    def gradient_bf16():
        with autocast(device, "bf16"):
            return gradient()

    budget.check("lrp bf16 vs gradient")
    result["bf16_lrp_vs_gradient"] = interleaved_ratio(ours_bf16, gradient_bf16, size["pairs"], device)
    budget.check("lrp bf16 vs fp32")
    result["bf16_vs_fp32_lrp"] = interleaved_ratio(ours_bf16, ours, size["pairs"], device)
    reference = ours()
    low = ours_bf16()
    cosine = torch.nn.functional.cosine_similarity(low.flatten(1), reference.flatten(1), dim=1)
    result["bf16_map_cosine_min"] = float(cosine.min())


def training_steps(device: str, size: dict, result: dict, budget: Budget, report: dict) -> None:
    from . import test_repair_bench as repair_bench

    for arch, batch, side in size["training"]:
        config = f"{arch}_{batch}x{side}"
        budget.check(f"training {config}")
        channels = 1 if arch in ("tap-cnn", "shortcut-cnn") else 3
        repair_bench.CONFIGS.setdefault(config, (arch, batch, channels, side))
        steps = {}
        for method in repair_bench.METHODS:
            step = repair_bench.step_function(config, device, method)

            def in_bf16(step=step):
                with autocast(device, "bf16"):
                    step()

            steps[method] = in_bf16
        entry = result[config] = {"precision": "bf16"}
        plain = steps["plain"]
        plain()
        entry["plain_s"] = median_seconds(plain, device, size["iterations"])
        model = repair_bench.setup(config, device)[0]
        model.zero_grad(set_to_none=True)
        plain_peak = peak_bytes(plain, device)
        entry["plain_peak_bytes"] = plain_peak
        for method, step in steps.items():
            if method == "plain":
                continue
            budget.check(f"training {config} {method}")
            try:
                step()
                entry[f"{method}_time_ratio"] = interleaved_ratio(step, plain, size["pairs"], device)
                model.zero_grad(set_to_none=True)
                peak = peak_bytes(step, device)
                entry[f"{method}_memory_ratio"] = peak / plain_peak if peak and plain_peak else None
            except Exception as error:
                entry[f"{method}_error"] = _one_line(error)
        repair_bench._CACHE.clear()
        if device == "cuda":
            torch.cuda.empty_cache()


def audit_throughput(device: str, size: dict, result: dict, budget: Budget, report: dict) -> None:
    arch, batch, side, batches = size["audit"]
    model, x, _ = _network(arch, batch, side, device)
    result["network"] = f"{arch} {batch}x{side}^2 (AuditModel: normalisation included)"
    for precision in ("fp32", "bf16"):
        for method in ("lrp_epsilon", "gradcam", "gradient"):
            budget.check(f"audit {method} {precision}")

            def run(method=method, precision=precision):
                with autocast(device, precision):
                    for _ in range(batches):
                        attribute(model, x, "pred", method)

            seconds = median_seconds(run, device, max(1, size["iterations"] // 4), warmup=1)
            result[f"{method}_{precision}_images_per_s"] = batch * batches / seconds


def vision_transformer(device: str, size: dict, result: dict, budget: Budget, report: dict) -> None:
    from auditkit.repair.methods.tap import TapOptions, build

    from .test_vit_bench import input_gradient, ours, tap_and_plain_steps

    arch, batch, side = size["vit"]
    torch.manual_seed(0)
    model = build_model(arch, 10, 3, (side, side)).to(device)
    net = model.net.eval()
    x = torch.randn(batch, 3, side, side, device=device)
    targets = torch.randint(0, 10, (batch, 1), device=device)
    result["network"] = f"{arch} {batch}x{side}^2"

    def timed(fn, precision):
        def run():
            with autocast(device, precision):
                return fn(net, x, targets)
        return run

    for precision in ("fp32", "bf16"):
        budget.check(f"vit attnlrp {precision}")
        result[f"{precision}_attnlrp_vs_gradient"] = interleaved_ratio(
            timed(ours(1e-6), precision), timed(input_gradient, precision), size["pairs"], device)
    model.train()
    objective = build(model, TapOptions(), None)
    masks = torch.zeros(batch, 1, side, side, device=device)
    masks[:, :, : side // 7, : side // 7] = 1
    tap, plain = tap_and_plain_steps(model, objective, x, targets[:, 0], masks, lambda: autocast(device, "bf16"))
    budget.check("vit tap step")
    plain(), tap()
    result["bf16_tap_step_vs_plain"] = interleaved_ratio(tap, plain, size["pairs"], device)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


# The kernel figures first (copy bandwidth, the TAP ops, LRP and its peers), then the whole-network
# ones: a run stopped by its budget or killed loses the least valuable figures.
SECTION_FUNCTIONS = {
    "copy": copy_bandwidth,
    "tap_ops": tap_ops,
    "lrp": lrp,
    "training": training_steps,
    "audit": audit_throughput,
    "vit": vision_transformer,
}
SECTIONS = tuple(SECTION_FUNCTIONS)
RESULT_FILES = ("gpu-bench.json", "gpu-bench.md")


def write_report(report: dict, out: Path) -> None:
    """gpu-bench.json and .md in ``out`` as the report stands (complete or not)."""
    out.mkdir(parents=True, exist_ok=True)
    # Atomic (a temporary file, then a rename): a run killed mid-write leaves the old text or the new, never half.
    atomic_write_text(out / RESULT_FILES[0], json.dumps(report, indent=2, default=str), overwrite=True)
    atomic_write_text(out / RESULT_FILES[1], markdown(report), overwrite=True)


def run(device: str, smoke: bool, budget_s: float, only: tuple[str, ...] = SECTIONS, out: Path | None = None,
        budget: Budget | None = None) -> dict:
    """Runs the sections in ``only`` (in SECTIONS' order) within ``budget_s`` seconds. With ``out``,
    the report is written there at the start, before every measurement and at the end: until the
    end it says ``"complete": false`` and which section is ``"running"``."""
    size = SIZES["smoke" if smoke else "full"]
    torch.backends.cudnn.benchmark = device == "cuda"
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "kernels": {"cpu": ops.extension_status().cpu_backend, "cuda": ops.extension_status().cuda_backend,
                    "cuda_reason": ops.extension_status().cuda_reason},
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu_bench", *sys.argv[1:]]),
        "sizes": "smoke" if smoke else "full",
        "budget_s": budget_s,
        "complete": False,
        "running": None,
        "sections": {},
        "errors": {},
        "seconds": {},
    }
    budget = budget or Budget(budget_s)
    save = (lambda: write_report(report, out)) if out is not None else (lambda: None)
    budget.on_check = save
    save()
    for name in sorted(only, key=SECTIONS.index):
        if budget.left() <= 0:
            report["errors"][name] = f"skipped: the {budget_s:g} s budget was spent"
            continue
        report["running"] = name
        section_start = time.perf_counter()
        result = report["sections"][name] = {}
        try:
            SECTION_FUNCTIONS[name](device, size, result, budget, report)
        except OutOfBudget as stop:
            report["errors"][name] = f"stopped: {stop} (the figures before it are kept)"
        except Exception as error:  # one section's failure must not lose the others
            report["errors"][name] = _one_line(error)
            report["errors"][f"{name}_traceback"] = traceback.format_exc()[-2000:]
        if not result:
            del report["sections"][name]
        report["running"] = None
        report["seconds"][name] = round(time.perf_counter() - section_start, 1)
        if device == "cuda":
            torch.cuda.empty_cache()
        save()
    report["running"] = None
    report["complete"] = True
    save()
    return report


def _fmt(value, digits=3, unit="") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def markdown(report: dict) -> str:
    """The report as the Markdown tables of benchmarks/RESULTS.md; a figure not (yet) measured is n/a."""
    lines = [f"GPU benchmarks on {report['device']} (torch {report['torch']}, CUDA {report['cuda']}, "
             f"kernels: CUDA {report['kernels']['cuda']}); command: `{report['command']}`", ""]
    if not report.get("complete", True):
        where = f"in section `{report['running']}`" if report.get("running") else "between sections"
        lines += [f"**INCOMPLETE**: the run stopped (killed, or still running) {where}; the figures below are "
                  "those measured before that.", ""]
    sections = report["sections"]
    if "copy" in sections:
        copy = _fmt(sections["copy"].get("gb_per_s"), 0)
        lines += [f"Device-to-device copy: {copy} GB/s (bytes read + written).", ""]
    if "tap_ops" in sections:
        lines += ["| TAP op | dtype | forward GB/s | of copy | backward+base GB/s | of copy | fused/eager fwd | "
                  "penalty fused/eager | penalty fused/compiled | peak fused/eager |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for dtype, e in sections["tap_ops"].items():
            peak = (e["penalty_fused_peak_bytes"] / e["penalty_eager_peak_bytes"]
                    if e.get("penalty_fused_peak_bytes") and e.get("penalty_eager_peak_bytes") else None)
            compiled = (e.get("penalty_fused_vs_compiled_error", "")[:40]
                        or _fmt(e.get("penalty_fused_vs_compiled"), unit="x"))
            lines.append(
                f"| {tuple(e['activation'])} | {dtype} | {_fmt(e.get('forward_gb_per_s'), 0)} | "
                f"{_fmt(e.get('forward_fraction_of_copy'), 2)} | {_fmt(e.get('backward_gb_per_s'), 0)} | "
                f"{_fmt(e.get('backward_fraction_of_copy'), 2)} | {_fmt(e.get('fused_vs_eager_forward'), unit='x')} | "
                f"{_fmt(e.get('penalty_fused_vs_eager'), unit='x')} | {compiled} | {_fmt(peak, unit='x')} |")
        lines.append("")
    if "lrp" in sections:
        e = sections["lrp"]
        peers = "; ".join(f"vs {library} " + (e[f"{library}_error"] if f"{library}_error" in e
                                                else _fmt(e.get(f"lrp_vs_{library}"), unit="x"))
                          for library in ("zennit", "captum"))
        lines += [f"LRP-epsilon on {e.get('network')}: {_ms(e.get('lrp_s'))} ms; "
                  f"(forward + LRP) / (forward + gradient) {_fmt(e.get('lrp_vs_gradient'), unit='x')} "
                  f"(bf16: {_fmt(e.get('bf16_lrp_vs_gradient'), unit='x')}); "
                  f"{peers}; bf16/fp32 time {_fmt(e.get('bf16_vs_fp32_lrp'), unit='x')}, bf16 map cosine >= "
                  f"{_fmt(e.get('bf16_map_cosine_min'))}", ""]
    if "training" in sections:
        lines += ["| training step (bf16) | plain ms | plain peak MiB | TAP time | TAP mem | RRR time | RRR mem | "
                  "TEA time | TEA mem | TEA cached time | TEA cached mem |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for config, e in sections["training"].items():
            cells = []
            for method in ("tap", "rrr", "tea", "tea_cached"):
                if f"{method}_error" in e:
                    cells += [e[f"{method}_error"][:40], ""]
                else:
                    cells += [_fmt(e.get(f"{method}_time_ratio"), unit="x"),
                              _fmt(e.get(f"{method}_memory_ratio"), unit="x")]
            peak = e["plain_peak_bytes"] / 2**20 if e.get("plain_peak_bytes") else None
            lines.append(f"| {config} | {_ms(e.get('plain_s'))} | {_fmt(peak, 0)} | " + " | ".join(cells) + " |")
        lines.append("")
    if "audit" in sections:
        e = sections["audit"]
        lines += [f"Audit throughput, {e.get('network')}, images/s:", "", "| method | fp32 | bf16 |", "|---|---|---|"]
        for method in ("lrp_epsilon", "gradcam", "gradient"):
            lines.append(f"| {method} | {_fmt(e.get(f'{method}_fp32_images_per_s'), 0)} | "
                         f"{_fmt(e.get(f'{method}_bf16_images_per_s'), 0)} |")
        lines.append("")
    if "vit" in sections:
        e = sections["vit"]
        lines += [f"Vision transformer {e.get('network')}: (forward + AttnLRP ε=1e-6) / (forward + input gradient) "
                  f"{_fmt(e.get('fp32_attnlrp_vs_gradient'), unit='x')} fp32, "
                  f"{_fmt(e.get('bf16_attnlrp_vs_gradient'), unit='x')} bf16 (goal <= 1.15); TAP step on its "
                  f"tokens / plain step {_fmt(e.get('bf16_tap_step_vs_plain'), unit='x')} bf16 (goal <= 1.05)", ""]
    for name, error in report["errors"].items():
        if not name.endswith("_traceback"):
            lines.append(f"- {name}: {error}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu-check-results"))
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds; checked before every measurement, what is left is skipped after it")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (any device)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    only = tuple(s for s in args.only.split(",") if s)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}")
    report = run(args.device, args.smoke, args.budget, only, out=args.out)
    print(markdown(report))
    return 1 if any(not k.endswith("_traceback") for k in report["errors"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
