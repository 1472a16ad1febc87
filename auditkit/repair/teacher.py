"""Teacher annotations (TAP §4.2, Eq. 13-14): masks from a model trained on a small clean split.

    E  = teacher saliency of the image (input gradients by default, any attribution method),
         |.| summed over channels and scaled to [0, 1] per image (min-max)          (Eq. 13)
    M~ = 1 where E < tau, else 0                                                        (Eq. 14)

The mask marks what the teacher finds *unimportant*, which should include any spurious signal the
teacher never learnt to use; TAP then penalises activations there. Alternative: ``quantile=q``
marks the fraction q of pixels with the lowest saliency in each image (robust to maps whose
values cluster). When the data has ground-truth masks, annotation precision and recall against
them are reported (TAP Fig. 8): recall = |gt ∩ M~| / |gt|, precision = |gt ∩ M~| / |M~|.

The one teacher recipe (issue 28): ``TEACHER_RECIPE`` and :func:`train_teacher` train the kinds
table's teacher, `auditkit reproduce colored`'s and the one ``--method auto`` trains when the data has
a decorrelated variant and no ``--teacher`` is given (TAP Tables 9 and 12 keep the paper's own teachers:
they reproduce it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .._progress import progress_bar
from ..data import AuditDataset, collate, to_uint8
from ..data.dataset import Record
from ..data.meaning import OBJECT, SPURIOUS
from ..device import autocast, model_device, resolve_precision
from ..errors import AuditkitError, DataError, ParameterError, short_list
from ..explain import METHODS, attribute


@dataclass(frozen=True)
class AnnotationConfig:
    method: str = "gradient"
    tau: float | None = 0.1
    quantile: float | None = None
    batch_size: int = 128
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: autocast of the teacher's passes (on its device)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise AuditkitError(f"unknown annotation method {self.method!r}; methods: {', '.join(METHODS)}")
        if (self.tau is None) == (self.quantile is None):
            raise ParameterError("tau", "must be given, or quantile instead: exactly one of the two")
        value = self.tau if self.tau is not None else self.quantile
        if not 0.0 <= value <= 1.0:
            raise ParameterError("tau" if self.tau is not None else "quantile", f"must lie in [0, 1]; got {value}")


# ---- the one teacher recipe -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherRecipe:
    """How a teacher is trained: a stratified 10 % of the train split's decorrelated variant, long and
    augmented. On coloured MNIST the kinds table's earlier teacher (60 epochs, shifts only, on the
    grey "clean" digits) never saw a coloured image and left TEA at 0.40 permuted; this one, trained on
    randomly coloured digits with channel orders shuffled, is colour-blind by construction and is what
    took `reproduce colored` to 0.93 (docs/repair.md has both measured). Channel shuffling does nothing
    to one-channel images, so the recipe is the same for every kind."""

    variants: tuple[str, ...] = ("permuted", "clean")  # first one the data has: the artefact cannot teach there
    fraction: float = 0.1  # a small clean split is what a user can label by hand
    epochs: int = 300  # 350 images: many passes, the augmentation keeps them from being memorised
    shift: int = 2
    rotate: float = 15.0
    scale: float = 0.15
    channel_shuffle: bool = True

    def train_options(self) -> dict:
        """The `auditkit train` options (TrainConfig fields) of the recipe."""
        return {"epochs": self.epochs, "shift": self.shift, "rotate": self.rotate, "scale": self.scale,
                "channel_shuffle": self.channel_shuffle}

    def as_dict(self) -> dict:
        """Everything the recipe fixes (for reports)."""
        return {"variants": list(self.variants), "fraction": self.fraction, **self.train_options()}

    def command(self, arch: str = "ARCH", data: str = "DATA", variant: str | None = "permuted") -> str:
        """The `auditkit train` line that trains this teacher (for messages and docs); ``variant`` None for
        data that is clean as it is."""
        chosen = f" --variant {variant}" if variant else ""
        return (f"auditkit train --data {data} --arch {arch}{chosen} --fraction {self.fraction} "
                f"--epochs {self.epochs} --shift {self.shift} --rotate {self.rotate:g} --scale {self.scale:g}"
                + (" --channel-shuffle" if self.channel_shuffle else "") + " --out teacher.safetensors")


TEACHER_RECIPE = TeacherRecipe()
# What TEA needs, in one line (auto says it when it can neither be given nor train a teacher).
TEA_NEEDS = ("needs a teacher: --teacher, a model trained on a small clean split ("
             + TEACHER_RECIPE.command() + "), or data with a permuted or clean variant to train one on")


def teacher_variant(dataset: AuditDataset, split: str = "train", recipe: TeacherRecipe = TEACHER_RECIPE) -> str | None:
    """The variant of ``split`` a teacher is trained on (the recipe's first present), or None."""
    present = set(dataset.select(split=split).variants)
    return next((v for v in recipe.variants if v in present), None)


def train_teacher(dataset: AuditDataset, arch: str, seed: int, *, split: str = "train", normalize="dataset",
                  device="auto", precision: str = "auto", recipe: TeacherRecipe = TEACHER_RECIPE,
                  show_progress: bool = False):
    """A teacher trained with ``recipe`` on ``dataset`` (``arch``, seeded); DataError when the split has
    no decorrelated variant (TEA_NEEDS says what to do)."""
    from ..training import TrainConfig, train_model  # training imports repair's building blocks

    variant = teacher_variant(dataset, split, recipe)
    if variant is None:
        raise DataError(f"{dataset.info.name}: no {' or '.join(recipe.variants)} variant to train a teacher on; TEA "
                        + TEA_NEEDS)
    config = TrainConfig(seed=seed, device=device, precision=precision, **recipe.train_options())
    return train_model(dataset, arch, config, split=split, variant=variant, fraction=recipe.fraction,
                       normalize=normalize, val_split=None, show_progress=show_progress).model


def same_classes_as_student(teacher, student) -> None:
    """Refuses a teacher whose classes are not the student's, in the student's order.

    TEA compares the two models' outputs class by class (the teacher's top classes are explained by
    both, and the distillation term matches logits index by index), so a teacher that names the same
    classes in another order, or other classes, would teach the wrong class silently. A teacher whose
    file records no class names (bare weights) adopts the data's and is checked when aligned.
    Raises ParameterError("teacher")."""
    heads = tuple(getattr(m.meta, "head", "softmax") or "softmax" for m in (student, teacher))
    if (heads[0] == "multilabel") != (heads[1] == "multilabel"):
        raise ParameterError("teacher", f"is a {heads[1]} model and the model a {heads[0]} one: TEA compares their "
                                        "outputs output by output; train the teacher on the same kind of labels")
    if "class_names" in getattr(teacher, "adopt_from_data", ()):
        return
    ours, theirs = tuple(student.meta.class_names), tuple(teacher.meta.class_names)
    if ours != theirs:
        how = "in another order" if sorted(ours) == sorted(theirs) else "other classes"
        raise ParameterError("teacher", f"has {how} ({short_list(theirs)}) than the model ({short_list(ours)}): TEA "
                                        "compares their outputs class by class; retrain or reorder the teacher's head")


def saliency_masks(teacher, images: torch.Tensor, config: AnnotationConfig) -> torch.Tensor:
    """(N, 1, H, W) float masks: 1 where the teacher's normalised saliency is low (Eq. 13-14). The
    saliency is of the teacher's predicted class (a multilabel teacher: its highest finding logit)."""
    maps = attribute(teacher, images, "pred", config.method)[:, 0].abs()
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    normalised = ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)
    if config.tau is not None:
        masks = normalised < config.tau
    else:
        threshold = torch.quantile(normalised.flatten(1), config.quantile, dim=1).view(-1, 1, 1)
        masks = normalised <= threshold
    return masks.float().unsqueeze(1)


