"""Fine-tuning with an objective, robustly: resumable, interruptible, NaN-safe, repeatable, parallel.

- Progress bars and per-epoch metrics (loss parts, accuracy).
- A resumable state (model, optimizer, epoch, step, history, random-number states) is written
  atomically after every epoch and when Ctrl-C stops a run mid-epoch; ``resume=True`` continues
  exactly where it stopped (the data order of an epoch is a function of the seed and the epoch, so the
  remaining batches are the same ones).
- A NaN or infinite loss stops the run with a clear message; the last good state stays on disk and no
  output checkpoint is written.
- Under ``torchrun`` every process takes its share of each batch and gradients are averaged with one
  all-reduce per step (torch.distributed; gloo on CPU, NCCL on GPU). DistributedDataParallel's reducer
  does not support the double backward that RRR, Energy and TEA need, so the averaging is explicit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write
from .._progress import progress_bar
from ..device import autocast, grad_scaler, resolve_device, resolve_precision
from ..data import AuditDataset, collate
from ..distributed import Context
from ..errors import AuditkitError
from .objectives import Objective

STATE_FORMAT = "auditkit-repair-state/1"


class TrainingStopped(AuditkitError):
    """Training stopped (non-finite loss); the message says where the last good state is."""


class Interrupted(AuditkitError):
    """Ctrl-C: the state was saved and ``--resume`` continues."""


@dataclass
class FitConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lam: float = 0.1
    grad_clip: float = 0.0  # max global gradient norm; 0 = off (the double-backward losses want ~1)
    schedule: str = "constant"  # or "cosine": lr decays to 0 over the run (a steadier end point)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auditkit.device.resolve_device)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; auditkit.device.resolve_precision)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise AuditkitError("--epochs and --batch-size must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not (self.lam >= 0 and math.isfinite(self.lam)):
            raise AuditkitError(f"--lr must be positive and --lambda non-negative; got {self.lr}, {self.lam}")
        if self.optimizer not in ("adam", "sgd"):
            raise AuditkitError(f"--optimizer must be adam or sgd; got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise AuditkitError(f"--schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise AuditkitError(f"--grad-clip must be a non-negative number; got {self.grad_clip}")


SCHEDULES = ("constant", "cosine")


def learning_rate(config: FitConfig, step: int, total_steps: int) -> float:
    """The lr of global step ``step``: a pure function of the step, so a resumed run continues exactly."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    return config.lr


@dataclass
class EpochRecord:
    epoch: int
    task_loss: float
    explanation_loss: float
    accuracy: float
    seconds: float
    steps: int = 0


@dataclass
class FitState:
    epoch: int = 0  # epochs completed
    step: int = 0  # batches of the current epoch already done (mid-epoch interruption)
    history: list = field(default_factory=list)


