"""Issue 29, kind 1: masks as people save them, and mask repairs that refuse empty masks.

0/1 masks (``(mask > 0).astype(np.uint8)`` to PNG or .npz, the most common way) were read on a
0-255 scale: every mask became ~0.004, empty in all but name. One reader (auditkit.data.masks)
now decides each mask's encoding from its values; TAP, RRR and Energy refuse all-empty masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.data import AuditDataset, DatasetInfo, Record, open_dataset, to_uint8
from auditkit.data.masks import LABEL_MAP_MAX_VALUES, MASK_RULE, decode_source, read_mask
from auditkit.errors import DataError
from auditkit.models import load_checkpoint
from auditkit.repair import RepairConfig
from auditkit.repair.runner import check_data, has_annotated_masks, training_data
from auditkit.repair.teacher import AnnotationConfig
from auditkit.training import TrainConfig

from .test_cli_data_train import error_line

runner = CliRunner()


def binary_mask(height=24, width=32) -> np.ndarray:
    """A bool mask: a 6x8 patch and a thin 1x20 line (edges JPEG must keep)."""
    mask = np.zeros((height, width), bool)
    mask[3:9, 4:12] = True
    mask[18, 6:26] = True
    return mask


def one_line_error(call) -> str:
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message
    return message


# ---- files --------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, dtype, suffix, encoding", [
    (1, np.uint8, ".png", "0/1"),            # (mask > 0).astype(np.uint8): the common way, the bug
    (255, np.uint8, ".png", "0/255"),
    (1, np.uint16, ".png", "0/1"),
    (65535, np.uint16, ".png", "0/65535"),
    (1, np.uint8, ".bmp", "0/1"),
    (255, np.uint8, ".tif", "0/255"),
    (1, np.uint16, ".tiff", "0/1"),
])
def test_binary_mask_files_read_back_exactly(tmp_path, scale, dtype, suffix, encoding):
    mask = binary_mask()
    path = tmp_path / f"m{suffix}"
    assert cv2.imwrite(str(path), mask.astype(dtype) * dtype(scale))
    reading = decode_source(path, "test")
    assert reading.encoding == encoding
    assert reading.pixels.dtype == np.float32 and reading.pixels.shape == mask.shape
    np.testing.assert_array_equal(reading.pixels, mask.astype(np.float32))


def test_a_one_bit_png_from_pillow_reads_as_binary(tmp_path):
    mask = binary_mask()
    Image.fromarray(mask).save(tmp_path / "m.png")  # mode "1"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", "test"), mask.astype(np.float32))


def test_palette_png_is_read_by_its_indices_not_its_colours(tmp_path):
    labels = np.zeros((16, 16), np.uint8)
    labels[2:6, 2:6], labels[10:12, 3:15] = 1, 2
    image = Image.fromarray(labels, mode="P")
    # Index 0 is drawn white: read by colour, every pixel would be "annotated".
    image.putpalette([255, 255, 255, 200, 0, 0, 0, 0, 200] + [0] * (256 * 3 - 9))
    image.save(tmp_path / "p.png")
    reading = decode_source(tmp_path / "p.png", "test")
    assert reading.encoding == "label map"
    np.testing.assert_array_equal(reading.pixels, (labels > 0).astype(np.float32))


def test_soft_eight_bit_mask_stays_soft(tmp_path):
    soft = np.tile(np.arange(256, dtype=np.uint8), (4, 1))  # 0..255: many values reaching 255
    cv2.imwrite(str(tmp_path / "s.png"), soft)
    reading = decode_source(tmp_path / "s.png", "test")
    assert reading.encoding == "soft/255"
    np.testing.assert_allclose(reading.pixels, soft / np.float32(255), atol=1e-7)


def test_float_tiff_soft_mask_is_unchanged(tmp_path):
    soft = np.linspace(0, 1, 12 * 10, dtype=np.float32).reshape(12, 10)
    cv2.imwrite(str(tmp_path / "f.tiff"), soft)
    np.testing.assert_array_equal(read_mask(tmp_path / "f.tiff", "test"), soft)


@pytest.mark.parametrize("quality", [90, 75])
def test_jpeg_binary_mask_is_thresholded_at_half_scale(tmp_path, quality):
    mask = binary_mask()
    path = tmp_path / "m.png"  # a JPEG whatever its name says: found by its bytes
    ok, encoded = cv2.imencode(".jpg", mask.astype(np.uint8) * 255, [cv2.IMWRITE_JPEG_QUALITY, quality])
    path.write_bytes(encoded.tobytes())
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert len(np.unique(raw)) > 2  # compression noise is there
    reading = decode_source(path, "test")
    assert reading.encoding == "lossy"
    np.testing.assert_array_equal(reading.pixels, mask.astype(np.float32))


def test_webp_lossy_is_thresholded_and_lossless_is_exact(tmp_path):
    mask = binary_mask()
    for quality, encoding in ((80, "lossy"), (101, "0/1")):  # 101: OpenCV's lossless WebP
        ok, encoded = cv2.imencode(".webp", mask.astype(np.uint8) * (255 if quality <= 100 else 1),
                                   [cv2.IMWRITE_WEBP_QUALITY, quality])
        (tmp_path / f"{quality}.webp").write_bytes(encoded.tobytes())
        reading = decode_source(tmp_path / f"{quality}.webp", "test")
        assert reading.encoding == encoding
        np.testing.assert_array_equal(reading.pixels, mask.astype(np.float32))


def test_jpeg_of_a_zero_one_mask_is_refused(tmp_path):
    cv2.imwrite(str(tmp_path / "m.jpg"), binary_mask().astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    message = one_line_error(lambda: read_mask(tmp_path / "m.jpg", "test"))
    assert "lossy" in message and "PNG" in message


def test_empty_jpeg_mask_is_empty(tmp_path):
    cv2.imwrite(str(tmp_path / "e.jpg"), np.zeros((8, 8), np.uint8))
    assert read_mask(tmp_path / "e.jpg", "test").max() == 0


def test_colour_masks(tmp_path):
    mask = binary_mask()
    red = np.zeros((*mask.shape, 3), np.uint8)
    red[mask, 2] = 255  # BGR: red
    red[mask & (np.arange(mask.shape[1]) < 8), 1] = 90  # another colour on part of it (a colour label map)
    cv2.imwrite(str(tmp_path / "rgb.png"), red)
    reading = decode_source(tmp_path / "rgb.png", "test")
    assert reading.encoding == "colour"
    np.testing.assert_array_equal(reading.pixels, mask.astype(np.float32))
    # Grey saved as RGB: the grey rule (0/1 here).
    cv2.imwrite(str(tmp_path / "grey3.png"), np.repeat(mask.astype(np.uint8)[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(read_mask(tmp_path / "grey3.png", "test"), mask.astype(np.float32))
    # A transparent overlay: constant colour, the alpha draws the mask.
    overlay = np.zeros((*mask.shape, 4), np.uint8)
    overlay[..., 3] = mask * 255
    cv2.imwrite(str(tmp_path / "rgba.png"), overlay)
    np.testing.assert_array_equal(read_mask(tmp_path / "rgba.png", "test"), mask.astype(np.float32))
    # A coloured JPEG: any channel at least half the scale.
    cv2.imwrite(str(tmp_path / "rgb.jpg"), red, [cv2.IMWRITE_JPEG_QUALITY, 95])
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.jpg", "test"), mask.astype(np.float32))


def test_missing_and_undecodable_files_are_one_line(tmp_path):
    assert "no such mask file" in one_line_error(lambda: read_mask(tmp_path / "nope.png", "test"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert "not a readable image" in one_line_error(lambda: read_mask(tmp_path / "junk.png", "test"))


# ---- arrays -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.uint32])
def test_zero_one_integer_arrays_of_any_type(dtype):
    mask = binary_mask()
    reading = decode_source(mask.astype(dtype), "test")
    assert reading.encoding == "0/1"
    np.testing.assert_array_equal(reading.pixels, mask.astype(np.float32))


def test_bool_and_zero_255_arrays():
    mask = binary_mask()
    assert decode_source(mask, "test").encoding == "bool"
    np.testing.assert_array_equal(read_mask(mask, "test"), mask.astype(np.float32))
    for dtype in (np.uint8, np.int64, np.uint16):
        np.testing.assert_array_equal(read_mask(mask.astype(dtype) * 255, "test"), mask.astype(np.float32))


def test_float_soft_masks_unchanged_and_float_binary():
    soft = np.random.default_rng(0).random((9, 7))
    np.testing.assert_array_equal(read_mask(soft, "test"), soft.astype(np.float32))
    half = soft.astype(np.float16)
    np.testing.assert_array_equal(read_mask(half, "test"), half.astype(np.float32))
    binary = binary_mask().astype(np.float64)
    np.testing.assert_array_equal(read_mask(binary, "test"), binary.astype(np.float32))


@pytest.mark.parametrize("values", [(3, 7), (2,), (1, 2, 3), (5, 64), (1, 17, 40)])
def test_label_maps_become_binary(values):
    rng = np.random.default_rng(1)
    labels = np.zeros((20, 20), np.int64)
    where = rng.random((20, 20)) < 0.3
    labels[where] = rng.choice(values, size=int(where.sum()))
    dtype = np.uint16 if max(values) > 255 else np.uint8
    reading = decode_source(labels.astype(dtype), "test")
    assert reading.encoding == "label map"
    np.testing.assert_array_equal(reading.pixels, where.astype(np.float32))


@pytest.mark.parametrize("values", [(20, 100), (5, 250), (100, 200), (1000, 2000, 40000)])
def test_few_levels_between_ids_and_full_scale_are_refused_naming_both_readings(values):
    """{0, 20, 100}: a label map would mark every non-zero pixel, a soft mask on the 0-255 scale none
    above half. Either guess can flip a verdict (review of issue 29), so the reader refuses in one line."""
    mask = np.zeros((10, 10), np.uint16 if max(values) > 255 else np.uint8)
    mask[2:2 + len(values), 3] = values
    message = one_line_error(lambda: read_mask(mask, "mask of x.png"))
    assert "is ambiguous: a label map" in message and "soft mask" in message and "Save it as 0/1" in message


def test_a_label_map_with_255_as_void_is_not_read_as_soft():
    labels = np.zeros((10, 10), np.uint8)
    labels[2:6, 2:6], labels[1, :] = 1, 255  # a 0/1 mask with a "void" border, segmentation style
    reading = decode_source(labels, "test")
    assert reading.encoding == "label map" and reading.pixels.sum() == 16 + 10
    labels[7, 7] = 128  # a mid-scale value: a soft mask after all
    assert decode_source(labels, "test").encoding == "soft/255"
    assert read_mask(labels, "test")[7, 7] == np.float32(128 / 255)


def test_many_values_below_full_scale_are_soft_not_labels():
    ramp = np.arange(LABEL_MAP_MAX_VALUES + 2, dtype=np.uint8).reshape(1, -1) * 2  # 0..130, 65 non-zero values
    reading = decode_source(ramp, "test")
    assert reading.encoding == "soft/255"
    np.testing.assert_allclose(reading.pixels, ramp / np.float32(255))
    sixteen = (np.linspace(0, 1, 300) * 65535).astype(np.uint16).reshape(15, 20)
    assert decode_source(sixteen, "test").encoding == "soft/65535"
    np.testing.assert_allclose(read_mask(sixteen, "test"), sixteen / np.float32(65535))


def test_boxes():
    mask = read_mask(((1, 2, 4, 3), (0, 0, 1, 1)), "test", size=(5, 6))
    assert mask.shape == (5, 6) and mask.sum() == 3 + 1 and mask[2, 1:4].all() and mask[0, 0] == 1
    assert read_mask((), "test", size=(5, 6)).sum() == 0
    assert "outside" in one_line_error(lambda: read_mask(((0, 0, 9, 1),), "test", size=(5, 6)))


@pytest.mark.parametrize("bad, words", [
    (np.array([[0.0, 2.0]], np.float32), "divide a 0-255 mask by 255"),
    (np.array([[-0.5, 0.5]]), "must lie in [0, 1]"),
    (np.array([[0.0, np.nan]]), "NaN"),
    (np.array([[0, -1], [1, 0]], np.int16), "negative"),
    (np.zeros((4, 4, 5), np.uint8), "5 channels"),
    (np.zeros((2, 4, 4, 1), np.uint8), "2-D mask"),
    (np.array([["a", "b"]]), "unsupported mask type"),
])
def test_ambiguous_or_invalid_masks_are_refused_in_one_line(bad, words):
    assert words in one_line_error(lambda: read_mask(bad, "mask of x.png"))


def test_the_rule_is_stated():
    for case in ("bool", "0/1", "label map", "JPEG", "colour", "boxes", "half the scale"):
        assert case in MASK_RULE
    text = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    assert "## Masks" in text and "auditkit.data.masks.read_mask" in text


# ---- datasets ----------------------------------------------------------------------------------

PATCH = (slice(2, 6), slice(5, 9))  # a 4x4 patch: 16 pixels


def write_manifest(folder: Path, n: int, mask_of, size=(12, 14), splits=("train",), classes=("a", "b")) -> Path:
    """A manifest folder of n images per split whose masks are ``mask_of(k)`` (uint8/uint16 arrays) as PNG."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    rows = []
    for split in splits:
        for k in range(n):
            name = f"img/{split}{k}"
            cv2.imwrite(str(folder / f"{name}.png"), rng.integers(0, 256, size, dtype=np.uint8))
            cv2.imwrite(str(folder / f"{name}_m.png"), mask_of(k))
            rows.append([f"{name}.png", classes[k % len(classes)], split, f"{name}_m.png"])
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "mask"])
        writer.writerows(rows)
    (folder / "dataset.json").write_text(json.dumps({"classes": list(classes)}))
    return folder


