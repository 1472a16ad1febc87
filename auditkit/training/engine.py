"""The one training loop: ``fit(model, data, objective, config)``, for `auditkit train` (plain
cross-entropy) and every repair method (their objectives).

- Progress bars and per-epoch records (loss parts, accuracy, validation accuracy).
- A resumable state (model, optimizer, epoch, step, history, random-number states) is written
  atomically after every epoch and when Ctrl-C stops a run mid-epoch; ``resume=True`` continues
  exactly where it stopped (the data order of an epoch is a function of the seed and the epoch, so
  the remaining batches are the same ones).
- A NaN or infinite loss stops the run with a clear message; the last good state stays on disk.
- Under ``torchrun`` every process takes its share of each batch and gradients are averaged with one
  all-reduce per step (torch.distributed; gloo on CPU, NCCL on GPU). DistributedDataParallel's
  reducer does not support the double backward that RRR, Energy and TEA need, so the averaging is
  explicit.
- Device and precision as auditkit.device resolves them (autocast; fp16 with a loss scaler).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .._io import atomic_write
from .._progress import progress_bar
from ..data import AuditDataset, collate
from ..device import autocast, grad_scaler, resolve_device, resolve_precision
from ..distributed import Context
from ..errors import AuditkitError, ParameterError
from .augment import augment_batch
from .evaluation import evaluate
from .losses import correct, pos_weight_for, task_loss
from .objective import Objective

STATE_FORMAT = "auditkit-repair-state/1"
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
DATA_ORDERS = ("loader", "permutation")


class TrainingStopped(AuditkitError):
    """Training stopped (non-finite loss); the message says where the last good state is."""


class Interrupted(AuditkitError):
    """Ctrl-C: the state was saved and ``resume=True`` continues."""


@dataclass
class TrainConfig:
    """How ``fit`` trains. Every field is checked by ``validate`` (ParameterError naming it)."""

    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    weight_decay: float = 0.0
    schedule: str = "constant"  # or "cosine": lr decays to 0 over the run (a steadier end point)
    grad_clip: float = 0.0  # max global gradient norm; 0 = off (the double-backward losses want ~1)
    shift: int = 0  # augmentation: random translations of up to this many pixels (small clean splits)
    rotate: float = 0.0  # augmentation: random rotations of up to this many degrees
    scale: float = 0.0  # augmentation: random zoom by a factor in [1 - scale, 1 + scale]
    channel_shuffle: bool = False  # augmentation: each image's colour channels in a random order
    # The order of the samples in each epoch, a function of (seed, epoch) either way: "loader" is the
    # order torch's DataLoader gives with a generator seeded by `seed` (what plain training has always
    # used), "permutation" numpy's permutation seeded by (seed, epoch) (what repairs have always used).
    data_order: str = "loader"
    seed: int = 0
    # auto | cpu | cuda | cuda:N, or the torch.device a run resolved once (auditkit.device.resolve_device)
    device: str | torch.device = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; auditkit.device.resolve_precision)

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ParameterError(name, f"must be at least 1; got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ParameterError("lr", f"must be a positive number; got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ParameterError("weight_decay", f"must be a number >= 0; got {self.weight_decay}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("data_order", DATA_ORDERS)):
            if getattr(self, name) not in allowed:
                raise ParameterError(name, f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ParameterError("grad_clip", f"must be a number >= 0; got {self.grad_clip}")
        if self.shift < 0:
            raise ParameterError("shift", f"must be at least 0; got {self.shift}")
        if not 0 <= self.rotate <= 180:
            raise ParameterError("rotate", f"must lie in [0, 180] degrees; got {self.rotate}")
        if not 0 <= self.scale < 1:
            raise ParameterError("scale", f"must lie in [0, 1); got {self.scale}")
        resolve_precision(self.precision, resolve_device(self.device))

    def as_dict(self) -> dict:
        """The settings as plain values, for documents and saved states (the device by its name)."""
        return {**asdict(self), "device": str(self.device)}


@dataclass
class EpochRecord:
    epoch: int
    task_loss: float
    explanation_loss: float
    accuracy: float  # on the training batches, as they were seen
    seconds: float
    steps: int = 0
    val_accuracy: float | None = None


@dataclass
class FitState:
    epoch: int = 0  # epochs completed
    step: int = 0  # batches of the current epoch already done (mid-epoch interruption)
    history: list = field(default_factory=list)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The lr of global step ``step``: a pure function of the step, so a resumed run continues exactly."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    return config.lr


def epoch_order(n: int, config: TrainConfig, epoch: int) -> np.ndarray:
    """The sample order of an epoch (0-based): a function of (n, seed, epoch, data_order) only."""
    if config.data_order == "permutation":
        return np.random.default_rng([config.seed, epoch]).permutation(n)
    # The DataLoader's own draws (its base seed, then its sampler's permutations) from a generator
    # seeded once, replayed epoch by epoch, so that plain training keeps the order it always had.
    # Each epoch's iteration is run to its end, as a training loop does: the sampler draws once more
    # after its last index.
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(range(n), batch_size=max(n, 1), shuffle=True, generator=generator)
    order: list = []
    for _ in range(epoch + 1):
        order = [index for batch in loader for index in batch.tolist()]
    return np.asarray(order, dtype=np.int64)


def _rng_state(augment: torch.Generator) -> dict:
    """The generators the loop draws from (data order comes from epoch_order)."""
    return {"torch": torch.get_rng_state(), "augment": augment.get_state()}


def save_state(path: Path, model, optimizer, state: FitState, config: TrainConfig, augment: torch.Generator) -> None:
    payload = {
        "format": STATE_FORMAT,
        "epoch": state.epoch,
        "step": state.step,
        "history": [asdict(h) if not isinstance(h, dict) else h for h in state.history],
        "config": config.as_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(augment),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=True)


def load_state(path: Path, model, optimizer, augment: torch.Generator) -> FitState:
    """Restores model, optimizer and generators from a state file (plain tensors: weights_only loading)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign file
        raise AuditkitError(f"{path}: not a readable training state ({str(error).splitlines()[0][:120]})") from error
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise AuditkitError(f"{path}: not an auditkit training state")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"]["torch"])
    if "augment" in payload["rng"]:
        augment.set_state(payload["rng"]["augment"])
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


