"""Issue 28, item 4: one teacher recipe (auditkit/repair/teacher.py ``TEACHER_RECIPE``) for every teacher the
project trains itself; ``--method auto`` trains it when the data has a decorrelated variant and no teacher
is given, and says in one line what TEA needs when it cannot. Tiny data: 8x8 decoy digits, a few hundred."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from auditkit.data import AuditDataset, open_dataset
from auditkit.errors import ParameterError
from auditkit.repair import METHODS, AutoConfig, RepairConfig, run_auto_repair, run_repair
from auditkit.repair.teacher import TEA_NEEDS, TEACHER_RECIPE, teacher_variant, train_teacher
from auditkit.training import TrainConfig

from .conftest import train_digits_model

PER_SPLIT = {"train": 200, "val": 60, "test": 60}  # images per split and variant


def _tiny(variants=("contaminated", "permuted", "clean")) -> AuditDataset:
    data = open_dataset("builtin:decoy-digits")
    seen: Counter = Counter()
    records = []
    for record in data.records:
        key = (record.split, record.variant)
        if record.variant in variants and seen[key] < PER_SPLIT[record.split]:
            seen[key] += 1
            records.append(record)
    return AuditDataset(records, data.info, channels=data.channels, image_size=data.image_size)


def _one_epoch(spec) -> TrainConfig:
    # The repair itself is not what is tested: one epoch of TEA's own settings keeps the test short.
    return TrainConfig(**{"data_order": "permutation", **spec.training, "epochs": 1}, seed=0)


def test_the_recipe_trains_on_the_decorrelated_variant():
    data = _tiny()
    assert teacher_variant(data) == "permuted"  # the artefact is there but cannot teach the label
    assert teacher_variant(_tiny(("contaminated", "clean"))) == "clean"
    assert teacher_variant(_tiny(("contaminated",))) is None
    assert TEACHER_RECIPE.fraction == 0.1 and TEACHER_RECIPE.channel_shuffle  # colour-blind on coloured data
    assert "--channel-shuffle" in TEACHER_RECIPE.command() and "--variant permuted" in TEACHER_RECIPE.command()


def test_auto_with_a_clean_split_trains_the_recipes_teacher_for_tea():
    data, student = _tiny(), train_digits_model()
    result = run_auto_repair(copy.deepcopy(student), data, RepairConfig(audit=None), AutoConfig(order=("tea",)),
                             training_for=_one_epoch, show_progress=False)
    attempt = result.document["attempts"][0]
    assert attempt["method"] == "tea" and "skipped" not in attempt
    assert attempt["teacher"]["source"] == "trained" and attempt["teacher"]["variant"] == "permuted"
    assert attempt["teacher"]["recipe"] == TEACHER_RECIPE.as_dict()
    # Behaviour, not bookkeeping: the same TEA repair with the recipe's teacher, trained by hand, gives the
    # same weights, so auto's teacher is that teacher.
    teacher = train_teacher(data, student.meta.arch, seed=0)
    by_hand = run_repair(copy.deepcopy(student), data, RepairConfig(method="tea", teacher=teacher, audit=None,
                                                                    training=_one_epoch(METHODS["tea"])),
                         show_progress=False)
    for name, value in by_hand.model.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[name]), name


def test_auto_given_a_teacher_uses_it_and_does_not_train_one():
    data, student = _tiny(), train_digits_model()
    given = train_digits_model("clean")
    result = run_auto_repair(copy.deepcopy(student), data, RepairConfig(audit=None, teacher=given),
                             AutoConfig(order=("tea",)), training_for=_one_epoch, show_progress=False)
    assert result.document["attempts"][0]["teacher"]["source"] == "given"


def test_auto_without_a_clean_split_says_what_tea_needs():
    data, student = _tiny(("contaminated",)), train_digits_model()
    with pytest.raises(ParameterError) as caught:
        run_auto_repair(copy.deepcopy(student), data, RepairConfig(audit=None), AutoConfig(order=("tea",)),
                        training_for=_one_epoch, show_progress=False)
    assert TEA_NEEDS in str(caught.value)
