"""`auditkit report`: render an audit report, or a before/after pair, from JSON alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import ForceOption, handles_errors


def _audits(path: Path) -> tuple[list[dict], str | None]:
    """The audit reports in a JSON file: one (auditkit.audit/1), or a repair's two (auditkit.repair/1),
    with the title a repair gives its page."""
    from ..errors import AuditkitError

    if not path.is_file():
        raise AuditkitError(f"{path}: no such file")
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AuditkitError(f"{path}: not a JSON file ({error})") from error
    schema = document.get("schema") if isinstance(document, dict) else None
    if schema in ("auditkit.audit/1", "auditkit.discover/1"):
        return [document], None
    if schema == "auditkit.repair/1":
        audits = [document.get("before_audit"), document.get("after_audit")]
        if any(a is None for a in audits):
            raise AuditkitError(f"{path}: this repair ran without audits (--audit-split none): nothing to show")
        return audits, f"Repair with {document.get('method', '?')}"
    raise AuditkitError(f"{path}: not an auditkit report (schema {schema!r}; expected auditkit.audit/1, "
                        "auditkit.repair/1 or auditkit.discover/1)")


@handles_errors
def report(
    first: Annotated[Path, typer.Argument(help="An audit report (report.json) or a repair's OUT.audit.json.")],
    second: Annotated[Optional[Path], typer.Argument(
        help="A second audit report: shown as 'after' beside the first.")] = None,
    out: Annotated[Path, typer.Option("--out", help="The HTML page to write.")] = Path("report.html"),
    title: Annotated[
        Optional[str],
        typer.Option(help="Title of a before/after page (default: the repair's method, or 'Comparison')."),
    ] = None,
    force: ForceOption = False,
) -> None:
    """Render a report page from JSON alone: no model, data or GPU needed.

    One audit report gives its page; two, or a repair's OUT.audit.json, give the before/after page;
    a discovery (discovery.json) gives its own page.

    Example: auditkit report before.json after.json --out page.html
    """
    from .._io import atomic_write_text
    from ..audit import render_comparison_html, render_html
    from ..errors import AuditkitError

    audits, named = _audits(first)
    if second is not None:
        audits += _audits(second)[0]
    if len(audits) > 2:
        raise AuditkitError("give one report, two reports, or one repair document")
    if any(a.get("schema") == "auditkit.discover/1" for a in audits) and len(audits) > 1:
        raise AuditkitError("a discovery is shown alone: give its discovery.json without a second report")
    if out.exists() and not force:
        raise AuditkitError(f"{out} already exists; choose another --out or pass --force to replace it")
    title = title or named or "Comparison"
    if audits[0].get("schema") == "auditkit.discover/1":
        from ..discover.html import render_discovery_html

        page = render_discovery_html(audits[0])
    else:
        page = render_html(audits[0]) if len(audits) == 1 else render_comparison_html(audits[0], audits[1], title)
    atomic_write_text(out, page, overwrite=True)
    typer.echo(f"report: {out}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