def patch_mask(size=(12, 14), value=1, dtype=np.uint8) -> np.ndarray:
    mask = np.zeros(size, dtype)
    mask[PATCH] = value
    return mask


@pytest.mark.parametrize("value, dtype", [(1, np.uint8), (255, np.uint8), (1, np.uint16), (7, np.uint8)])
def test_manifest_folder_masks_sum_to_the_patch_area(tmp_path, value, dtype):
    folder = write_manifest(tmp_path / "d", 4, lambda k: patch_mask(value=value, dtype=dtype))
    dataset = open_dataset(str(folder))
    for k in range(len(dataset)):
        assert dataset[k].mask.sum() == 16 and dataset[k].mask.max() == 1


@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.int64, np.uint16, np.float32])
def test_npz_zero_one_masks_sum_to_the_patch_area(tmp_path, dtype):
    images = np.random.default_rng(0).integers(0, 256, (6, 12, 14), dtype=np.uint8)
    masks = np.stack([patch_mask() for _ in range(6)]).astype(dtype)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 0, 1, 0, 1]), masks=masks)
    dataset = open_dataset(str(tmp_path / "d.npz"))
    assert [float(dataset[k].mask.sum()) for k in range(6)] == [16.0] * 6


def test_a_resized_zero_one_mask_keeps_its_area(tmp_path):
    folder = write_manifest(tmp_path / "d", 2, lambda k: patch_mask(size=(24, 28)), size=(24, 28))
    dataset = open_dataset(str(folder)).with_format(image_size=(12, 14))
    # Area averaging halves each side: 16 pixels of the 24x28 mask cover 4 pixels of the 12x14 one.
    assert float(dataset[0].mask.sum()) == pytest.approx(4.0)


