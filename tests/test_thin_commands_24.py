"""Thin commands and one source of truth per parameter: the library does the work the commands
print (repair_checkpoint, explain_samples, audit_checkpoint, train_checkpoint, run_demo); the
device is resolved once per run; the LRP-epsilon defaults and auto's order are defined once."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import auditkit
import auditkit.device as device_module
from auditkit.device import resolve_device
from auditkit.explain.defaults import EPSILON_AUDIT, EPSILON_EXPLAIN

PACKAGE = Path(auditkit.__file__).parent


def test_every_command_function_is_thin():
    # A command parses, calls one library function and prints: no body over 60 lines.
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                body = (node.body[1:] if ast.get_docstring(node) else node.body) or node.body
                lines = node.end_lineno - body[0].lineno + 1
                assert lines <= 60, f"{path.name}:{node.name} has a {lines}-line body"


@pytest.mark.parametrize("module", ["repair/checkpoint.py", "explanations.py", "discover/fallback.py",
                                    "training/checkpoint.py", "demo.py", "models/loading.py"])
def test_the_library_functions_do_not_import_the_command_line(module):
    tree = ast.parse((PACKAGE / module).read_text())
    names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(name == "cli" or name.startswith("cli.") for name in names), names


def test_auto_order_is_held_by_the_method_specs():
    from auditkit.repair import AUTO_ORDER, METHODS, AutoConfig

    ranked = sorted((spec.auto_rank, name) for name, spec in METHODS.items() if spec.auto_rank is not None)
    assert AUTO_ORDER == tuple(name for _, name in ranked) == ("tap", "rrr", "tea", "energy", "masktune")
    assert AutoConfig().order == AUTO_ORDER
    assert list(METHODS) == ["tap", "rrr", "energy", "tea", "masktune"]  # the listing order is each spec's rank


def test_epsilon_defaults_come_from_explain_defaults():
    from auditkit.audit import AuditConfig
    from auditkit.discover import DiscoveryConfig
    from auditkit.explanations import SampleExplanation
    from auditkit.repair.methods.tea import TeaObjective, TeaOptions

    assert AuditConfig().epsilon == DiscoveryConfig().epsilon == TeaOptions().epsilon == EPSILON_AUDIT
    assert TeaObjective(teacher=torch.nn.Identity()).epsilon == EPSILON_AUDIT
    assert SampleExplanation(Path("m.pt"), Path("out")).method_options() == {"epsilon": EPSILON_EXPLAIN}


def test_a_resolved_device_passes_through_unparsed(monkeypatch):
    calls = []
    parse = device_module._parse
    monkeypatch.setattr(device_module, "_parse", lambda name: calls.append(name) or parse(name))
    device = resolve_device("auto")
    assert isinstance(device, torch.device) and calls == ["auto"]
    assert resolve_device(device) is device and calls == ["auto"]


def test_train_config_records_the_device_by_name():
    from auditkit.training import TrainConfig

    record = TrainConfig(device=torch.device("cpu")).as_dict()
    assert record["device"] == "cpu" and list(record) == [f.name for f in dataclasses.fields(TrainConfig)]


def test_repair_checkpoint_resolves_the_device_once(digits_checkpoint, tmp_path, monkeypatch):
    from auditkit.repair.checkpoint import CheckpointRepair, repair_checkpoint

    calls = []
    parse = device_module._parse
    monkeypatch.setattr(device_module, "_parse", lambda name: calls.append(name) or parse(name))
    started = []
    done = repair_checkpoint(
        CheckpointRepair(digits_checkpoint, "builtin:decoy-digits", tmp_path / "r.safetensors", method="rrr",
                         training={"epochs": 1}, audit_split="none"),
        show_progress=False, on_start=lambda device, precision: started.append((device, precision)))
    assert calls == ["auto"], calls  # parsed once; everything below took the torch.device
    assert started == [(done.device, done.precision)] and isinstance(done.device, torch.device)
    assert done.path.is_file() and (tmp_path / "r.safetensors.audit.json").is_file()
    assert done.document["training"]["device"] == str(done.device) and not done.still_reliant


def test_repair_checkpoint_refuses_in_library_terms(digits_checkpoint, tmp_path):
    from auditkit.errors import ParameterError
    from auditkit.repair.checkpoint import CheckpointRepair, repair_checkpoint

    with pytest.raises(ParameterError, match="`out` is the input checkpoint"):
        repair_checkpoint(CheckpointRepair(digits_checkpoint, "builtin:decoy-digits", digits_checkpoint))
    with pytest.raises(ParameterError, match="`lam` cannot be given with method 'auto'"):
        repair_checkpoint(CheckpointRepair(digits_checkpoint, "builtin:decoy-digits", tmp_path / "a.pt",
                                           method="auto", lam=0.1))
    with pytest.raises(ParameterError, match="`method` must be one of tap, rrr, energy, tea, masktune or auto"):
        repair_checkpoint(CheckpointRepair(digits_checkpoint, "builtin:decoy-digits", tmp_path / "b.pt", method="x"))


def test_explain_samples_returns_rows_and_writes_pictures(digits_checkpoint, tmp_path):
    from auditkit.explanations import SampleExplanation, explain_samples

    done = explain_samples(SampleExplanation(digits_checkpoint, tmp_path / "heat", data="builtin:decoy-digits", n=3,
                                             target="label", save_maps=True))
    assert [row["name"] for row in done.rows] == ["test-0", *[r["name"] for r in done.rows[1:]]]
    assert len(done.rows) == 3 and done.grid.is_file() and done.maps.is_file()
    assert all(row["explained_class"] == row["label"] for row in done.rows)
    assert isinstance(done.device, torch.device)


def test_audit_checkpoint_audits_data_with_variants(digits_checkpoint, tmp_path):
    from auditkit.audit import AuditConfig
    from auditkit.discover.fallback import CheckpointAudit, audit_checkpoint

    done = audit_checkpoint(CheckpointAudit(digits_checkpoint, "builtin:decoy-digits", report_dir=tmp_path,
                                            config=AuditConfig(methods=(), bootstrap=50, examples=0)))
    assert done.kind == "audit" and done.report_files == (tmp_path / "report.json", tmp_path / "report.html")
    assert done.data["config"]["device"] == "cpu" and done.data["config"]["epsilon"] == EPSILON_AUDIT
    assert done.exit_code(False) == 0
