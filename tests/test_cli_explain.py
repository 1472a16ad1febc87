"""`auditkit explain` on dataset samples and on image files; bad input."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from auditkit.cli import app

from .test_cli_data_train import error_line

runner = CliRunner()


@pytest.fixture
def checkpoint(digits_checkpoint):
    return digits_checkpoint


@pytest.mark.parametrize("method", ["lrp_epsilon", "gradcam", "gradient", "input_x_gradient", "integrated_gradients"])
def test_explain_dataset_samples(checkpoint, tmp_path, method):
    out = tmp_path / "heat"
    result = runner.invoke(
        app,
        ["explain", str(checkpoint), "--data", "builtin:decoy-digits", "--n", "6", "--method", method, "--steps", "4",
         "--out", str(out), "--save-maps", "--json", "-"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert len(report["images"]) == 6 and (out / "grid.png").is_file() and (out / "heatmaps.npz").is_file()
    picture = cv2.imread(report["images"][0]["file"])
    assert picture is not None and picture.shape[1] == 2 * picture.shape[0]  # image | overlay
    assert np.load(out / "heatmaps.npz")["maps"].shape == (6, 8, 8)


def test_explain_image_files_with_a_class_target(checkpoint, tmp_path):
    files = []
    for k in range(2):
        path = tmp_path / f"digit{k}.png"
        cv2.imwrite(str(path), np.random.default_rng(k).integers(0, 255, (16, 16), dtype=np.uint8))
        files.append(str(path))
    result = runner.invoke(app, ["explain", str(checkpoint), *files, "--target", "3", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["digit0.png", "digit1.png", "grid.png"]


def test_explain_bad_input(checkpoint, tmp_path):
    def fails(*args):
        return error_line(runner.invoke(app, ["explain", str(checkpoint), *map(str, args)]))

    assert "one of the two" in fails("--out", tmp_path / "a")
    assert "--method must be one of" in fails("--data", "builtin:decoy-digits", "--method", "shap", "--out",
                                              tmp_path / "b")
    assert "no such image file" in fails(tmp_path / "missing.png", "--out", tmp_path / "c")
    assert "neither pred, label nor one of the classes" in fails("--data", "builtin:decoy-digits", "--target", "cat",
                                                                 "--out", tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("mine")
    assert "not empty" in fails("--data", "builtin:decoy-digits", "--out", tmp_path / "e")
    assert (tmp_path / "e" / "keep.txt").read_text() == "mine"