# ---- repair guards ---------------------------------------------------------------------------------


def in_memory(masks: list, splits=None) -> AuditDataset:
    rng = np.random.default_rng(0)
    records = [Record(rng.integers(0, 256, (8, 8), dtype=np.uint8), k % 2, m, "contaminated", "",
                      (splits or ["train"] * len(masks))[k]) for k, m in enumerate(masks)]
    return AuditDataset(records, DatasetInfo(name="toy", source="memory", classes=("a", "b")))


@pytest.mark.parametrize("method", ["tap", "rrr", "energy"])
def test_mask_methods_refuse_all_empty_masks(method):
    empty = in_memory([np.zeros((8, 8), np.uint8) for _ in range(5)])
    message = one_line_error(lambda: check_data(empty, RepairConfig(method=method)))
    assert "all 5 training masks are empty" in message and method in message


def test_one_annotated_mask_is_enough_and_other_splits_do_not_count():
    masks = [np.zeros((8, 8), np.uint8) for _ in range(6)]
    masks[4] = patch_mask(size=(8, 8))
    splits = ["train"] * 4 + ["test", "train"]
    with pytest.raises(DataError, match="all 5 training masks are empty"):
        check_data(in_memory(masks, splits), RepairConfig(method="tap"))  # the annotated one is a test image
    masks[5] = patch_mask(size=(8, 8), value=1)  # a 0/1 mask: annotated
    assert len(check_data(in_memory(masks, splits), RepairConfig(method="tap"))) == 5
    boxes = in_memory([(), (), ((1, 1, 3, 3),)])
    assert len(check_data(boxes, RepairConfig(method="rrr"))) == 3
    with pytest.raises(DataError, match="all 2 training masks are empty"):
        check_data(in_memory([(), ()]), RepairConfig(method="rrr"))


