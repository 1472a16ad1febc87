"""Loading: the compiled kernels when they are there, the reference otherwise, same numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import auditkit
from auditkit import ops
from auditkit.ops._library import SCHEMAS

PACKAGE_DIR = Path(auditkit.__file__).parent

# Computes penalties and gradients on seeded inputs and reports how the ops
# were served; run in a fresh interpreter so loading starts from scratch.
PROBE = textwrap.dedent(
    """
    import json, warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from auditkit import ops
        import auditkit.ops  # a second import must not warn again
    torch.manual_seed(7)
    a = torch.randn(3, 5, 9, 11, requires_grad=True)
    b = torch.randn(3, 8, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    mask = (torch.rand(3, 1, 37, 45) > 0.6).float()
    loss = ops.tap_loss([a, b], mask)
    loss.backward()
    from auditkit.explain import attribute
    from auditkit.models import build_model
    torch.manual_seed(3)
    model = build_model("resnet18", num_classes=4, in_channels=1, input_size=(32, 32)).eval()
    heatmap = attribute(model, torch.rand(2, 1, 32, 32), torch.tensor([[0, 3], [2, 1]]), "lrp_epsilon", epsilon=0.01)
    status = ops.extension_status()
    print(json.dumps({
        "module": auditkit.ops.__file__,
        "loaded": status.loaded,
        "reason": status.reason,
        "warnings": [str(w.message) for w in caught if w.category.__name__ == "ReferenceFallbackWarning"],
        "loss": loss.item(),
        "penalty": ops.tap_penalty(a, mask).tolist(),
        "grad_a": a.grad.flatten().tolist(),
        "grad_b": b.grad.flatten().tolist(),
        "lrp": heatmap.flatten().tolist(),
    }))
    """
)


def run_probe(env_extra=None, pythonpath=None):
    env = dict(os.environ)
    env.pop("AUDITKIT_DISABLE_EXTENSION", None)
    env.update(env_extra or {})
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=False, cwd=pythonpath or None
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_same_numbers(left, right):
    for key in ("penalty", "grad_a", "grad_b"):
        torch.testing.assert_close(torch.tensor(left[key]), torch.tensor(right[key]), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(left["lrp"]), torch.tensor(right["lrp"]), rtol=1e-4, atol=1e-7)
    assert left["loss"] == pytest.approx(right["loss"], rel=2e-6)


@pytest.fixture(scope="module")
def compiled_run():
    if not ops.extension_status().loaded:
        pytest.skip(f"the compiled extension is not loaded here: {ops.extension_status().reason}")
    result = run_probe()
    assert result["loaded"] and result["warnings"] == []
    return result


def test_fallback_gives_the_same_numbers_and_warns_once(compiled_run):
    fallback = run_probe({"AUDITKIT_DISABLE_EXTENSION": "1"})
    assert not fallback["loaded"]
    assert len(fallback["warnings"]) == 1 and "AUDITKIT_DISABLE_EXTENSION" in fallback["warnings"][0]
    assert_same_numbers(compiled_run, fallback)


def copy_package(tmp_path: Path) -> Path:
    target = tmp_path / "auditkit"
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    return target


def test_package_without_the_extension_runs_on_the_reference(compiled_run, tmp_path):
    copy_package(tmp_path)
    result = run_probe(pythonpath=tmp_path)
    assert result["module"].startswith(str(tmp_path)), "the probe must import the copy"
    assert not result["loaded"] and "not built" in result["reason"]
    assert len(result["warnings"]) == 1
    assert_same_numbers(compiled_run, result)


def test_broken_extension_falls_back_with_a_reason(compiled_run, tmp_path):
    target = copy_package(tmp_path)
    library = next(PACKAGE_DIR.glob("_C*.so"))
    (target / library.name).write_bytes(b"\x7fELF but not really a shared object")
    result = run_probe(pythonpath=tmp_path)
    assert not result["loaded"] and "failed to load" in result["reason"]
    assert_same_numbers(compiled_run, result)


def test_fallback_schemas_equal_the_compiled_ones():
    if not ops.extension_status().loaded:
        pytest.skip("the compiled extension is not loaded here")
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.auditkit, name).default._schema) == f"auditkit::{schema}"


def test_status_reports_cuda_kernels_and_why():
    status = ops.extension_status()
    assert status.cpu_backend in ("compiled", "reference")
    assert status.cuda_backend in ("compiled", "reference")
    assert status.cuda_reason
    if status.loaded:
        assert status.build_info["torch"] == torch.__version__.split("+")[0]
