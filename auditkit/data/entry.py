"""Where data enters auditkit: ``open_dataset`` reads any supported dataset.

It dispatches on the spec (``builtin:NAME?options``, a folder, a ``.csv`` of boxes, a ``.npz``) to
the generators (builtin.py) and the file readers (readers.py), which never import each other or this
module.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .builtin import builtin_dataset
from .dataset import AuditDataset
from .readers import apply_folder_meta, read_box_csv, read_image_folder, read_manifest_folder, read_npz


def open_dataset(
    spec: str | Path,
    *,
    split: str | None = None,
    variant: str | list[str] | None = None,
    mask_meaning: str | None = None,
) -> AuditDataset:
    """Opens any supported dataset; ``split``/``variant`` select a subset."""
    text = str(spec)
    if text.startswith("builtin:"):
        dataset = builtin_dataset(text)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir():
            if (path / "manifest.csv").is_file():
                dataset = read_manifest_folder(path)
            elif (path / "dataset.npz").is_file():
                dataset = read_npz(path / "dataset.npz")
                apply_folder_meta(dataset, path)
            else:
                dataset = read_image_folder(path)
        elif path.suffix.lower() == ".npz":
            dataset = read_npz(path)
        elif path.suffix.lower() == ".csv":
            dataset = read_box_csv(path)
        else:
            raise DataError(
                f"{path}: not a dataset; give a folder (manifest.csv or split/class/*.png), "
                "a .csv of bounding boxes, a .npz, or builtin:NAME"
            )
    if mask_meaning is not None:
        dataset.info.mask_meaning = mask_meaning
    if split is not None or variant is not None:
        dataset = dataset.select(split=split, variant=variant)
    return dataset