def annotation_key(teacher_fingerprint: str, dataset: AuditDataset, config: AnnotationConfig, precision: str) -> str:
    key = [teacher_fingerprint, dataset.fingerprint(), config.method, config.tau, config.quantile]
    if precision != "fp32":  # fp32 keys stay those of earlier versions (their caches remain valid)
        key.append(precision)
    if dataset.info.mask_meaning == OBJECT:  # its stats score the complement (artefact keys stay as they were)
        key.append(OBJECT)
    text = json.dumps(key)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def annotate(
    teacher,
    dataset: AuditDataset,
    config: AnnotationConfig,
    *,
    cache_dir: Path | None = None,
    teacher_fingerprint: str = "",
    show_progress: bool = True,
) -> tuple[AuditDataset, dict]:
    """The dataset with teacher masks instead of its own, and annotation statistics.

    With ``cache_dir``, masks are stored as ``<key>.npz`` (key: teacher, data, method, threshold) and
    reused by later runs."""
    config.validate()
    teacher.eval()
    device = model_device(teacher)
    precision = resolve_precision(config.precision, device)
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"annotations-{annotation_key(teacher_fingerprint, dataset, config, precision)}.npz"
    if cache is not None and cache.is_file():
        stored = np.load(cache)
        masks, stats = stored["masks"], json.loads(str(stored["stats"]))
        stats["cached"] = str(cache)
    else:
        masks = np.zeros((len(dataset), *dataset.image_size), dtype=np.uint8)
        overlap = ground_truth = annotated = 0.0
        with progress_bar("annotating", total=len(dataset), enabled=show_progress) as bar:
            for start in range(0, len(dataset), config.batch_size):
                batch = collate([dataset[k] for k in range(start, min(start + config.batch_size, len(dataset)))])
                images = batch.images.to(device)
                with autocast(device, precision):
                    predicted = saliency_masks(teacher, images, config).cpu()
                masks[start : start + len(predicted)] = to_uint8(predicted)
                # Teacher masks mark the artefact's side; object ground truth is scored as its complement.
                truth_masks = 1.0 - batch.masks if dataset.info.mask_meaning == OBJECT else batch.masks
                truth = (truth_masks > 0.5) & batch.has_mask.view(-1, 1, 1, 1)
                overlap += float((truth & (predicted > 0.5)).sum())
                ground_truth += float(truth.sum())
                annotated += float((predicted[batch.has_mask] > 0.5).sum())
                bar.advance(len(predicted))
        stats = {
            "method": config.method, "tau": config.tau, "quantile": config.quantile,
            "mean_mask_area": float(masks.mean() / 255.0),
            "recall": overlap / ground_truth if ground_truth else None,
            "precision": overlap / annotated if annotated and ground_truth else None,
        }
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            from .._io import atomic_write

            def write(tmp: Path) -> None:
                with tmp.open("wb") as handle:  # a file object: numpy would append ".npz" to a path
                    np.savez_compressed(handle, masks=masks, stats=json.dumps(stats))

            atomic_write(cache, write, overwrite=True)
    records = [
        Record(r.image, r.label, masks[k], r.variant, r.group, r.split, r.artefact)
        for k, r in enumerate(dataset.records)
    ]
    # Teacher masks mark what the teacher finds irrelevant (low saliency): the artefact's side.
    annotated_set = AuditDataset(records, replace(dataset.info, mask_meaning=SPURIOUS), channels=dataset.channels,
                                 image_size=dataset.image_size)
    return annotated_set, stats
