"""Issue 24: the discovery document (discovery.json, schema auditkit.discover/1) is built from typed records
(auditkit/discover/record.py) and follows its JSON schema (auditkit/discover/discovery.schema.json), for a
localised shortcut, for a run whose limits kept every cluster from the test, and from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

import auditkit
from auditkit.cli import app
from auditkit.data import write_dataset
from auditkit.discover import DiscoveryConfig, run_discovery
from auditkit.discover.record import ClusterEntry, LimitEntry, Verdict, as_json
from auditkit.models import save_checkpoint

from .test_discover_29 import FAST, bar_model, bars_dataset

SCHEMA = json.loads((Path(auditkit.__file__).parent / "discover" / "discovery.schema.json").read_text())


@pytest.fixture(scope="module")
def bars():
    return bars_dataset()


def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("settings", [{}, {"max_area": 0.1}, {"propagate": False}], ids=["found", "untested", "boxes"])
def test_documents_follow_the_schema(bars, settings):
    doc = run_discovery(bar_model(), bars, DiscoveryConfig(**settings, **FAST)).data
    jsonschema.validate(json.loads(json.dumps(doc)), SCHEMA)
    assert (doc["propagation"] is None) == (settings != {})


def test_the_cli_document_follows_the_schema(bars, tmp_path):
    checkpoint = save_checkpoint(bar_model(), tmp_path / "bars.safetensors")
    write_dataset(bars, tmp_path / "images")
    result = CliRunner().invoke(app, ["discover", str(checkpoint), "--data", str(tmp_path / "images"), "--quiet",
                                      "--probe-samples", "80", "--out", str(tmp_path / "found")])
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads((tmp_path / "found" / "discovery.json").read_text()), SCHEMA)


def test_records_give_the_json_names():
    verdict = Verdict("shortcut found", "s", "t", True, ["colour"], True, None)
    assert as_json(verdict)["global"] == ["colour"] and "global_signals" not in as_json(verdict)
    limit = LimitEntry("max_clusters", "--max-clusters", 8, "e", False, 0, 0, None, "d", {"classes": 2})
    assert as_json(limit)["classes"] == 2 and "extra" not in as_json(limit)
    entry = as_json(ClusterEntry(3, "3", 0, 10, 1.0, 0.5, 0.1, 0.9, None, True, False, None, None, 0, 0, 0, {}, []))
    assert entry["class"] == 3 and "label" not in entry
