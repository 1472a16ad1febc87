"""The command line: help, version, doctor (human and JSON output)."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from auditkit import __version__
from auditkit.cli import app

runner = CliRunner()


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert "Usage" in result.output and "doctor" in result.output


def test_every_command_help_has_an_example():
    for args in ([], ["doctor"]):
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, result.output
        assert "Example:" in result.output


def test_version_names_the_live_kernels():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert f"auditkit {__version__}" in result.output
    assert "kernels: CPU" in result.output


def test_doctor_json_to_stdout_is_machine_readable():
    result = runner.invoke(app, ["doctor", "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["auditkit"] == __version__
    assert report["kernels"]["cpu"]["backend"] in ("compiled", "reference")
    assert all(test["ok"] for test in report["self_test"])


def test_doctor_writes_json_file_and_prints_summary(tmp_path):
    target = tmp_path / "doctor.json"
    result = runner.invoke(app, ["doctor", "--json", str(target)])
    assert result.exit_code == 0, result.output
    assert "self-test on cpu: ok" in result.output
    assert json.loads(target.read_text())["extension"]["reason"]


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "auditkit", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout
