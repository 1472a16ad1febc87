"""What a training step minimises: ``task_weight`` · cross-entropy + ``lam`` · an explanation loss
(TAP Eq. 3). The base class is plain supervised training (no explanation loss); every repair
method (auditkit/repair/methods/) subclasses it."""

from __future__ import annotations

import torch
from torch import nn

from ..data import Batch
from ..models import run_capturing


class Objective:
    """Plain cross-entropy, and the base of the repair objectives.

    ``forward_and_loss(model, batch) -> (logits, explanation loss)`` runs the model once; the
    engine adds ``task_weight`` · CE(logits) and ``lam`` · the explanation loss. ``layers``: modules
    whose outputs ``loss`` receives (TAP). ``prepare`` runs once before training."""

    name = "train"
    layers: tuple[str, ...] = ()
    task_weight: float = 1.0
    lam: float = 0.0  # λ: the explanation loss's weight (TAP Eq. 3)
    # Multilabel: BCE's pos_weight per finding (training/losses.py; set by fit when findings are skewed).
    pos_weight: torch.Tensor | None = None
    # Whether the network goes on from a transformer layer's token map (models/hooks.py,
    # capture_activations' ``rebuild``); a loss on the maps alone (TAP) needs no rebuilt copy.
    rebuild_maps: bool = True

    def prepare(self, train_set, device, show_progress: bool = False) -> None:
        """Work done once per run (e.g. caching a teacher's heatmaps)."""

    def forward_and_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # Outputs a later in-place operation would overwrite are captured from a copy (found on the
        # first step, remembered for the rest of the run), and each layer's module must run as often in
        # every step, so that "block#2" means the same call throughout the run.
        copy = getattr(self, "_copied_layers", ())
        calls = self.__dict__.setdefault("_layer_calls", {})
        logits, activations, copy = run_capturing(model, self.layers, lambda: model(batch.images), copy, calls,
                                                   self.rebuild_maps)
        self._copied_layers = copy
        return logits, self.loss(model, batch, logits, activations)

    def loss(
        self, model: nn.Module, batch: Batch, logits: torch.Tensor, activations: list[torch.Tensor]
    ) -> torch.Tensor:
        return logits.new_zeros(())