def test_auto_repair_skips_mask_methods_on_all_empty_masks_and_prefers_a_teacher():
    from auditkit.repair import METHODS
    from auditkit.repair.auto import _unavailable

    empty = in_memory([np.zeros((8, 8), np.uint8) for _ in range(4)])
    for name in ("tap", "rrr"):
        assert "all 4 training masks are empty" in _unavailable(METHODS[name], empty, RepairConfig())
    # run_auto_repair asks this to choose ground truth over a teacher: empty ground truth is no choice.
    assert not has_annotated_masks(empty)
    assert has_annotated_masks(in_memory([np.zeros((8, 8), np.uint8), patch_mask(size=(8, 8))]))


def test_methods_without_masks_are_not_guarded():
    empty = in_memory([np.zeros((8, 8), np.uint8) for _ in range(3)])
    assert len(check_data(empty, RepairConfig(method="masktune"))) == 3


def test_teacher_annotations_that_mark_nothing_are_refused(digits_checkpoint):
    model = load_checkpoint(digits_checkpoint)
    data = open_dataset("builtin:decoy-digits").select(split="train", variant="contaminated")
    data = data.select(indices=range(32))
    config = RepairConfig(method="tap", teacher=model, annotation=AnnotationConfig(tau=0.0))  # "< 0": nothing
    spec = config.spec
    message = one_line_error(lambda: training_data(data, config, model, spec.make_options({}),
                                                   TrainConfig(epochs=1), False))
    assert "the teacher annotated no pixel in any of the 32 training images" in message


