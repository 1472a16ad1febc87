"""Repair losses against hand-computed values on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from auditkit.data import Batch
from auditkit.repair import (
    EnergyObjective,
    RrrObjective,
    TapObjective,
    TeaObjective,
    heat_distance,
    multiresolution_heat_loss,
)
from auditkit.repair import energy_in_mask


def batch_of(images, labels, masks):
    n = images.shape[0]
    return Batch(images, labels, masks, torch.ones(n, dtype=torch.bool), ["contaminated"] * n, [""] * n,
                 torch.arange(n))


class Linear(nn.Module):
    """logits = W flatten(x): input gradients have a closed form."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return x.flatten(1) @ self.weight.t()


def test_rrr_by_hand():
    torch.manual_seed(0)
    k, h, w = 3, 2, 2
    weight = torch.randn(k, h * w, dtype=torch.float64)
    x = torch.rand(2, 1, h, w, dtype=torch.float64)
    masks = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)
    model = Linear(weight).double()
    _, loss = RrrObjective().forward_and_loss(model, batch_of(x, torch.zeros(2, dtype=torch.long), masks))
    # d/dz sum_k log softmax_k(z) = 1 - K p  =>  d/dx = W^T (1 - K p)
    expected = 0.0
    for n in range(2):
        z = (weight @ x[n].flatten()).numpy()
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        grad = weight.numpy().T @ (1 - k * p)
        expected += ((masks[n].flatten().numpy() * grad) ** 2).sum()
    assert loss.item() == pytest.approx(expected / 2, rel=1e-10)


def test_energy_by_hand():
    maps = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])
    masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # positive mass 1 + 3 = 4, inside the mask 1
    assert energy_in_mask(maps, masks).item() == pytest.approx(0.25)
    assert energy_in_mask(-maps.abs(), masks).item() == 0.0  # no positive part: 0, not NaN


def test_energy_objective_uses_input_x_gradient_of_the_true_class():
    weight = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[[[1.0, 1.0], [2.0, 4.0]]]], dtype=torch.float64)
    masks = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)
    logits, loss = EnergyObjective().forward_and_loss(Linear(weight), batch_of(x, torch.tensor([0]), masks))
    torch.testing.assert_close(logits, x.flatten(1) @ weight.t())  # the same forward serves the task loss
    ixg = (x.flatten() * weight[0]).numpy()  # x * W_0 = [1, 2, -2, 2]
    positive = np.clip(ixg, 0, None)
    assert loss.item() == pytest.approx(-(positive[0] + positive[3]) / positive.sum())


def test_heat_distance_and_pyramid_by_hand():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # ||s - t||_1 = 2, ||s||_1 = ||t||_1 = 2
    assert heat_distance(student, teacher).item() == pytest.approx(2 / math.sqrt(4))
    # scale 2^1: both average to 0.5 -> distance 0; two scales: (1 + 0) / 2
    assert multiresolution_heat_loss(student, teacher, scales=2).item() == pytest.approx(0.5)
    assert multiresolution_heat_loss(student, student, scales=4).item() == pytest.approx(0.0)
    # a 2x2 map allows only two scales (2^0, 2^1), whatever is asked
    assert multiresolution_heat_loss(student, teacher, scales=6).item() == pytest.approx(0.5)