def make_optimizer(model: nn.Module, config: FitConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of an epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _rng_state() -> dict:
    """Torch's generator: the only one the loop draws from (data order comes from epoch_order)."""
    return {"torch": torch.get_rng_state()}


def save_state(path: Path, model, optimizer, state: FitState, config: FitConfig) -> None:
    payload = {
        "format": STATE_FORMAT,
        "epoch": state.epoch,
        "step": state.step,
        "history": [asdict(h) if not isinstance(h, dict) else h for h in state.history],
        "config": asdict(config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=True)


def load_state(path: Path, model, optimizer) -> FitState:
    """Restores model and optimizer from a state file (plain tensors: weights_only loading)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign file
        raise AuditkitError(f"{path}: not a readable repair state ({str(error).splitlines()[0][:120]})") from error
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise AuditkitError(f"{path}: not an auditkit repair state")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"]["torch"])
    return FitState(payload["epoch"], payload["step"], list(payload["history"]))


def _average_gradients(model: nn.Module, context: Context) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= context.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def training_loss(model: nn.Module, batch, objective: Objective, lam: float):
    """(loss, task loss, explanation loss, logits) of one batch: task_weight · CE + λ · objective (TAP Eq. 3)."""
    logits, explanation = objective.forward_and_loss(model, batch)
    task = F.cross_entropy(logits, batch.labels)
    return objective.task_weight * task + lam * explanation, task, explanation, logits


def fit(
    model: nn.Module,
    train_set: AuditDataset,
    objective: Objective,
    config: FitConfig,
    *,
    state_path: Path | None = None,
    resume: bool = False,
    context: Context | None = None,
    show_progress: bool = True,
    on_step=None,
    on_epoch=None,
) -> list[dict]:
    """Trains ``model`` in place for ``config.epochs`` epochs; returns the per-epoch history."""
    config.validate()
    context = context or Context()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    model.to(device).train()
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    scaler = grad_scaler(device, precision)
    state = FitState()
    if resume:
        if state_path is None or not state_path.is_file():
            raise AuditkitError(f"--resume: no saved state at {state_path}; run without --resume to start")
        state = load_state(state_path, model, optimizer)
    if len(train_set) == 0:
        raise AuditkitError("no training samples for the repair (check the data's train split)")
    objective.prepare(train_set, device, show_progress and context.is_main)
    per_rank = max(1, config.batch_size // context.world_size)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    for epoch in range(state.epoch, config.epochs):
        order = epoch_order(len(train_set), config.seed, epoch)
        start_step = state.step if epoch == state.epoch else 0
        sums = {"task": 0.0, "explanation": 0.0, "correct": 0, "seen": 0}
        started = time.perf_counter()
        try:
            with progress_bar(f"{objective.name} epoch {epoch + 1}/{config.epochs}", total=steps_per_epoch,
                              enabled=show_progress and context.is_main) as bar:
                bar.advance(start_step)
                for step in range(start_step, steps_per_epoch):
                    indices = order[step * config.batch_size : (step + 1) * config.batch_size]
                    mine = indices[context.rank * per_rank : (context.rank + 1) * per_rank]
                    if len(mine) == 0:
                        mine = indices[:1]
                    batch = collate([train_set[int(i)] for i in mine]).to(device)
                    with autocast(device, precision):
                        loss, task, explanation, logits = training_loss(model, batch, objective, config.lam)
                    value = loss.item()
                    if not math.isfinite(value):
                        where = f"the last good state (end of epoch {state.epoch}) is in {state_path}" if state_path else ""
                        raise TrainingStopped(
                            f"the loss became {value} at epoch {epoch + 1}, step {step + 1}; {where}; "
                            "lower --lr or --lambda and try again"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if context.active:
                        _average_gradients(model, context)
                    if config.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(config, epoch * steps_per_epoch + step, config.epochs * steps_per_epoch)
                    scaler.step(optimizer)
                    scaler.update()
                    sums["task"] += task.item() * len(mine)
                    sums["explanation"] += explanation.item() * len(mine)
                    sums["correct"] += int((logits.argmax(1) == batch.labels).sum())
                    sums["seen"] += len(mine)
                    state.step = step + 1
                    bar.advance(1)
                    if on_step is not None:
                        on_step(epoch, step)
        except KeyboardInterrupt:
            state.epoch = epoch
            if state_path is not None and context.is_main:
                save_state(state_path, model, optimizer, state, config)
            raise Interrupted(
                f"interrupted at epoch {epoch + 1}, step {state.step}; the state is saved in {state_path}: "
                "run the same command with --resume to continue"
            ) from None
        seen = max(sums["seen"], 1)
        record = EpochRecord(epoch + 1, sums["task"] / seen, sums["explanation"] / seen, sums["correct"] / seen,
                             time.perf_counter() - started, steps_per_epoch - start_step)
        state.history.append(asdict(record))
        state.epoch, state.step = epoch + 1, 0
        if state_path is not None and context.is_main:
            save_state(state_path, model, optimizer, state, config)
        if on_epoch is not None:
            on_epoch(record)
    model.eval()
    return state.history
