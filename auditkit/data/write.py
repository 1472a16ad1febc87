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
from .dataset import AuditDataset
from .images import to_uint8

FORMATS = ("png", "npz")


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels.ndim == 3:
        pixels = np.ascontiguousarray(pixels[:, :, ::-1])  # OpenCV writes BGR
    if not cv2.imwrite(str(path), pixels):
        raise DataError(f"{path}: could not write the image")


def _write_png_folder(dataset: AuditDataset, folder: Path, progress: Callable[[int], None]) -> None:
    counters: dict[tuple[str, str], int] = {}
    with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "variant", "group", "mask"])
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
                [str(Path("images") / relative), dataset.classes[sample.label], record.split, record.variant,
                 record.group, mask_path]
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
    np.savez_compressed(
        folder / "dataset.npz",
        images=images,
        labels=np.array([s.label for s in samples], dtype=np.int64),
        masks=masks,
        variants=np.array([r.variant for r in dataset.records]),
        groups=np.array([r.group for r in dataset.records]),
        splits=np.array([r.split for r in dataset.records]),
        classes=np.array(dataset.classes),
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
            "classes": list(dataset.classes),
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
