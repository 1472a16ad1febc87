"""The demo: the main job end to end on real digits. Train a classifier on decoy MNIST (TAP §5: a
grey patch in a random corner whose shade gives the class away), then repair it with TAP on the
ground-truth patch masks; the repair's proof holds the audits before and after.

    done = run_demo(Demo(Path("auditkit-demo")))
    done.summary()["before"]["label"], done.summary()["after"]["label"]    # reliant, not reliant

The same library calls as `train` and `repair` (train_checkpoint, repair_checkpoint), with their
defaults, so the demo's numbers are theirs. The device is resolved once here and passed to both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import resolve_device
from .errors import OutputExistsError, ParameterError
from .repair.checkpoint import CheckpointRepair, RepairedCheckpoint, repair_checkpoint
from .reproduce import KIND_ARCH_SETTINGS, case_options
from .training import TrainConfig
from .training.checkpoint import CheckpointTraining, TrainedCheckpoint, train_checkpoint

DEMO_DATA = "builtin:decoy-mnist"
DEMO_ARCH = "tap-cnn"
DEMO_METHOD = "tap"
# Per architecture the demo runs: epochs of the shortcut model's training, its schedule, and the repair's
# TAP lambda, TAP options and training (None: the defaults). The ViT's are those of its reproduction
# (auditkit reproduce kinds --arch vit-digits, its case tap-fixed; docs/reproductions.md).
_VIT = KIND_ARCH_SETTINGS["vit-digits"]
DEMO_ARCHS = {
    "tap-cnn": {"epochs": 6, "schedule": "constant", "lam": "default", "options": {}, "repair": {}},
    "vit-digits": {**_VIT["train"], "lam": _VIT["tap_lambda"], "options": case_options("vit-digits", "tap-fixed"),
                   "repair": _VIT["repair"]},
}


@dataclass(frozen=True)
class Demo:
    out: Path = Path("auditkit-demo")  # a folder: shortcut.safetensors, repaired.safetensors and its proof
    epochs: int | None = None  # of the shortcut model's training (None: DEMO_ARCHS' for the arch)
    seed: int = 0
    device: str | torch.device = "auto"
    precision: str = "auto"
    overwrite: bool = False
    arch: str = DEMO_ARCH  # one of DEMO_ARCHS: the two-layer CNN or the built-in ViT (vit-digits)


@dataclass
class DemoResult:
    trained: TrainedCheckpoint
    repaired: RepairedCheckpoint

    @property
    def report(self) -> Path:
        """The before/after page."""
        out = self.repaired.path
        return out.with_name(out.name + ".audit.html")

    def summary(self) -> dict:
        """Where the files are, the verdicts and the test accuracy per variant before and after."""
        before, after = self.repaired.document["before_audit"], self.repaired.document["after_audit"]
        return {"shortcut": str(self.trained.path), "repaired": str(self.repaired.path), "report": str(self.report),
                "before": before["verdict"], "after": after["verdict"],
                "accuracy": {"before": {k: v["value"] for k, v in before["task"]["per_variant"].items()},
                             "after": {k: v["value"] for k, v in after["task"]["per_variant"].items()}}}


def run_demo(
    demo: Demo,
    *,
    show_progress: bool = True,
    on_stage: Callable[[int], None] | None = None,
    on_train_start: Callable | None = None,
    on_train_epoch: Callable | None = None,
    on_trained: Callable[[TrainedCheckpoint], None] | None = None,
    on_repair_start: Callable | None = None,
    on_repair_epoch: Callable | None = None,
) -> DemoResult:
    """Trains the shortcut model into ``demo.out``, repairs it with TAP and returns both results.
    ``on_stage(1)`` / ``on_stage(2)`` run before training / repairing; the other callbacks are
    train_checkpoint's and repair_checkpoint's. Refuses a non-empty
    ``demo.out`` without ``overwrite``."""
    if demo.arch not in DEMO_ARCHS:
        raise ParameterError("arch", f"must be one of {', '.join(DEMO_ARCHS)} for the demo; got {demo.arch!r}")
    recipe = DEMO_ARCHS[demo.arch]
    if demo.out.exists() and any(demo.out.iterdir()) and not demo.overwrite:
        raise OutputExistsError("overwrite", f"is off and {demo.out} exists and is not empty: choose another folder, "
                                "or allow replacing the demo's files")
    demo.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(demo.device)  # once for both steps
    if on_stage is not None:
        on_stage(1)
    config = TrainConfig(epochs=demo.epochs or recipe["epochs"], schedule=recipe["schedule"], seed=demo.seed,
                         device=device, precision=demo.precision)
    trained = train_checkpoint(
        CheckpointTraining(DEMO_DATA, demo.arch, demo.out / "shortcut.safetensors", config, overwrite=demo.overwrite),
        show_progress=show_progress, on_start=on_train_start, on_epoch=on_train_epoch)
    if on_trained is not None:
        on_trained(trained)
    if on_stage is not None:
        on_stage(2)
    repaired = repair_checkpoint(
        CheckpointRepair(trained.path, DEMO_DATA, demo.out / "repaired.safetensors", method=DEMO_METHOD,
                         lam=recipe["lam"], options=dict(recipe["options"]), training=dict(recipe["repair"]),
                         overwrite=demo.overwrite, seed=demo.seed, device=device, precision=demo.precision),
        show_progress=show_progress, on_start=on_repair_start, on_epoch=on_repair_epoch)
    return DemoResult(trained, repaired)


__all__ = ["DEMO_ARCHS", "DEMO_DATA", "Demo", "DemoResult", "run_demo"]
