"""`auditkit reproduce`: the table layout (mean ± std beside the paper) and bad input. The runs
themselves take minutes per seed and belong to the reproduction commands, not the unit suite."""

from __future__ import annotations

from types import SimpleNamespace

from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.reproduce import Reproduction, markdown

from .test_cli_data_train import error_line


def test_markdown_gives_mean_and_std_over_seeds_beside_the_published_numbers():
    result = Reproduction("table9", [0, 1])
    for accuracy in (0.90, 0.94):
        result.add("TAP", {"contaminated": SimpleNamespace(accuracy=accuracy),
                           "permuted": SimpleNamespace(accuracy=accuracy - 0.1)})
    table = markdown(result)
    row = next(line for line in table.splitlines() if line.startswith("| TAP |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # mean 0.92, sample std 0.0283; TAP Table 9 publishes 0.983 (0.001) contaminated
    assert cells[1:5] == ["0.920 ± 0.028", "0.983 ± 0.001", "0.820 ± 0.028", "0.979 ± 0.002"]
    assert cells[5] == "–"  # no clean accuracy measured
    assert "seeds [0, 1]" in table


def test_extra_numbers_get_their_own_table():
    result = Reproduction("table12", [0])
    result.add("random τ=0.1", {"contaminated": SimpleNamespace(accuracy=0.5)},
               {"annotation recall": 0.25, "mask area": None})
    table = markdown(result)
    assert "| case | annotation recall |" in table and "| random τ=0.1 | 0.250 ± 0.000 |" in table


def test_unknown_reproduction_and_bad_seed_count_are_one_line_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["reproduce", "table99", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown reproduction 'table99'" in error_line(result)
    result = runner.invoke(app, ["reproduce", "table9", "--seeds", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--seeds must be at least 1" in error_line(result)
    result = runner.invoke(app, ["reproduce", "table9", "--first-seed", "-1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--first-seed must be at least 0" in error_line(result)
