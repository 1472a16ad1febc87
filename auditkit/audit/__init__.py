"""Auditing a checkpoint for shortcut reliance.

    report = run_audit(model, dataset, AuditConfig(methods=("gradcam", "lrp_epsilon")))
    report.verdict            # "reliant" | "not reliant" | "inconclusive"
    report.data               # the JSON document (schema: auditkit/audit/report.schema.json)
    write_html(report.data, "audit.html")      # renders from the JSON alone (auditkit report does too)

See docs/audit.md for what is measured, the verdict rules and the report schema.
"""

from __future__ import annotations

from .html import render_comparison_html, render_html, write_html
from .runner import SCHEMA, AuditConfig, AuditReport, run_audit
from .summary import print_summary
from .verdict import INCONCLUSIVE, NOT_RELIANT, RELIANT, Thresholds

__all__ = [
    "INCONCLUSIVE",
    "NOT_RELIANT",
    "RELIANT",
    "SCHEMA",
    "AuditConfig",
    "AuditReport",
    "Thresholds",
    "print_summary",
    "render_comparison_html",
    "render_html",
    "run_audit",
    "write_html",
]
