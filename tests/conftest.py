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


# ---- TF32 off (issue 23) --------------------------------------------------------------------------
# On an Ampere or newer GPU, cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa,
# unit roundoff 2^-11 ~ 4.9e-4 against float32's 6e-8): a CUDA conv compared with a float32/float64
# reference at 1e-4 would then fail for the arithmetic, not for a bug. Every test runs with TF32 off;
# a test about reduced precision (bf16, fp16) states its own tolerance. torch >= 2.9 has two views
# of the one setting (the legacy allow_tf32 flags and `fp32_precision`), and reading a legacy flag
# raises once the views disagree: both are set, consistently, and the state is restored through the
# view it was read from.
_FP32_PRECISION_NODES = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul")


def _backend_node(path: str):
    node = torch.backends
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if hasattr(node, "fp32_precision") else None


def _float32_state() -> tuple[str, object]:
    try:
        return "legacy", (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                          torch.get_float32_matmul_precision())
    except RuntimeError:  # the two views disagree (something set fp32_precision alone): keep the new one
        return "fp32_precision", {p: _backend_node(p).fp32_precision for p in _FP32_PRECISION_NODES
                                  if _backend_node(p) is not None}


def _set_float32_state(state: tuple[str, object]) -> None:
    import warnings

    view, values = state
    with warnings.catch_warnings():  # a torch that deprecates one view must not fail a -W error run
        warnings.simplefilter("ignore")
        if view == "legacy":
            matmul, cudnn, precision = values
            torch.backends.cuda.matmul.allow_tf32 = matmul
            torch.backends.cudnn.allow_tf32 = cudnn
            torch.set_float32_matmul_precision(precision)
        else:
            for path, value in values.items():
                _backend_node(path).fp32_precision = value


def disable_tf32() -> None:
    """Full float32 (IEEE) matrix products and convolutions, in both views of the setting."""
    import warnings

    _set_float32_state(("legacy", (False, False, "highest")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in _FP32_PRECISION_NODES:
            node = _backend_node(path)
            if node is not None:
                node.fp32_precision = "ieee"


def tf32_settings() -> dict:
    """What a float32 matmul or convolution may use now: the legacy flags and, where torch has
    them, the `fp32_precision` values (a test asserts on these)."""
    settings_now = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                    "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                    "float32_matmul_precision": torch.get_float32_matmul_precision()}
    for path in _FP32_PRECISION_NODES:
        node = _backend_node(path)
        if node is not None:
            settings_now[f"{path}.fp32_precision"] = node.fp32_precision
    return settings_now


@pytest.fixture(autouse=True)
def _float32_without_tf32():
    """TF32 off for every test (function scope: a test that turns it on cannot leak into the next);
    the process's own setting comes back afterwards."""
    saved = _float32_state()
    disable_tf32()
    yield
    _set_float32_state(saved)


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
