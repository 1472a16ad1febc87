"""Paired timing of LRP-epsilon's paths: the fast path, the general path (switch.py), forward + input
gradient, and optionally the LRP of an older commit, interleaved in one process (issue 24).

    python -m benchmarks.lrp_paths [--old COMMIT] [--threads N] [--nchw-pools] [config ...]

Each round runs every candidate once, in an order rotated per round; reported are the median time
per call, its minimum (the cost without interference, on a loaded machine) and the median of the
per-round ratios, so drifting machine load cancels out. ``--old``
loads auditkit/explain/lrp.py and lrp_rules.py as they were at COMMIT (before the package, e.g.
d3fdc3f: the relevance pass, module check and hook check generated as Python source) with their
relative imports made absolute, beside today's package. ``--nchw-pools`` adds the fast path with its
max pools run as plain ``F.max_pool2d`` (not on a channels-last copy, forward.py's
max_pool2d_with_indices): what the pooling change alone is worth. Maps are compared too (max |difference|).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from auditkit.explain import lrp
from auditkit.models import build_model

CONFIGS = {  # name: (arch, batch, channels, side, rounds); the two sizes, then the bar's others
    "resnet18_8x112": ("resnet18", 8, 3, 112, 15),
    "tapcnn_64x28": ("tap-cnn", 64, 1, 28, 61),
    "tapcnn_1x28": ("tap-cnn", 1, 1, 28, 401),
    "tapcnn_256x28": ("tap-cnn", 256, 1, 28, 21),
    "resnet18_1x112": ("resnet18", 1, 3, 112, 41),
    "resnet18_16x224": ("resnet18", 16, 3, 224, 5),
}
EPSILON = 0.01
_IMPORTS = {  # the old files' relative imports, absolute
    "from .lrp_rules import": "from old_lrp_rules import",
    "from ..errors import": "from auditkit.errors import",
    "from ..ops import": "from auditkit.ops import",
    "from .validate import": "from auditkit.explain.validate import",
    "from ..models import": "from auditkit.models import",
}


def load_old(commit: str):
    """The old lrp module at ``commit`` (its own rule table, beside today's)."""
    folder = Path(tempfile.mkdtemp(prefix="old_lrp_"))
    for name in ("lrp", "lrp_rules"):
        text = subprocess.run(["git", "show", f"{commit}:auditkit/explain/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        for old, new in _IMPORTS.items():
            text = text.replace(old, new)
        (folder / f"old_{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("old_lrp")


def setup(arch: str, batch: int, channels: int, side: int):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_channels=channels, input_size=(side, side)).eval()
    for module in model.modules():  # realistic batch-norm statistics, as benchmarks/test_explain_bench.py
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model.net, torch.randn(batch, channels, side, side), torch.randint(0, 10, (batch, 1))


def gradient(net, x, targets):
    inputs = x.detach().requires_grad_(True)
    torch.autograd.grad(net(inputs).gather(1, targets).sum(), inputs)


def general(net, x, targets):
    with lrp.general_path():
        return lrp.lrp_epsilon(net, x, targets, epsilon=EPSILON)


def nchw_pools(net, x, targets):
    from auditkit.explain.lrp import forward

    pool = forward.max_pool2d_with_indices
    forward.max_pool2d_with_indices = lambda t, *geometry: F.max_pool2d(t, *geometry, return_indices=True)
    try:
        return lrp.lrp_epsilon(net, x, targets, epsilon=EPSILON)
    finally:
        forward.max_pool2d_with_indices = pool


def measure(name: str, old=None, nchw=False) -> str:
    arch, batch, channels, side, rounds = CONFIGS[name]
    net, x, targets = setup(arch, batch, channels, side)
    candidates = {"gradient": lambda: gradient(net, x, targets),
                  "fast": lambda: lrp.lrp_epsilon(net, x, targets, epsilon=EPSILON),
                  "general": lambda: general(net, x, targets)}
    if old is not None:
        candidates["old"] = lambda: old.lrp_epsilon(net, x, targets, epsilon=EPSILON)
    if nchw:
        candidates["nchw_pools"] = lambda: nchw_pools(net, x, targets)
    fast = candidates["fast"]()
    differences = {"general": general(net, x, targets)}
    if nchw:
        differences["nchw_pools"] = candidates["nchw_pools"]()
    if old is not None:
        differences["old"] = candidates["old"]()
    for fn in candidates.values():  # warm-up: traces, plans, generated code
        fn()
    names, times = list(candidates), {n: [] for n in candidates}
    for i in range(rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            candidates[n]()
            times[n].append(time.perf_counter() - start)

    def ratio(a, b):
        return statistics.median([u / v for u, v in zip(times[a], times[b])])

    pairs = [("fast", "gradient"), ("general", "fast")] + ([("fast", "old"), ("old", "gradient")] if old else []) \
        + ([("fast", "nchw_pools"), ("nchw_pools", "gradient")] if nchw else [])
    return (f"{name} ({rounds} rounds): median (minimum) µs "
            + ", ".join(f"{n} {statistics.median(times[n]) * 1e6:.0f} ({min(times[n]) * 1e6:.0f})" for n in names)
            + "; " + ", ".join(f"{a}/{b} {ratio(a, b):.3f}" for a, b in pairs) + "; max |fast - other| "
            + ", ".join(f"{n} {float((m - fast).abs().max()):.1e}" for n, m in differences.items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help=f"any of {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--old", help="a commit whose auditkit/explain/lrp.py to time beside today's")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--nchw-pools", action="store_true",
                        help="also time the fast path with plain F.max_pool2d (no channels-last copy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = load_old(args.old) if args.old else None
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    for name in args.configs or CONFIGS:
        print(measure(name, old, args.nchw_pools), flush=True)


if __name__ == "__main__":
    main()