def training_loss(model: nn.Module, batch, objective: Objective):
    """(loss, task loss, explanation loss, logits) of one batch: task_weight · the model's own loss + λ ·
    objective (TAP Eq. 3). The model's own loss (training/losses.py): cross-entropy over classes, or
    BCE-with-logits over findings (``objective.pos_weight`` per finding) for multilabel labels."""
    logits, explanation = objective.forward_and_loss(model, batch)
    task = task_loss(logits, batch.labels, getattr(objective, "pos_weight", None))
    return objective.task_weight * task + objective.lam * explanation, task, explanation, logits


def _explain_missing_derivative(error: RuntimeError, objective: Objective) -> None:
    """PyTorch lacks some second derivatives (hardsigmoid's, in MobileNetV3): a loss on input gradients
    (RRR, Energy) cannot train such a network. Say so in one line instead of a traceback."""
    import re

    match = re.search(r"derivative for (\S+) is not implemented", str(error))
    if match:
        raise TrainingStopped(
            f"{objective.name} differentiates the network's input gradient, which needs second derivatives, and "
            f"PyTorch has none for {match.group(1)} in this network; use a first-order method (tap, tea, masktune)"
        ) from None


def _validation_accuracy(model: nn.Module, val_set: AuditDataset, device, precision: str) -> float:
    results = evaluate(model, val_set, device=device, precision=precision)
    return sum(r.accuracy * r.samples for r in results.values()) / max(sum(r.samples for r in results.values()), 1)


def fit(
    model: nn.Module,
    train_set: AuditDataset,
    objective: Objective,
    config: TrainConfig,
    *,
    val_set: AuditDataset | None = None,
    state_path: Path | None = None,
    resume: bool = False,
    context: Context | None = None,
    show_progress: bool = True,
    on_step=None,
    on_epoch=None,
) -> list[dict]:
    """Trains ``model`` in place on ``train_set`` for ``config.epochs`` epochs to minimise
    ``objective``; returns the per-epoch history (EpochRecord dicts). ``val_set``: accuracy after
    each epoch. ``state_path``: the resumable state, written after every epoch and on Ctrl-C.
    Raises TrainingStopped on a non-finite loss and Interrupted on Ctrl-C."""
    config.validate()
    device = resolve_device(config.device)
    # The run's randomness (dropout, random TEA classes) is a function of config.seed, and the caller's
    # random-number state is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        return _fit(model, train_set, objective, config, device, val_set=val_set, state_path=state_path, resume=resume,
                    context=context, show_progress=show_progress, on_step=on_step, on_epoch=on_epoch)


