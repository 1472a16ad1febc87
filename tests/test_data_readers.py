"""Every dataset reader, the writer round trip, the resize/channel policy and bad-input paths."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch

from auditkit.data import AuditDataset, collate, make_dataset, make_loader, open_dataset, write_dataset
from auditkit.data.sources import load_mnist_digits, stratified_split
from auditkit.errors import DataError, OutputExistsError


def write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels.ndim == 3:
        pixels = pixels[:, :, ::-1]
    assert cv2.imwrite(str(path), np.ascontiguousarray(pixels))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---- sources and built-ins -----------------------------------------------------------------


def test_mnist_source_is_the_real_digits_and_splits_are_stratified_and_repeatable():
    images, labels = load_mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    splits = stratified_split(labels, seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3500, 500, 1000]
    assert set(np.concatenate(list(splits.values())).tolist()) == set(range(5000))
    for split in splits.values():
        assert len(set(np.bincount(labels[split]).tolist())) == 1  # equal per class
    again = stratified_split(labels, seed=0)
    assert all(np.array_equal(splits[s], again[s]) for s in splits)
    assert not np.array_equal(splits["test"], stratified_split(labels, seed=1)["test"])


def test_builtin_decoy_mnist_has_every_split_and_variant_with_masks():
    dataset = open_dataset("builtin:decoy-mnist")
    summary = dataset.summary()
    assert summary["samples"] == 5000 * 3
    assert summary["splits"]["test"] == {"clean": 1000, "contaminated": 1000, "permuted": 1000}
    contaminated = dataset.select(split="test", variant="contaminated")
    sample = contaminated[0]
    assert sample.image.shape == (1, 28, 28) and sample.mask.shape == (1, 28, 28)
    assert sample.mask.sum() == 16  # the 4x4 decoy patch
    assert dataset.select(split="test", variant="clean")[0].mask is None


def test_builtin_options_and_unknown_names():
    dataset = open_dataset("builtin:digits?seed=3")
    assert dataset.image_size == (8, 8) and dataset.variants == ["clean"]
    with pytest.raises(DataError, match="unknown built-in dataset 'nope'"):
        open_dataset("builtin:nope")


def test_made_dataset_is_deterministic_under_seed():
    first = make_dataset("decoy-patch", source="digits" if False else "sklearn-digits", seed=5)
    second = make_dataset("decoy-patch", source="sklearn-digits", seed=5)
    other = make_dataset("decoy-patch", source="sklearn-digits", seed=6)
    assert first.fingerprint() == second.fingerprint() != other.fingerprint()


# ---- writer round trip ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_written_dataset_reads_back_identically(tmp_path, fmt):
    made = make_dataset("decoy-patch", source="sklearn-digits", seed=1)
    folder = write_dataset(made, tmp_path / "decoy", fmt=fmt)
    back = open_dataset(folder)
    assert back.classes == made.classes and len(back) == len(made)
    assert back.summary()["splits"] == made.summary()["splits"]
    assert json.loads((folder / "dataset.json").read_text())["generator"]["kind"] == "decoy-patch"
    for k in (0, 7, len(made) - 1):
        a, b = made[k], back[k]
        assert torch.equal(a.image, b.image) and a.label == b.label and a.variant == b.variant
        if a.mask is None:
            assert b.mask is None or b.mask.sum() == 0
        else:
            assert torch.equal(a.mask, b.mask)


def test_writer_refuses_to_replace_unless_forced_and_leaves_no_staging(tmp_path):
    made = make_dataset(None, source="sklearn-digits")
    write_dataset(made.select(split="val"), tmp_path / "d")
    with pytest.raises(OutputExistsError, match="already exists"):
        write_dataset(made.select(split="val"), tmp_path / "d")
    write_dataset(made.select(split="test"), tmp_path / "d", overwrite=True)
    assert open_dataset(tmp_path / "d").splits == ["test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# ---- manifest folders --------------------------------------------------------------------


def make_manifest(tmp_path, rng, rows=None, mask_size=(20, 30)):
    folder = tmp_path / "ds"
    for k in range(4):
        write_png(folder / f"img{k}.png", rng.integers(0, 255, (20, 30), dtype=np.uint8))
    write_png(folder / "m0.png",
              (np.arange(600).reshape(20, 30) % 2 * 255).astype(np.uint8)[: mask_size[0], : mask_size[1]])
    rows = rows or [
        ["img0.png", "cat", "train", "m0.png"],
        ["img1.png", "dog", "train", ""],
        ["img2.png", "cat", "test", ""],
        ["img3.png", "dog", "test", ""],
    ]
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "mask"])
        writer.writerows(rows)
    return folder


def test_manifest_folder(tmp_path, rng):
    dataset = open_dataset(make_manifest(tmp_path, rng))
    assert dataset.classes == ("cat", "dog") and dataset.splits == ["test", "train"]
    assert dataset.variants == ["original"]
    sample = dataset[0]
    assert sample.image.shape == (1, 20, 30) and sample.mask.shape == (1, 20, 30)
    assert set(sample.mask.unique().tolist()) == {0.0, 1.0}
    assert len(dataset.select(split="test")) == 2


def test_manifest_errors_are_one_clear_line(tmp_path, rng):
    folder = make_manifest(tmp_path, rng, rows=[["missing.png", "cat", "train", ""]])
    with pytest.raises(DataError, match="missing.png does not exist"):
        open_dataset(folder)
    folder = make_manifest(tmp_path / "b", rng, mask_size=(10, 10))
    with pytest.raises(DataError, match="m0.png is 10x10 but its image .* is 30x20"):
        open_dataset(folder)[0]
    (folder / "img1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="not a readable image"):
        open_dataset(folder)[1]
    with pytest.raises(DataError, match="no split 'nope'"):
        open_dataset(folder, split="nope")
    with pytest.raises(DataError, match="no such file or folder"):
        open_dataset(tmp_path / "absent")


def test_manifest_with_declared_classes_rejects_unknown_labels(tmp_path, rng):
    folder = make_manifest(tmp_path, rng)
    (folder / "dataset.json").write_text(json.dumps({"classes": ["cat", "bird"]}))
    with pytest.raises(DataError, match="dog are not among the declared classes"):
        open_dataset(folder)


# ---- image-folder trees ----------------------------------------------------------------


def test_image_folder_tree_with_mirrored_masks_and_rgb(tmp_path, rng):
    for split in ("train", "test"):
        for label in ("normal", "pneumonia"):
            for k in range(2):
                write_png(tmp_path / split / label / f"{k}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[:4, :4] = 255
    write_png(tmp_path / "masks" / "train" / "normal" / "0.png", mask)
    dataset = open_dataset(tmp_path)
    assert dataset.classes == ("normal", "pneumonia") and dataset.channels == 3
    assert dataset.splits == ["test", "train"] and len(dataset) == 8
    with_masks = [dataset[k] for k in range(len(dataset)) if dataset[k].mask is not None]
    assert len(with_masks) == 1 and with_masks[0].mask.sum() == 16


def test_class_folders_without_splits(tmp_path, rng):
    for label in ("a", "b"):
        write_png(tmp_path / label / "x.png", rng.integers(0, 255, (9, 9), dtype=np.uint8))
    dataset = open_dataset(tmp_path)
    assert dataset.classes == ("a", "b") and dataset.splits == [""]


def test_empty_folder_is_explained(tmp_path):
    with pytest.raises(DataError, match="expected manifest.csv, split/class/\\*.png"):
        open_dataset(tmp_path)


# ---- bounding boxes, npz -------------------------------------------------------------


def test_bounding_box_csv_becomes_masks(tmp_path, rng):
    write_png(tmp_path / "a.png", rng.integers(0, 255, (10, 12), dtype=np.uint8))
    write_png(tmp_path / "b.png", rng.integers(0, 255, (10, 12), dtype=np.uint8))
    (tmp_path / "boxes.csv").write_text(
        "path,label,x0,y0,x1,y1\na.png,dog,0,0,2,3\na.png,dog,10,8,12,10\nb.png,cat,,,,\n"
    )
    dataset = open_dataset(tmp_path / "boxes.csv")
    # Boxes mark the artefact by default, as docs/data.md says (issue 24; "object" says so explicitly).
    assert dataset.info.mask_meaning == "spurious" and len(dataset) == 2
    first = dataset[0]
    assert first.mask.sum() == 2 * 3 + 2 * 2 and first.mask[0, 0, 0] == 1 and first.mask[0, 9, 11] == 1
    assert dataset[1].mask.sum() == 0
    (tmp_path / "bad.csv").write_text("path,label,x0,y0,x1,y1\na.png,dog,0,0,20,3\n")
    with pytest.raises(DataError, match="outside the 12x10 image"):
        open_dataset(tmp_path / "bad.csv")[0]


def test_npz_layouts_and_validation(tmp_path, rng):
    images = rng.random((6, 3, 8, 8)).astype(np.float32)
    masks = (rng.random((6, 8, 8)) > 0.5).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]), masks=masks,
             variants=np.array(["contaminated"] * 3 + ["clean"] * 3))
    dataset = open_dataset(tmp_path / "d.npz")
    assert dataset.channels == 3 and dataset.variants == ["contaminated", "clean"]
    torch.testing.assert_close(dataset[2].image, torch.from_numpy(images[2]))
    torch.testing.assert_close(dataset[2].mask[0], torch.from_numpy(masks[2]))
    np.savez(tmp_path / "nan.npz", images=np.full((2, 4, 4), np.nan, np.float32), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="NaN"):
        open_dataset(tmp_path / "nan.npz")
    np.savez(tmp_path / "m.npz", images=images, labels=np.zeros(6, int), masks=masks * 2)
    with pytest.raises(DataError, match=r"masks must lie in \[0, 1\]"):
        open_dataset(tmp_path / "m.npz")
    np.savez(tmp_path / "short.npz", images=images, labels=np.zeros(5, int))
    with pytest.raises(DataError, match=r"labels must have shape \(6,\)"):
        open_dataset(tmp_path / "short.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable .npz"):
        open_dataset(tmp_path / "junk.npz")


# ---- policy, batching ----------------------------------------------------------------------


def test_resize_and_channel_policy(tmp_path, rng):
    gray = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    write_png(tmp_path / "a" / "0.png", gray)
    write_png(tmp_path / "b" / "0.png", np.stack([gray] * 3, axis=2))
    dataset = open_dataset(tmp_path)
    rgb = dataset.with_format(channels=3, image_size=(10, 15))
    sample = rgb[0]
    assert sample.image.shape == (3, 10, 15)
    assert torch.equal(sample.image[0], sample.image[1])  # grey replicated
    grey_again = dataset.with_format(channels=1)[1]  # RGB file -> luminance
    torch.testing.assert_close(grey_again.image[0], torch.from_numpy(gray / 255.0).float(), atol=1 / 255, rtol=0)


def test_sixteen_bit_images_are_scaled(tmp_path):
    pixels = np.full((4, 4), 65535, np.uint16)
    pixels[0, 0] = 0
    write_png(tmp_path / "x" / "0.png", pixels)
    image = open_dataset(tmp_path)[0].image
    assert image.max() == 1.0 and image[0, 0, 0] == 0.0


def test_loader_batches_masks_with_presence_flags():
    dataset = make_dataset("decoy-patch", source="sklearn-digits").select(split="test")
    batch = next(iter(make_loader(dataset, 64, shuffle=True, seed=0)))
    assert batch.images.shape[1:] == (1, 8, 8) and batch.masks.shape == (64, 1, 8, 8)
    clean = torch.tensor([v == "clean" for v in batch.variants])
    assert not batch.has_mask[clean].any() and batch.has_mask[~clean].all()
    again = next(iter(make_loader(dataset, 64, shuffle=True, seed=0)))
    assert torch.equal(batch.indices, again.indices)


def test_labels_outside_classes_are_rejected():
    from auditkit.data import DatasetInfo, Record

    with pytest.raises(DataError, match="label 3 .* outside the 2 classes"):
        AuditDataset([Record(np.zeros((4, 4), np.uint8), 3)], DatasetInfo("x", "test", ("a", "b")))


def test_collate_handles_missing_masks():
    dataset = make_dataset("decoy-patch", source="sklearn-digits").select(split="val")
    batch = collate([dataset[0], dataset[len(dataset) - 1]])
    assert batch.images.shape[0] == 2 and batch.has_mask.dtype == torch.bool
