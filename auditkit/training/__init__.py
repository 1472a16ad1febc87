"""Training: one loop for plain classifiers and every repair method.

    trained = train_model(dataset, "tap-cnn", TrainConfig(epochs=6))          # what `auditkit train` does
    history = fit(model, train_set, objective, TrainConfig(...))             # any objective (repairs)
    results = evaluate(model, dataset)                                        # accuracy per variant
"""

from __future__ import annotations

from .augment import augment_batch, random_channel_shuffle, random_rotate_scale, random_shift
from .classifier import TrainedModel, align_dataset_to_model, choose_training_variant, model_data, train_model
from .engine import (
    DATA_ORDERS,
    OPTIMIZERS,
    SCHEDULES,
    EpochRecord,
    Interrupted,
    TrainConfig,
    TrainingStopped,
    fit,
    learning_rate,
    training_loss,
)
from .evaluation import VariantResult, evaluate
from .objective import Objective

__all__ = [
    "DATA_ORDERS",
    "OPTIMIZERS",
    "SCHEDULES",
    "EpochRecord",
    "Interrupted",
    "Objective",
    "TrainConfig",
    "TrainedModel",
    "TrainingStopped",
    "VariantResult",
    "align_dataset_to_model",
    "augment_batch",
    "choose_training_variant",
    "evaluate",
    "fit",
    "learning_rate",
    "model_data",
    "random_channel_shuffle",
    "random_rotate_scale",
    "random_shift",
    "train_model",
    "training_loss",
]