def _fit(model, train_set, objective, config, device, *, val_set, state_path, resume, context, show_progress, on_step,
         on_epoch) -> list[dict]:
    context = context or Context()
    precision = resolve_precision(config.precision, device)
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    scaler = grad_scaler(device, precision)
    augment = torch.Generator().manual_seed(config.seed)
    state = FitState()
    if resume:
        if state_path is None or not Path(state_path).is_file():
            raise ParameterError("resume", f"no saved state at {state_path}; start without resuming")
        state = load_state(Path(state_path), model, optimizer, augment)
    if len(train_set) == 0:
        raise AuditkitError("no training samples (check the data's train split and variant)")
    objective.prepare(train_set, device, show_progress and context.is_main)
    if train_set.label_kind == "multilabel" and getattr(objective, "pos_weight", None) is None:
        objective.pos_weight = pos_weight_for(train_set.targets)  # skewed findings: BCE's pos_weight
    per_rank = max(1, config.batch_size // context.world_size)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    for epoch in range(state.epoch, config.epochs):
        order = epoch_order(len(train_set), config, epoch)
        start_step = state.step if epoch == state.epoch else 0
        sums = {"task": 0.0, "explanation": 0.0, "correct": 0, "seen": 0}
        started = time.perf_counter()
        model.train()
        try:
            with progress_bar(f"{objective.name} epoch {epoch + 1}/{config.epochs}", total=steps_per_epoch,
                              enabled=show_progress and context.is_main) as bar:
                bar.advance(start_step)
                for step in range(start_step, steps_per_epoch):
                    indices = order[step * config.batch_size : (step + 1) * config.batch_size]
                    mine = indices[context.rank * per_rank : (context.rank + 1) * per_rank]
                    if len(mine) == 0:
                        mine = indices[:1]
                    batch = collate([train_set[int(i)] for i in mine])
                    batch.images, batch.masks = augment_batch(batch.images, config, augment, masks=batch.masks)
                    batch = batch.to(device)
                    with autocast(device, precision):
                        loss, task, explanation, logits = training_loss(model, batch, objective)
                    value = loss.item()
                    if not math.isfinite(value):
                        where = (f"; the last good state (end of epoch {state.epoch}) is in {state_path}"
                                 if state_path else "")
                        raise TrainingStopped(
                            f"the loss became {value} at epoch {epoch + 1}, step {step + 1}{where}; "
                            "lower the learning rate or λ and try again"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        scaler.scale(loss).backward()
                    except RuntimeError as error:
                        _explain_missing_derivative(error, objective)
                        raise
                    if context.active:
                        _average_gradients(model, context)
                    if config.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(
                            config, epoch * steps_per_epoch + step, config.epochs * steps_per_epoch
                        )
                    scaler.step(optimizer)
                    scaler.update()
                    sums["task"] += task.item() * len(mine)
                    sums["explanation"] += explanation.item() * len(mine)
                    sums["correct"] += correct(logits, batch.labels)
                    sums["seen"] += len(mine)
                    state.step = step + 1
                    bar.advance(1)
                    if on_step is not None:
                        on_step(epoch, step)
        except KeyboardInterrupt:
            state.epoch = epoch
            if state_path is not None and context.is_main:
                save_state(Path(state_path), model, optimizer, state, config, augment)
            raise Interrupted(
                f"interrupted at epoch {epoch + 1}, step {state.step}; the state is saved in {state_path}: "
                "run the same training again with resume to continue"
            ) from None
        seen = max(sums["seen"], 1)
        record = EpochRecord(epoch + 1, sums["task"] / seen, sums["explanation"] / seen, sums["correct"] / seen,
                             time.perf_counter() - started, steps_per_epoch - start_step)
        if val_set is not None and len(val_set):
            record.val_accuracy = _validation_accuracy(model, val_set, device, precision)
        record.seconds = time.perf_counter() - started
        state.history.append(asdict(record))
        state.epoch, state.step = epoch + 1, 0
        if state_path is not None and context.is_main:
            save_state(Path(state_path), model, optimizer, state, config, augment)
        if on_epoch is not None:
            on_epoch(record)
    model.eval()
    return state.history
