"""Shared test settings: explicit seeds, hypothesis profile, device parametrisation."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic example generation: the same examples on every run and machine.
settings.register_profile(
    "auditkit",
    derandomize=True,
    deadline=None,
    max_examples=int(os.environ.get("AUDITKIT_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("auditkit")

# "auto" means the CPU in the tests, on any machine: their numbers must not depend on whether a
# GPU is present. Tests of the GPU paths name their device (marked `cuda`).
os.environ["AUDITKIT_DEVICE"] = "cpu"

CUDA_SKIP_REASON = "no CUDA GPU on this machine (CUDA kernels are compiled but cannot run here)"

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)],
    ),
]


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def decoy_mnist_models(tmp_path_factory):
    """The shortcut model and the clean-trained control on the built-in decoy MNIST, trained with
    `auditkit train` exactly as a user would (6 epochs each, seed 0; ~10 s each on 2 cores).
    Returns {"shortcut": (path, test accuracies), "clean": (...)}."""
    import json

    from typer.testing import CliRunner

    from auditkit.cli import app

    folder = tmp_path_factory.mktemp("decoy-mnist-models")
    models = {}
    for name, variant in (("shortcut", "contaminated"), ("clean", "clean")):
        path = folder / f"{name}.safetensors"
        result = CliRunner().invoke(
            app,
            ["train", "--data", "builtin:decoy-mnist", "--arch", "tap-cnn", "--variant", variant, "--out", str(path),
             "--seed", "0", "--quiet", "--json", "-"],
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.output[result.output.index("{"):])
        models[name] = (path, {k: v["accuracy"] for k, v in report["test"].items()})
    return models


def train_digits_model(variant: str = "contaminated", epochs: int = 1):
    """A tap-cnn trained on the 8x8 decoy digits (seed 0): fast models for audit, explain and repair tests."""
    from auditkit.data import open_dataset
    from auditkit.training import TrainConfig, train_model

    dataset = open_dataset("builtin:decoy-digits")
    return train_model(dataset, "tap-cnn", TrainConfig(epochs=epochs), variant=variant, val_split=None).model


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
    """A one-epoch decoy-digits shortcut model, saved once per session (shared by the audit, explain and
    repair tests)."""
    from auditkit.models import save_checkpoint

    return save_checkpoint(train_digits_model(), tmp_path_factory.mktemp("digits") / "digits.safetensors")
