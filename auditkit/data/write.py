"""Writing a dataset to disk in the formats the readers accept.

``png``: ``OUT/manifest.csv`` + ``OUT/images/<split>/<variant>/<n>.png`` (+ masks alongside
under ``OUT/masks/``) + ``OUT/dataset.json`` — browsable, and the layout users can copy.
``npz``: ``OUT/dataset.npz`` + ``OUT/dataset.json`` — one compact file.
The folder is written next to its destination and renamed into place at the end, so an
interrupted write leaves nothing half-made; an existing folder is replaced only when asked.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from .._version import __version__
from ..errors import DataError, OutputExistsError
from .dataset import MULTILABEL, AuditDataset
from .labels import SEPARATOR
from .images import to_uint8

FORMATS = ("png", "npz")


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels.ndim == 3:
        pixels = np.ascontiguousarray(pixels[:, :, ::-1])  # OpenCV writes BGR
    if not cv2.imwrite(str(path), pixels):
        raise DataError(f"{path}: could not write the image")


def _label_text(dataset: AuditDataset, label) -> str:
    """A label as a manifest writes it: the class name, or the findings separated by '|'."""
    if dataset.label_kind == MULTILABEL:
        return SEPARATOR.join(f for f, v in zip(dataset.classes, label) if v)
    return dataset.classes[label]


def _artefact_columns(dataset: AuditDataset) -> list[str]:
    scope = dataset.info.artefact_scope
    if scope == "finding":
        return [f"artefact:{f}" for f in dataset.classes]
    return ["artefact"] if scope == "image" else []


def _artefact_cells(dataset: AuditDataset, record) -> list[str]:
    if not _artefact_columns(dataset):
        return []
    if not record.artefact or -1 in record.artefact:
        raise DataError(f"{dataset.info.name}: an image's artefact flags are not known ({record.artefact}); a "
                        "manifest holds 0/1 for every image")
    return [str(v) for v in record.artefact]


def _write_png_folder(dataset: AuditDataset, folder: Path, progress: Callable[[int], None]) -> None:
    counters: dict[tuple[str, str], int] = {}
    label_column = "labels" if dataset.label_kind == MULTILABEL else "label"
    with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", label_column, "split", "variant", "group", "mask", *_artefact_columns(dataset)])
        for k in range(len(dataset)):
            sample = dataset[k]
            record = dataset.records[k]
            key = (record.split or "all", record.variant)
            number = counters.get(key, 0)
            counters[key] = number + 1
            relative = Path(key[0]) / key[1] / f"{number:06d}.png"
            _write_png(folder / "images" / relative, to_uint8(sample.image))
            mask_path = ""
            if sample.mask is not None:
                _write_png(folder / "masks" / relative, to_uint8(sample.mask))
                mask_path = str(Path("masks") / relative)
            writer.writerow(
                [str(Path("images") / relative), _label_text(dataset, record.label), record.split, record.variant,
                 record.group, mask_path, *_artefact_cells(dataset, record)]
            )
            progress(1)


def _write_npz(dataset: AuditDataset, folder: Path, progress: Callable[[int], None]) -> None:
    samples = []
    for k in range(len(dataset)):
        samples.append(dataset[k])
        progress(1)
    images = np.stack([to_uint8(s.image) for s in samples])
    masks = np.stack([to_uint8(s.mask) if s.mask is not None else np.zeros(images.shape[1:3], np.uint8)
                      for s in samples])
    names = {"findings": np.array(dataset.classes)} if dataset.label_kind == MULTILABEL else {
        "classes": np.array(dataset.classes)}
    if dataset.info.artefact_scope:
        cells = [_artefact_cells(dataset, r) for r in dataset.records]
        names["artefact"] = np.array(cells, dtype=np.int64).reshape(len(cells), -1)
        if dataset.info.artefact_scope == "image":
            names["artefact"] = names["artefact"][:, 0]
    np.savez_compressed(
        folder / "dataset.npz",
        images=images,
        labels=np.array([r.label for r in dataset.records], dtype=np.int64),
        masks=masks,
        variants=np.array([r.variant for r in dataset.records]),
        groups=np.array([r.group for r in dataset.records]),
        splits=np.array([r.split for r in dataset.records]),
        **names,
    )


def write_dataset(
    dataset: AuditDataset,
    out_dir: str | Path,
    *,
    fmt: str = "png",
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Writes ``dataset`` to ``out_dir`` (see module docstring); returns the folder."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")
    target = Path(out_dir).expanduser()
    if target.exists() and not overwrite:
        raise OutputExistsError("overwrite", f"is off and {target} already exists: choose another folder, "
                                             "or allow replacing it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (_write_png_folder if fmt == "png" else _write_npz)(dataset, staging, progress or (lambda n: None))
        meta = {
            "name": dataset.info.name,
            **({"findings": list(dataset.classes)} if dataset.label_kind == MULTILABEL else
               {"classes": list(dataset.classes)}),
            "label_kind": dataset.label_kind,
            "mask_meaning": dataset.info.mask_meaning,
            "generator": dataset.info.generator,
            "source": dataset.info.source,
            "format": fmt,
            "summary": dataset.summary(),
            "written_by": f"auditkit {__version__}",
        }
        (staging / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
