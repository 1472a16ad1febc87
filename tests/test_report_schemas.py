"""The JSON schemas of the documents auditkit writes: each is a valid schema, and the repair document
(auditkit/repair/report.schema.json) holds what runs write. The documents of real runs are validated
where the tests make them (test_repair.py, test_repair_proof.py: `validate_repair_document`); the
audit document's own checks are in test_audit.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

import auditkit

PACKAGE = Path(auditkit.__file__).parent
AUDIT_SCHEMA = json.loads((PACKAGE / "audit" / "report.schema.json").read_text())
REPAIR_SCHEMA = json.loads((PACKAGE / "repair" / "report.schema.json").read_text())


def validate_repair_document(document: dict) -> None:
    """``document`` follows the repair schema, and its two audits (when they ran) the audit schema."""
    jsonschema.validate(document, REPAIR_SCHEMA)
    for key in ("before_audit", "after_audit"):
        if document[key] is not None:
            jsonschema.validate(document[key], AUDIT_SCHEMA)


def _minimal_repair_document() -> dict:
    """A repair document as run_repair writes it with --audit-split none (no audits ran)."""
    side = {"verdict": None, "metric": None}
    return {
        "schema": "auditkit.repair/1", "auditkit_version": auditkit.__version__, "created": "2026-01-01T00:00:00+0000",
        "method": "tap", "method_summary": "penalise activations inside the mask", "options": {"kernel_size": 3},
        "training": {"epochs": 1, "batch_size": 64, "lr": 0.001, "seed": 0, "device": "cpu", "precision": "fp32"},
        "data_fingerprint": "abc", "teacher": None, "seconds": 1.5, "lambda": 0.1,
        "history": [{"epoch": 1, "task_loss": 0.3, "explanation_loss": 0.1, "accuracy": 0.9, "val_accuracy": None}],
        "sweep": [], "annotation": None, "before": side, "after": dict(side),
        "before_audit": None, "after_audit": None,
    }


@pytest.mark.parametrize("schema", [AUDIT_SCHEMA, REPAIR_SCHEMA], ids=["audit", "repair"])
def test_every_schema_is_a_valid_draft_2020_12_schema(schema):
    jsonschema.Draft202012Validator.check_schema(schema)


def test_the_repair_schema_takes_a_document_without_audits_and_refuses_broken_ones():
    document = _minimal_repair_document()
    validate_repair_document(document)
    for broken in ({"schema": "auditkit.repair/2"}, {"lambda": "auto"},
                   {"before": {"verdict": "maybe", "metric": None}},
                   {"after_audit": {"schema": "auditkit.discover/1"}}):
        with pytest.raises(jsonschema.ValidationError):
            validate_repair_document({**copy.deepcopy(document), **broken})
    del document["history"]
    with pytest.raises(jsonschema.ValidationError, match="'history' is a required property"):
        validate_repair_document(document)


def test_the_repair_schema_is_shipped_with_the_package():
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert '"repair/*.json"' in pyproject  # package-data: an installed auditkit carries its schemas