def test_tap_objective_is_eq_8():
    activations = [torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, 2)]
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, :2, :2] = 1
    objective = TapObjective(layers=("a", "b"), kernel_size=1)
    loss = objective.loss(None, batch_of(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), masks), None,
                          activations)
    expected = 0.0
    for a in activations:
        d = torch.nn.functional.adaptive_avg_pool2d(masks, a.shape[-2:])  # k = 1: no widening
        expected += (d * a.relu()).sum(dim=(1, 2, 3)).mean() / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_tea_loss_is_zero_when_the_student_is_the_teacher_and_trains_otherwise():
    from auditkit.models import build_model

    torch.manual_seed(0)
    teacher = build_model("shortcut-cnn", num_classes=4, in_channels=3, input_size=(16, 16)).eval()
    images = torch.rand(3, 3, 16, 16)
    batch = batch_of(images, torch.zeros(3, dtype=torch.long), torch.zeros(3, 1, 16, 16))
    objective = TeaObjective(teacher=teacher, epsilon=0.01)
    logits, loss = objective.forward_and_loss(teacher, batch)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(logits, teacher(images))  # LRP's forward gives the logits
    student = build_model("shortcut-cnn", num_classes=4, in_channels=3, input_size=(16, 16))
    _, loss = objective.forward_and_loss(student.eval(), batch)
    assert loss.item() > 0
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_learning_rate_schedules():
    from auditkit.training import TrainConfig, learning_rate

    cosine = TrainConfig(lr=0.2, schedule="cosine")
    assert learning_rate(cosine, 0, 100) == pytest.approx(0.2)
    assert learning_rate(cosine, 50, 100) == pytest.approx(0.1)
    assert learning_rate(cosine, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(TrainConfig(lr=0.2), 73, 100) == 0.2


def test_tea_teacher_cache_gives_the_same_loss_as_computing_per_batch():
    from auditkit.data import collate, open_dataset
    from auditkit.models import build_model

    data = open_dataset("builtin:decoy-digits").select(split="train", variant="contaminated").select(indices=range(40))
    torch.manual_seed(1)
    teacher = build_model("tap-cnn", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
    student = build_model("tap-cnn", num_classes=10, in_channels=1, input_size=(8, 8)).eval()
    batch = collate([data[i] for i in (3, 17, 39, 0)])
    fresh = TeaObjective(teacher=teacher, epsilon=0.01)
    cached = TeaObjective(teacher=teacher, epsilon=0.01)
    cached.prepare(data, "cpu")
    assert cached._cache is not None and cached._cache[1].shape == (40, 1, 8, 8)
    torch.testing.assert_close(cached.forward_and_loss(student, batch)[1], fresh.forward_and_loss(student, batch)[1])
    tiny_budget = TeaObjective(teacher=teacher, epsilon=0.01, cache_bytes=100)
    tiny_budget.prepare(data, "cpu")
    assert tiny_budget._cache is None  # over budget: computed per batch
    randomised = TeaObjective(teacher=teacher, epsilon=0.01, explained_class="random")
    randomised.prepare(data, "cpu")
    assert randomised._cache is None  # random classes change every step


def tea_pair(seed: int, classes: int, n: int):
    """(teacher, student, images, batch): two untrained shortcut CNNs (16x16 RGB) in eval mode."""
    from auditkit.models import build_model

    torch.manual_seed(seed)
    teacher, student = (build_model("shortcut-cnn", num_classes=classes, in_channels=3, input_size=(16, 16)).eval()
                        for _ in range(2))
    images = torch.rand(n, 3, 16, 16)
    return teacher, student, images, batch_of(images, torch.zeros(n, dtype=torch.long), torch.zeros(n, 1, 16, 16))


def test_tea_with_two_classes_is_the_mean_heat_loss_of_the_teachers_top_two():
    from auditkit.explain import lrp_epsilon
    from auditkit.repair import multiresolution_heat_loss

    teacher, student, images, batch = tea_pair(seed=2, classes=5, n=6)
    objective = TeaObjective(teacher=teacher, epsilon=0.01, classes=2, distill_weight=0.0)
    _, loss = objective.forward_and_loss(student, batch)
    order = teacher(images).argsort(dim=1, descending=True)
    expected = 0.0
    for rank in range(2):  # one heat loss per rank of the teacher's classes, then their mean
        target = order[:, rank:rank + 1]
        expected += multiresolution_heat_loss(lrp_epsilon(student, images, target, epsilon=0.01)[:, 0],
                                              lrp_epsilon(teacher, images, target, epsilon=0.01)[:, 0]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    random_pairs, _, _ = TeaObjective(teacher=teacher, explained_class="random", classes=3).teacher_explanation(images)
    assert random_pairs.shape == (6, 3) and all(len(set(row.tolist())) == 3 for row in random_pairs)


def test_distillation_loss_matches_hand_computed_kl_divergences():
    from auditkit.repair import distillation_loss

    # Teacher p = (1/4, 3/4), student q = (1/2, 1/2): KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2).
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    student = torch.zeros(1, 2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert distillation_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # T = 2: p = softmax((0, ln 3) / 2) = (1, sqrt 3) / (1 + sqrt 3); the loss is scaled by T² = 4.
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    expected_t2 = 4 * ((1 - p1) * math.log(2 * (1 - p1)) + p1 * math.log(2 * p1))
    assert distillation_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-6)
    # Zero when the student already agrees (a shift of the logits changes no probability); batch mean.
    both = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    assert distillation_loss(both + 7.0, both).item() == pytest.approx(0.0, abs=1e-6)
    pair = distillation_loss(torch.cat([student, student]), torch.cat([teacher, torch.zeros(1, 2)]))
    assert pair.item() == pytest.approx(expected / 2, rel=1e-6)


def test_tea_distillation_adds_the_weighted_kl_to_the_teachers_probabilities():
    from auditkit.repair import distillation_loss

    teacher, student, images, batch = tea_pair(seed=3, classes=4, n=5)
    logits, heat_only = TeaObjective(teacher=teacher, distill_weight=0.0).forward_and_loss(student, batch)
    distilling = TeaObjective(teacher=teacher, distill_weight=0.5, temperature=2.0)
    _, with_distillation = distilling.forward_and_loss(student, batch)
    expected = heat_only + 0.5 * distillation_loss(logits, teacher(images), 2.0)
    torch.testing.assert_close(with_distillation, expected, rtol=1e-5, atol=1e-6)
    assert (with_distillation - heat_only).item() > 1e-4  # untrained nets disagree: the term is not zero
