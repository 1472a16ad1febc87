"""Where data enters auditkit: ``open_dataset`` reads any supported dataset.

It dispatches on the spec (``builtin:NAME?options``, a folder, a ``.csv`` of boxes, a ``.npz``) to
the generators (builtin.py) and the file readers (readers.py), which never import each other or this
module.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import DataError
from .builtin import builtin_dataset
from .dataset import AuditDataset
from .meaning import mask_meaning as parse_meaning
from .labels import label_kind as parse_kind
from .readers import (
    LABELS_FILE,
    apply_folder_meta,
    read_box_csv,
    read_image_folder,
    read_labelled_folder,
    read_manifest_folder,
    read_npz,
    reindex_classes,
    reorder_findings,
)


def open_dataset(
    spec: str | Path,
    *,
    split: str | None = None,
    variant: str | list[str] | None = None,
    mask_meaning: str | None = None,
    classes: str | list[str] | tuple[str, ...] | None = None,
    findings: str | list[str] | tuple[str, ...] | None = None,
    label_kind: str | None = None,
) -> AuditDataset:
    """Opens any supported dataset; ``split``/``variant`` select a subset.

    ``classes`` (names in index order, or one comma-separated string: the CLI's ``--classes``)
    fixes the class order for every layout, over a ``dataset.json``'s ``classes``. Without either,
    folder trees follow torchvision's ImageFolder (folder names sorted as text) and tables sort
    their labels (numerically when all are integers); see docs/data.md. Raises DataError for labels
    the given classes lack.

    ``mask_meaning`` (artefact, object; the CLI's --masks-mark) says what the masks mark, over a
    ``dataset.json``'s and the default (the artefact, for every layout: auditkit/data/meaning.py).

    ``findings`` (names in order, or one comma-separated string) declares a multi-label table's findings
    (the 0/1 columns to read, or the names a labels column may use) over a ``dataset.json``'s; see
    auditkit/data/labels.py. ``label_kind`` (softmax, binary, multilabel) says what the labels are, over a
    ``dataset.json``'s: binary needs two classes; multilabel needs multi-label data (it is never a guess).
    """
    text = str(spec)
    if text.startswith("builtin:"):
        dataset = builtin_dataset(text)
        if findings is not None:
            if dataset.label_kind != "multilabel":
                raise DataError(f"{text}: findings are given but the dataset has one class per image "
                                f"({dataset.label_kind})")
            dataset = reorder_findings(dataset, findings, "the findings option")
        if classes is not None:
            dataset = reindex_classes(dataset, classes, "the classes option")
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir():
            if (path / "manifest.csv").is_file():
                dataset = read_manifest_folder(path, classes, findings)
            elif (path / "dataset.npz").is_file():
                dataset = read_npz(path / "dataset.npz", classes, meta_folder=path, findings=findings)
                apply_folder_meta(dataset, path)
            elif (path / LABELS_FILE).is_file():
                dataset = read_labelled_folder(path, classes, findings)
            else:
                dataset = _no_findings(read_image_folder(path, classes), findings)
        elif path.suffix.lower() == ".npz":
            dataset = read_npz(path, classes, findings=findings)
        elif path.suffix.lower() == ".csv":
            dataset = _no_findings(read_box_csv(path, classes), findings)
        else:
            raise DataError(
                f"{path}: not a dataset; give a folder (manifest.csv or split/class/*.png), "
                "a .csv of bounding boxes, a .npz, or builtin:NAME"
            )
    if mask_meaning is not None:
        dataset.info.mask_meaning = parse_meaning(mask_meaning)
    if label_kind is not None:
        dataset = with_label_kind(dataset, label_kind)
    if split is not None or variant is not None:
        dataset = dataset.select(split=split, variant=variant)
    return dataset


def _no_findings(dataset: AuditDataset, findings) -> AuditDataset:
    if findings is not None:
        raise DataError(f"{dataset.info.source}: findings are given, but a class-folder tree or a boxes .csv has one "
                        "class per image; give a manifest.csv or labels.csv with the findings, or an .npz")
    return dataset


def with_label_kind(dataset: AuditDataset, kind: str) -> AuditDataset:
    """``dataset`` read as ``kind``: softmax and binary are the same class labels (binary: exactly two
    classes, ``classes[1]`` the positive one); multilabel is only multi-label data, and multi-label data
    only multilabel. DataError (one line naming both) otherwise."""
    kind = parse_kind(kind, "label_kind")
    have = dataset.label_kind
    if kind == have:
        return dataset
    if "multilabel" in (kind, have):
        raise DataError(f"{dataset.info.name}: label_kind {kind} was asked for, but the data is {have} "
                        f"({dataset.num_classes} {'findings' if have == 'multilabel' else 'classes'})")
    return AuditDataset(dataset.records, replace(dataset.info, label_kind=kind), channels=dataset.channels,
                        image_size=dataset.image_size)
