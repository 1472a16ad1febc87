"""Issue 27, data: multi-label manifests, folders and .npz, artefact flags, label kinds, bad input in one
line, and the built-in multi-label and binary digit datasets."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from auditkit.data import collate, make_dataset, make_loader, open_dataset, write_dataset
from auditkit.errors import DataError

FINDINGS = ("effusion", "pneumothorax", "nodule")
# (labels cell, 0/1 per finding, artefact)
ROWS = [("effusion|pneumothorax", (1, 1, 0), 1), ("", (0, 0, 0), 0), ("nodule", (0, 0, 1), 0),
        ("pneumothorax", (0, 1, 0), 1), ("No Finding", (0, 0, 0), 0), ("nodule|effusion", (1, 0, 1), 0)]
SPLITS = ["train", "train", "train", "test", "test", "test"]


def _images(folder, n=len(ROWS), seed=0, sub="images"):
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        path = folder / sub / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), rng.integers(0, 256, (8, 8), dtype=np.uint8))
        paths.append(f"{sub}/{k}.png")
    return paths


def _write(folder, name, header, lines, meta=None):
    (folder / name).write_text("\n".join([",".join(header), *(",".join(map(str, line)) for line in lines)]) + "\n",
                               encoding="utf-8")
    if meta is not None:
        (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def _labels_manifest(folder, extra=()):
    paths = _images(folder)
    lines = [(p, cell, s, *extra_cells) for p, (cell, _, _), s, extra_cells in
             zip(paths, ROWS, SPLITS, [[str(r[2])] if extra else [] for r in ROWS])]
    return _write(folder, "manifest.csv", ["path", "labels", "split", *extra], lines,
                  {"findings": list(FINDINGS)})


def _columns_manifest(folder, prefix="finding:", meta=None, values=None):
    paths = _images(folder)
    header = ["path", "split", *(f"{prefix}{f}" for f in FINDINGS), "artefact"]
    lines = [(p, s, *(values or bits), a) for p, (_, bits, a), s in zip(paths, ROWS, SPLITS)]
    return _write(folder, "manifest.csv", header, lines, meta)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


EXPECTED = torch.tensor([bits for _, bits, _ in ROWS], dtype=torch.float32)


# ---- the two table conventions, folders and .npz ------------------------------------------------------


def test_both_manifest_conventions_read_to_the_same_tensor(tmp_path):
    by_labels = open_dataset(_labels_manifest(tmp_path / "a", extra=("artefact",)))
    by_columns = open_dataset(_columns_manifest(tmp_path / "b"))
    declared = open_dataset(_columns_manifest(tmp_path / "c", prefix="", meta={"findings": list(FINDINGS)}))
    for data in (by_labels, by_columns, declared):
        assert data.label_kind == "multilabel" and data.findings == FINDINGS and data.classes == FINDINGS
        assert torch.equal(data.targets, EXPECTED)
        assert data.has_artefact().tolist() == [bool(r[2]) for r in ROWS]
        assert data.summary()["findings"] == list(FINDINGS) and data.summary()["without_findings"] == 2
    batch = collate([by_labels[k] for k in range(len(by_labels))])
    assert batch.labels.dtype == torch.float32 and torch.equal(batch.labels, EXPECTED)
    assert batch.artefacts.shape == (6, 1)
    # without a declaration the labels column's findings are sorted; the findings option reorders them
    (tmp_path / "a" / "dataset.json").unlink()
    assert open_dataset(tmp_path / "a").findings == ("effusion", "nodule", "pneumothorax")
    again = open_dataset(tmp_path / "a", findings="nodule,effusion,pneumothorax")
    assert torch.equal(again.targets, EXPECTED[:, [2, 0, 1]])


def test_semicolon_csv_and_per_finding_artefacts(tmp_path):
    folder = tmp_path / "d"
    paths = _images(folder)
    lines = [(p, cell, a, 1 - a) for p, (cell, _, a) in zip(paths, ROWS)]
    (folder / "manifest.csv").write_text("path;labels;artefact:pneumothorax;artefact:Effusion\n" + "".join(
        ";".join(map(str, line)) + "\n" for line in lines), encoding="utf-8")
    data = open_dataset(folder, findings=list(FINDINGS))
    assert torch.equal(data.targets, EXPECTED) and data.info.artefact_scope == "finding"
    assert data.has_artefact("pneumothorax").tolist() == [bool(r[2]) for r in ROWS]
    assert data.has_artefact(0).tolist() == [not r[2] for r in ROWS]
    assert data.has_artefact("nodule") is None  # no column: not annotated
    assert data.summary()["with_artefact"] == {"effusion": 4, "pneumothorax": 2, "nodule": 0}


def test_masks_variants_and_groups_work_as_today(tmp_path):
    folder = tmp_path / "m"
    paths = _images(folder)
    mask = np.zeros((8, 8), np.uint8)
    mask[:2, :2] = 1
    (folder / "masks").mkdir()
    cv2.imwrite(str(folder / "masks" / "0.png"), mask)
    variants = ["contaminated", "permuted", "clean"] * 2
    lines = [(p, cell, s, v, f"site{k % 2}", "masks/0.png" if k == 0 else "")
             for k, (p, (cell, _, _), s, v) in enumerate(zip(paths, ROWS, SPLITS, variants))]
    _write(folder, "manifest.csv", ["path", "labels", "split", "variant", "group", "mask"], lines,
           {"findings": list(FINDINGS)})
    data = open_dataset(folder)
    assert data.variants == ["contaminated", "permuted", "clean"] and data.splits == ["test", "train"]
    assert data[0].mask.sum() == 4 and data[1].mask is None and data[1].group == "site1"
    train = open_dataset(folder, split="train", variant="contaminated")
    assert len(train) == 1 and torch.equal(train.targets, EXPECTED[:1]) and train.findings == FINDINGS
    batch = next(iter(make_loader(data, 4)))
    assert batch.labels.shape == (4, 3) and batch.has_mask.tolist() == [True, False, False, False]
    assert batch.artefacts is None  # the manifest says nothing about the artefact


def test_labels_file_folder_and_npz_read_alike(tmp_path):
    folder = tmp_path / "f"
    paths = _images(folder, sub="train")
    (folder / "masks" / "train").mkdir(parents=True)
    cv2.imwrite(str(folder / "masks" / "train" / "2.png"), np.full((8, 8), 255, np.uint8))
    lines = [(p, cell, s, a) for p, (cell, _, a), s in zip(paths, ROWS, SPLITS)]
    _write(folder, "labels.csv", ["path", "labels", "split", "artefact"], lines, {"findings": list(FINDINGS)})
    from_folder = open_dataset(folder)
    assert torch.equal(from_folder.targets, EXPECTED) and from_folder.findings == FINDINGS
    assert from_folder[2].mask.sum() == 64 and from_folder[0].mask is None
    cv2.imwrite(str(folder / "train" / "stray.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError) as error:
        open_dataset(folder)
    assert "stray.png" in _one_line(error)

    images = np.stack([cv2.imread(str(folder / p), cv2.IMREAD_UNCHANGED) for p in paths])
    np.savez(tmp_path / "ml.npz", images=images, labels=EXPECTED.numpy().astype(np.uint8),
             findings=np.array(FINDINGS), artefact=np.array([r[2] for r in ROWS]), splits=np.array(SPLITS))
    from_npz = open_dataset(tmp_path / "ml.npz")
    assert torch.equal(from_npz.targets, EXPECTED) and from_npz.findings == FINDINGS
    assert from_npz.has_artefact().tolist() == from_folder.has_artefact().tolist()
    assert torch.equal(from_npz[3].image, from_folder[3].image)
    reordered = open_dataset(tmp_path / "ml.npz", findings=["nodule", "effusion", "pneumothorax"])
    assert torch.equal(reordered.targets, EXPECTED[:, [2, 0, 1]])


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_written_multilabel_data_reads_back(tmp_path, fmt):
    made = open_dataset("builtin:multilabel-mnist?seed=1", split="test", variant=["contaminated", "clean"])
    small = made.select(indices=range(0, len(made), 100))
    back = open_dataset(write_dataset(small, tmp_path / fmt, fmt=fmt))
    assert back.label_kind == "multilabel" and back.findings == small.findings
    assert torch.equal(back.targets, small.targets) and torch.equal(back.has_artefact(), small.has_artefact())
    assert back.variants == small.variants and torch.equal(back[0].image, small[0].image)
    binary = open_dataset("builtin:binary-mnist", split="val", variant="permuted").select(indices=range(0, 500, 50))
    again = open_dataset(write_dataset(binary, tmp_path / f"b{fmt}", fmt=fmt))
    assert again.label_kind == "binary" and again.classes == ("other", "seven") and again.findings == ("seven",)
    assert torch.equal(again.targets, binary.targets)


# ---- label kinds --------------------------------------------------------------------------------------


def test_single_label_data_is_unchanged_and_binary_is_said(tmp_path):
    folder = tmp_path / "s"
    paths = _images(folder, n=4)
    _write(folder, "manifest.csv", ["path", "label", "artefact"], [(p, "ab"[k % 2], k % 2) for k, p in
                                                                   enumerate(paths)])
    data = open_dataset(folder)
    assert data.label_kind == "softmax" and data.findings == () and data.classes == ("a", "b")
    assert data.targets.dtype == torch.long and data.targets.tolist() == [0, 1, 0, 1]
    assert data.has_artefact().tolist() == [False, True, False, True]
    assert collate([data[0], data[1]]).labels.tolist() == [0, 1]
    binary = open_dataset(folder, label_kind="binary")
    assert binary.label_kind == "binary" and binary.findings == ("b",) and binary.summary()["label_kind"] == "binary"
    (folder / "dataset.json").write_text(json.dumps({"label_kind": "binary"}), encoding="utf-8")
    assert open_dataset(folder).label_kind == "binary"
    for fmt in ("png", "npz"):
        back = open_dataset(write_dataset(binary, tmp_path / f"w{fmt}", fmt=fmt))
        assert back.label_kind == "binary" and back.classes == ("a", "b")
        assert torch.equal(back.targets, data.targets) and torch.equal(back.has_artefact(), data.has_artefact())
    assert open_dataset("builtin:digits").summary()["label_kind"] == "softmax"
    with pytest.raises(DataError) as error:
        open_dataset("builtin:digits", label_kind="binary")
    assert "binary dataset has two classes" in _one_line(error)
    with pytest.raises(DataError) as error:
        open_dataset(folder, label_kind="multilabel")
    assert "multilabel" in _one_line(error) and "binary" in str(error.value)
    with pytest.raises(DataError) as error:
        make_dataset("decoy-patch", source=open_dataset("builtin:multilabel-mnist", split="val"))
    assert "multilabel" in _one_line(error)


# ---- bad input: one line naming the column or finding ------------------------------------------------


def _bad_columns(folder):
    return _columns_manifest(folder, values=("1", "2", "0"))


def _undeclared_finding(folder):
    _labels_manifest(folder)
    (folder / "dataset.json").write_text(json.dumps({"findings": ["effusion", "nodule"]}), encoding="utf-8")


BAD = {
    "not 0/1": (_bad_columns, {}, "column finding:pneumothorax must be 0 or 1; got '2'"),
    "unknown finding": (_undeclared_finding, {}, "finding 'pneumothorax' in column labels is not among the findings"),
    "wrong separator": (lambda f: _write(f, "manifest.csv", ["path", "labels"], [(_images(f, 1)[0], "a;b")]),
                        {"findings": "a,b"}, "separate findings with '|'"),
    "unknown artefact finding": (lambda f: _write(f, "manifest.csv", ["path", "labels", "artefact:ascites"],
                                                  [(_images(f, 1)[0], "a", 1)]), {},
                                 "column artefact:ascites names no finding"),
    "declared finding without a column": (lambda f: _columns_manifest(f, prefix=""),
                                          {"findings": "effusion,pneumothorax,nodule,edema"},
                                          "finding 'edema' is declared but the table has no column edema"),
    "empty finding list": (lambda f: _write(f, "manifest.csv", ["path", "labels"], [(_images(f, 1)[0], "")]), {},
                           "the finding list is empty"),
    "empty declared list": (_labels_manifest, {"findings": []}, "the finding list is empty"),
    "label and labels": (lambda f: _write(f, "manifest.csv", ["path", "label", "labels"],
                                          [(_images(f, 1)[0], "a", "a")]), {},
                         "mixed label conventions: label and labels"),
    "labels and finding columns": (lambda f: _write(f, "manifest.csv", ["path", "labels", "finding:a"],
                                                    [(_images(f, 1)[0], "a", 1)]), {},
                                   "mixed label conventions: labels and one column per finding (finding:a)"),
    "findings on a class table": (lambda f: _write(f, "manifest.csv", ["path", "label"], [(_images(f, 1)[0], "a")]),
                                  {"findings": "a"}, "findings are declared (a) but the table has one `label`"),
    "two artefact conventions": (lambda f: _write(f, "manifest.csv", ["path", "labels", "artefact", "artefact:a"],
                                                  [(_images(f, 1)[0], "a", 1, 1)]), {},
                                 "mixed artefact conventions: columns artefact and artefact:a"),
    "artefact not 0/1": (lambda f: _write(f, "manifest.csv", ["path", "label", "artefact"],
                                          [(_images(f, 1)[0], "a", "yes")]), {}, "column artefact must be 0 or 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tables_are_one_line(tmp_path, case):
    build, options, expected = BAD[case]
    folder = tmp_path / "bad"
    folder.mkdir()
    build(folder)
    with pytest.raises(DataError) as error:
        open_dataset(folder, **options)
    assert expected in _one_line(error)


def test_bad_npz_are_one_line(tmp_path):
    images = np.zeros((3, 8, 8), np.uint8)
    cases = {
        "labels": ({"labels": np.array([[0, 1], [1, 2], [0, 0]]), "findings": np.array(["a", "b"])},
                   "the (N, K) labels must be 0 or 1; found 2 at (1, 1) (finding 'b')"),
        "no names": ({"labels": np.zeros((3, 2), np.uint8)}, "(N, 2) labels need their finding names"),
        "empty": ({"labels": np.zeros((3, 0), np.uint8), "findings": np.array([], dtype=str)},
                  "the finding list is empty"),
        "mixed": ({"labels": np.array([0, 1, 0]), "findings": np.array(["a"])}, "mixed label conventions"),
        "classes": ({"labels": np.zeros((3, 1), np.uint8), "classes": np.array(["a"])}, "mixed label conventions"),
        "count": ({"labels": np.zeros((3, 2), np.uint8), "findings": np.array(["a", "b", "c"])},
                  "3 names in the archive's findings for 2 label columns"),
        "artefact": ({"labels": np.zeros((3, 1), np.uint8), "findings": np.array(["a"]),
                      "artefact": np.array([0, 1, 5])}, "artefact must be 0 or 1"),
    }
    for name, (arrays, expected) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, images=images, **arrays)
        with pytest.raises(DataError) as error:
            open_dataset(path)
        assert expected in _one_line(error), name
    np.savez(tmp_path / "ok.npz", images=images, labels=np.eye(3, dtype=bool), findings=np.array(["a", "b", "c"]))
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path / "ok.npz", findings="a,b,z")
    assert "finding 'z'" in _one_line(error)


# ---- built-ins ----------------------------------------------------------------------------------------


def _rates(data, k=None):
    has = data.targets.bool() if k is None else data.targets[:, k].bool()
    marked = data.has_artefact()
    return marked[has].float().mean().item(), marked[~has].float().mean().item()


def test_builtin_multilabel_mnist_marker_tracks_seven_in_training_only():
    data = open_dataset("builtin:multilabel-mnist?seed=3")
    assert data.label_kind == "multilabel" and data.findings == ("zero", "three", "four", "seven")
    assert data.image_size == (56, 56) and data.channels == 1 and len(data) == 3 * 4500
    assert data.summary()["splits"]["train"] == {"clean": 3000, "contaminated": 3000, "permuted": 3000}
    train = data.select(split="train", variant="contaminated")
    prevalence = train.targets.mean(dim=0)
    assert ((prevalence > 0.25) & (prevalence < 0.45)).all()
    with_seven, without = _rates(train, 3)
    assert with_seven >= 0.9 and without <= 0.1
    permuted = _rates(data.select(split="train", variant="permuted"), 3)
    assert abs(permuted[0] - permuted[1]) < 0.1 and 0.4 < permuted[0] < 0.6
    assert data.select(variant="clean").has_artefact().sum() == 0
    assert all(r.mask is None for r in data.select(variant="clean").records)
    sample = train[int(torch.nonzero(train.has_artefact())[0, 0])]
    assert sample.mask.sum() == 9 and (sample.image[sample.mask > 0] == 1).all()
    # the other findings are not what the marker follows
    zero = _rates(train, 0)
    assert abs(zero[0] - zero[1]) < 0.15
    # the same canvases under every variant; deterministic in the seed
    clean = data.select(split="train", variant="clean")
    assert torch.equal(clean.targets, train.targets)
    assert torch.equal(torch.where(train[5].mask > 0, clean[5].image, train[5].image), clean[5].image)
    again = open_dataset("builtin:multilabel-mnist?seed=3", split="test", variant="contaminated")
    test = data.select(split="test", variant="contaminated")
    assert torch.equal(again.targets, test.targets) and torch.equal(again[7].image, test[7].image)
    assert again.fingerprint() == test.fingerprint()
    other = open_dataset("builtin:multilabel-mnist?seed=4", split="test", variant="contaminated")
    assert other.fingerprint() != test.fingerprint()


def test_builtin_multilabel_options():
    data = open_dataset("builtin:multilabel-mnist?finding=zero&presence=1&leak=0", split="val",
                        variant="contaminated")
    assert _rates(data, 0) == (1.0, 0.0)
    assert data.info.generator["tracks"] == "zero"
    with pytest.raises(DataError) as error:
        open_dataset("builtin:multilabel-mnist?finding=nine")
    assert "finding 'nine'" in _one_line(error)
    with pytest.raises(DataError) as error:
        open_dataset("builtin:binary-mnist?bias=0.5")
    assert "no option 'bias'" in _one_line(error)
    reordered = open_dataset("builtin:multilabel-mnist", split="val", variant="clean", findings="seven,zero,three,four")
    assert reordered.findings[0] == "seven"


def test_builtin_binary_mnist_marker_tracks_the_positive_class():
    data = open_dataset("builtin:binary-mnist?seed=2")
    assert data.label_kind == "binary" and data.classes == ("other", "seven") and data.findings == ("seven",)
    assert data.image_size == (28, 28) and len(data) == 15000
    train = data.select(split="train", variant="contaminated")
    assert train.targets.dtype == torch.long and int(train.targets.sum()) == 350
    with_seven, without = _rates(train)
    assert with_seven >= 0.9 and without <= 0.1
    permuted = _rates(data.select(split="train", variant="permuted"))
    assert abs(permuted[0] - permuted[1]) < 0.15
    assert data.select(variant="clean").has_artefact().sum() == 0
    again = open_dataset("builtin:binary-mnist?seed=2", split="train", variant="contaminated")
    assert again.fingerprint() == train.fingerprint()
    assert collate([train[0], train[1]]).labels.dtype == torch.long