def test_cli_repair_refuses_all_empty_masks_in_one_line(digits_checkpoint, tmp_path):
    digits = open_dataset("builtin:decoy-digits").select(split="train", variant="contaminated")
    digits = digits.select(indices=range(30))
    folder = tmp_path / "empty"
    (folder / "img").mkdir(parents=True)
    rows = []
    for k in range(len(digits)):
        sample = digits[k]
        cv2.imwrite(str(folder / "img" / f"{k}.png"), to_uint8(sample.image))
        cv2.imwrite(str(folder / "img" / f"{k}_m.png"), np.zeros((8, 8), np.uint8))
        rows.append([f"img/{k}.png", digits.classes[sample.label], "train", f"img/{k}_m.png"])
    with open(folder / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "split", "mask"], *rows])
    (folder / "dataset.json").write_text(json.dumps({"classes": list(digits.classes)}))
    for method in ("tap", "rrr"):
        result = runner.invoke(app, ["repair", str(digits_checkpoint), "--data", str(folder), "--method", method,
                                     "--out", str(tmp_path / f"{method}.safetensors")])
        assert result.exit_code == 2
        assert "all 30 training masks are empty" in error_line(result)
        assert not (tmp_path / f"{method}.safetensors").exists()


# ---- end to end: a planted shortcut, masks saved as 0/1 ---------------------------------------------------


def test_planted_shortcut_with_zero_one_masks_is_judged_reliant(digits_checkpoint, tmp_path):
    """The issue's headline: 0/1 masks made the mask tests see nothing. The decoy-digits test images
    (a 4x4 patch that names the class) written to PNG with 0/1 masks, no permuted variant and no
    generator: the verdict rests on the mask tests (swap, removal) alone."""
    from auditkit.audit import AuditConfig, run_audit

    test = open_dataset("builtin:decoy-digits", split="test").select(variant="contaminated")
    folder = tmp_path / "zero-one"
    (folder / "img").mkdir(parents=True)
    rows = []
    for k in range(len(test)):
        sample = test[k]
        cv2.imwrite(str(folder / "img" / f"{k}.png"), to_uint8(sample.image))
        cv2.imwrite(str(folder / "img" / f"{k}_m.png"), (sample.mask[0].numpy() > 0).astype(np.uint8))
        rows.append([f"img/{k}.png", test.classes[sample.label], f"img/{k}_m.png"])
    with open(folder / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "mask"], *rows])
    (folder / "dataset.json").write_text(json.dumps({"classes": list(test.classes)}))
    # The files hold 0 and 1 (what was buggy), and read back as the 16-pixel patch.
    assert set(np.unique(cv2.imread(str(folder / "img" / "0_m.png"), cv2.IMREAD_UNCHANGED))) == {0, 1}
    data = open_dataset(str(folder))
    assert data.variants == ["original"] and not data.info.generator
    assert all(float(data[k].mask.sum()) == 16.0 for k in range(0, len(data), 37))
    model = load_checkpoint(digits_checkpoint)  # trained on the contaminated digits: the patch names the class
    report = run_audit(model, data, AuditConfig(methods=("gradient",), bootstrap=200))
    findings = {e["test"]: e["finding"] for e in report.data["verdict"]["evidence"]}
    assert report.data["verdict"]["label"] == "reliant"
    assert findings["swap_flip_rate"] == findings["removal_drop"] == "shows reliance"
