"""Plain supervised training and evaluation (the "No XS" / "Base" models of the TAP paper).

``train_classifier`` minimises cross-entropy on one split of a dataset and reports a validation
accuracy per epoch; ``evaluate`` gives accuracy and a confusion matrix per variant, which is how a
shortcut shows: accurate on contaminated data, clearly worse on permuted and clean data.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ._progress import progress_bar
from .device import autocast, grad_scaler, model_device, resolve_device, resolve_precision
from .data import AuditDataset, make_loader
from .errors import AuditkitError, DataError

OPTIMIZERS = ("adam", "sgd")


class TrainingError(AuditkitError):
    """Training cannot go on (e.g. the loss became NaN)."""


@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    weight_decay: float = 0.0
    shift: int = 0  # augmentation: random translations of up to this many pixels (small clean splits)
    rotate: float = 0.0  # augmentation: random rotations of up to this many degrees
    scale: float = 0.0  # augmentation: random zoom by a factor in [1 - scale, 1 + scale]
    channel_shuffle: bool = False  # augmentation: each image's colour channels in a random order
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auditkit.device.resolve_device)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; auditkit.device.resolve_precision)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise AuditkitError("--epochs and --batch-size must be at least 1")
        if self.shift < 0:
            raise AuditkitError(f"--shift must be at least 0; got {self.shift}")
        if not 0 <= self.rotate <= 180:
            raise AuditkitError(f"--rotate must lie in [0, 180] degrees; got {self.rotate}")
        if not 0 <= self.scale < 1:
            raise AuditkitError(f"--scale must lie in [0, 1); got {self.scale}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AuditkitError(f"--lr must be a positive number; got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise AuditkitError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        resolve_precision(self.precision, resolve_device(self.device))


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float | None
    seconds: float


@dataclass
class VariantResult:
    variant: str
    samples: int
    accuracy: float
    confusion: list[list[int]] = field(default_factory=list)  # rows: true class, columns: predicted


def choose_training_variant(dataset: AuditDataset, requested: str | None) -> str:
    """The variant to train on: the one asked for, else 'contaminated', else the only one."""
    variants = dataset.variants
    if requested is not None:
        if requested not in variants:
            raise DataError(f"no variant {requested!r} in the training data; it has {', '.join(variants)}")
        return requested
    if "contaminated" in variants:
        return "contaminated"
    if len(variants) == 1:
        return variants[0]
    raise DataError(f"the training data has variants {', '.join(variants)}; choose one with --variant")


def align_dataset_to_model(dataset: AuditDataset, meta) -> AuditDataset:
    """The dataset in the model's input format (channels, size), after checking its classes.

    Images are converted by the dataset policy (grey <-> RGB, resize); class names must match
    the checkpoint's, in order, or predictions would be compared with the wrong labels.
    """
    if tuple(dataset.classes) != tuple(meta.class_names):
        ours, theirs = ", ".join(dataset.classes[:6]), ", ".join(meta.class_names[:6])
        raise DataError(
            f"the dataset's classes ({ours}{', ...' if dataset.num_classes > 6 else ''}) do not match the "
            f"checkpoint's ({theirs}{', ...' if len(meta.class_names) > 6 else ''})"
        )
    return dataset.with_format(channels=meta.in_channels, image_size=tuple(meta.input_size))


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: AuditDataset,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "auto",
    show_progress: bool = False,
) -> dict[str, VariantResult]:
    """Accuracy and confusion matrix of ``model`` on every variant of ``dataset``; the forward
    passes run on ``device`` (default: where the model is) in ``precision`` (auditkit.device:
    auto, fp32, bf16, fp16)."""
    device = model_device(model) if device is None else resolve_device(device)
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    k = dataset.num_classes
    confusion = {v: torch.zeros(k, k, dtype=torch.long) for v in dataset.variants}
    try:
        with progress_bar("evaluating", total=len(dataset), enabled=show_progress) as bar:
            for batch in make_loader(dataset, batch_size):
                with autocast(device, precision):
                    predicted = model(batch.images.to(device)).argmax(1).cpu()
                for variant in set(batch.variants):
                    rows = torch.tensor([v == variant for v in batch.variants])
                    index = batch.labels[rows] * k + predicted[rows]
                    confusion[variant] += torch.bincount(index, minlength=k * k).view(k, k)
                bar.advance(len(batch.labels))
    finally:
        model.train(was_training)
    results = {}
    for variant, matrix in confusion.items():
        total = int(matrix.sum())
        results[variant] = VariantResult(
            variant, total, float(matrix.diag().sum()) / max(total, 1), matrix.tolist()
        )
    return results


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by its own random (dy, dx) in [-shift, shift]; borders repeat the edge
    pixels, so a coloured background stays one colour."""
    if shift == 0:
        return images
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def random_rotate_scale(images: torch.Tensor, rotate: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Each image rotated by its own angle in [-rotate, rotate] degrees and zoomed by a factor in
    [1 - scale, 1 + scale] about its centre; outside pixels repeat the border, as ``random_shift``."""
    if rotate == 0 and scale == 0:
        return images
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotate)
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    # affine_grid maps output to input coordinates: the inverse of the wanted zoom.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = nn.functional.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_channel_shuffle(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image's channels in its own random order. A teacher trained on a few hundred images can
    otherwise pick up chance colour-class correlations of its small sample (docs/methods/tea.md)."""
    order = torch.rand(images.shape[:2], generator=generator).argsort(dim=1).to(images.device)
    return images.gather(1, order[:, :, None, None].expand_as(images))


def augment_batch(images: torch.Tensor, config, generator: torch.Generator) -> torch.Tensor:
    """The augmentation ``config`` (a TrainConfig) asks for."""
    images = random_rotate_scale(images, config.rotate, config.scale, generator)
    if config.channel_shuffle:
        images = random_channel_shuffle(images, generator)
    return random_shift(images, config.shift, generator)


def train_classifier(
    model: nn.Module,
    train_set: AuditDataset,
    val_set: AuditDataset | None,
    config: TrainConfig,
    *,
    show_progress: bool = True,
    on_epoch=None,
) -> list[EpochStats]:
    """Cross-entropy training; returns per-epoch statistics. ``on_epoch(stats)`` is called after each."""
    config.validate()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    model.to(device).train()
    optimizer = _make_optimizer(model, config)
    scaler = grad_scaler(device, precision)
    loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed)
    augment = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        with progress_bar(f"epoch {epoch}/{config.epochs}", total=len(train_set), enabled=show_progress) as bar:
            for step, batch in enumerate(loader):
                images = augment_batch(batch.images, config, augment).to(device)
                labels = batch.labels.to(device)
                with autocast(device, precision):
                    logits = model(images)
                    loss = nn.functional.cross_entropy(logits, labels)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at epoch {epoch}, step {step}; lower --lr or check the data"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.item() * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
                bar.advance(len(labels))
        val_accuracy = None
        if val_set is not None and len(val_set):
            results = evaluate(model, val_set, device=device, precision=precision)
            val_accuracy = sum(r.accuracy * r.samples for r in results.values()) / sum(r.samples for r in results.values())
        stats = EpochStats(epoch, loss_sum / seen, correct / seen, val_accuracy, time.perf_counter() - start)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    model.eval()
    return history


def history_as_dicts(history: list[EpochStats]) -> list[dict]:
    return [asdict(stats) for stats in history]
