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
from .meaning import mask_meaning as parse_meaning
from .readers import (
    apply_folder_meta,
    read_box_csv,
    read_image_folder,
    read_manifest_folder,
    read_npz,
    reindex_classes,
)


def open_dataset(
    spec: str | Path,
    *,
    split: str | None = None,
    variant: str | list[str] | None = None,
    mask_meaning: str | None = None,
    classes: str | list[str] | tuple[str, ...] | None = None,
) -> AuditDataset:
    """Opens any supported dataset; ``split``/``variant`` select a subset.

    ``classes`` (names in index order, or one comma-separated string: the CLI's ``--classes``)
    fixes the class order for every layout, over a ``dataset.json``'s ``classes``. Without either,
    folder trees follow torchvision's ImageFolder (folder names sorted as text) and tables sort
    their labels (numerically when all are integers); see docs/data.md. Raises DataError for labels
    the given classes lack.

    ``mask_meaning`` (artefact, object; the CLI's --masks-mark) says what the masks mark, over a
    ``dataset.json``'s and the default (the artefact, for every layout: auditkit/data/meaning.py).
    """
    text = str(spec)
    if text.startswith("builtin:"):
        dataset = builtin_dataset(text)
        if classes is not None:
            dataset = reindex_classes(dataset, classes, "the classes option")
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir():
            if (path / "manifest.csv").is_file():
                dataset = read_manifest_folder(path, classes)
            elif (path / "dataset.npz").is_file():
                dataset = read_npz(path / "dataset.npz", classes, meta_folder=path)
                apply_folder_meta(dataset, path)
            else:
                dataset = read_image_folder(path, classes)
        elif path.suffix.lower() == ".npz":
            dataset = read_npz(path, classes)
        elif path.suffix.lower() == ".csv":
            dataset = read_box_csv(path, classes)
        else:
            raise DataError(
                f"{path}: not a dataset; give a folder (manifest.csv or split/class/*.png), "
                "a .csv of bounding boxes, a .npz, or builtin:NAME"
            )
    if mask_meaning is not None:
        dataset.info.mask_meaning = parse_meaning(mask_meaning)
    if split is not None or variant is not None:
        dataset = dataset.select(split=split, variant=variant)
    return dataset
