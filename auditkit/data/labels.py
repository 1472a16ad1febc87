"""Labels beyond one class per image: multi-label findings and per-image or per-finding artefact flags,
read from table rows (manifest.csv, a folder's labels.csv) and .npz arrays (docs/data.md, "Label kinds").

Two ways a table says which findings an image has, never both in one table:
- a ``labels`` column: the findings separated by ``|`` (``effusion|pneumothorax``); empty, ``No Finding``
  or ``none`` = no finding (NIH ChestX-ray14 writes ``Finding Labels`` this way);
- one 0/1 column per finding: ``finding:NAME`` columns, or columns named by the declared findings
  (the ``findings`` option or ``dataset.json``'s ``findings``). Cells: 0, 1, 0.0, 1.0, true, false.
Whether an image has the artefact, for subgroup audits: an ``artefact`` column (per image), or
``artefact:NAME`` columns (per finding; a finding without a column is "not annotated"), 0/1.
Anything else (other values, an unknown finding, an empty finding list, two conventions) is one
DataError line naming the column or finding.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import DataError, short_list
from .dataset import BINARY, LABEL_KINDS, MULTILABEL, ORDER_DECLARED, SOFTMAX, AuditDataset, DatasetInfo, Record

SEPARATOR = "|"
NO_FINDING = ("no finding", "none")  # a ``labels`` cell meaning "no finding" (unless a finding is so named)
FINDING_PREFIX = "finding:"
ARTEFACT_COLUMNS = ("artefact", "artifact")
ARTEFACT_PREFIXES = ("artefact:", "artifact:")
_ONE, _ZERO = ("1", "1.0", "true"), ("0", "0.0", "false")

__all__ = ["BINARY", "LABEL_KINDS", "MULTILABEL", "SOFTMAX", "declared_findings", "label_kind", "npz_artefacts",
           "npz_findings", "npz_multilabel", "reorder_findings", "table_artefacts", "table_convention",
           "table_findings"]


def label_kind(value, where: str) -> str:
    """A checked label kind (softmax, binary, multilabel; case and spaces ignored)."""
    kind = str(value).strip().lower().replace("-", "")
    if kind not in LABEL_KINDS:
        raise DataError(f"{where}: label_kind must be {', '.join(LABEL_KINDS)}; got {value!r}")
    return kind


def declared_findings(value, where: str) -> list[str] | None:
    """The finding names of a ``findings`` list (dataset.json, the option; a comma-separated string
    too): non-empty, none twice (case-insensitively: table columns are matched without case)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise DataError(f"{where}: findings must be a list of names; got {type(value).__name__}")
    names = [str(v).strip() for v in value]
    if not names:
        raise DataError(f"{where}: the finding list is empty; name at least one finding")
    if not all(names):
        raise DataError(f"{where}: findings must be non-empty names; got {names}")
    if any(SEPARATOR in n for n in names):
        raise DataError(f"{where}: finding names cannot contain {SEPARATOR!r} (the separator); got {names}")
    lowered = [n.lower() for n in names]
    twice = sorted({n for n, low in zip(names, lowered) if lowered.count(low) > 1})
    if twice:
        raise DataError(f"{where}: finding {twice[0]!r} is named twice in the findings")
    return names


def _bit(cell: str, column: str, where: str) -> int:
    text = cell.strip().lower()
    if text in _ONE:
        return 1
    if text in _ZERO:
        return 0
    raise DataError(f"{where}: column {column} must be 0 or 1; got {cell!r}")


# ---- tables -------------------------------------------------------------------------------------


def table_convention(fields: list[str], declared: list[str] | None, where: str) -> str | None:
    """How a table gives its labels: None (one ``label`` column: softmax or binary classes), "labels"
    (findings in one column) or "columns" (a 0/1 column per finding). ``fields``: lower-cased column
    names. DataError when the table mixes conventions."""
    per_finding = [f for f in fields if f.startswith(FINDING_PREFIX)]
    if declared is not None:
        per_finding += [f for f in fields if f in {d.lower() for d in declared} and f not in ("label", "labels")]
    used = [name for name, present in (("label", "label" in fields), ("labels", "labels" in fields),
                                       ("one column per finding", bool(per_finding))) if present]
    if len(used) > 1:
        extra = f" ({short_list(per_finding, 3)})" if per_finding else ""
        raise DataError(f"{where}: mixed label conventions: {' and '.join(used)}{extra}; give the findings one way "
                        f"(a labels column separated by {SEPARATOR!r}, or one 0/1 column per finding)")
    if "labels" in fields:
        return "labels"
    if per_finding or (declared is not None and "label" not in fields):
        return "columns"
    if declared is not None:
        raise DataError(f"{where}: findings are declared ({short_list(declared, 4)}) but the table has one "
                        "`label` column (one class per image); give a labels column or one 0/1 column per finding")
    return None


def table_findings(rows: list[dict[str, str]], header: list[str], convention: str, declared: list[str] | None,
                   where: str, first_line: int = 2) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    """(the findings in order, each row's 0/1 tuple) of a multi-label table; ``header``: the column
    names as written (finding names keep their case), ``rows``: keyed by lower-cased names."""
    if convention == "labels":
        cells = []
        for line, row in enumerate(rows, start=first_line):
            text = row.get("labels", "")
            names = [n.strip() for n in text.split(SEPARATOR) if n.strip()]
            if len(names) == 1 and names[0].lower() in NO_FINDING and not (
                    declared and names[0].lower() in {d.lower() for d in declared}):
                names = []
            cells.append((line, names))
        present = sorted({n for _, names in cells for n in names})
        findings = declared if declared is not None else present
        if not findings:
            raise DataError(f"{where}: the finding list is empty: the labels column names no finding in any row "
                            "and no findings are declared (dataset.json's findings, the findings option)")
        known = set(findings)
        labels = []
        for line, names in cells:
            unknown = [n for n in names if n not in known]
            if unknown:
                hint = (f"; separate findings with {SEPARATOR!r}" if any(c in unknown[0] for c in ",;/")
                        else "")
                raise DataError(f"{where}:{line}: finding {unknown[0]!r} in column labels is not among the findings "
                                f"({short_list(findings)}){hint}")
            labels.append(tuple(int(f in names) for f in findings))
        return tuple(findings), labels
    original = {h.strip().lower(): h.strip() for h in header}
    prefixed = [f for f in original if f.startswith(FINDING_PREFIX)]
    if prefixed:
        columns = {original[f][len(FINDING_PREFIX):].strip(): f for f in prefixed}
        if not all(columns):
            raise DataError(f"{where}: a column named {FINDING_PREFIX!r} names no finding")
        if declared is not None:
            by_lower = {name.lower(): column for name, column in columns.items()}
            unknown = [n for n in columns if n.lower() not in {d.lower() for d in declared}]
            if unknown:
                raise DataError(f"{where}: column {FINDING_PREFIX}{unknown[0]} is not among the declared findings "
                                f"({short_list(declared)})")
            missing = [d for d in declared if d.lower() not in by_lower]
            if missing:
                raise DataError(f"{where}: finding {missing[0]!r} is declared but has no column {FINDING_PREFIX}"
                                f"{missing[0]}")
            columns = {d: by_lower[d.lower()] for d in declared}
        findings = list(columns)
    else:
        assert declared is not None  # table_convention returns "columns" without prefixes only when declared
        missing = [d for d in declared if d.lower() not in original]
        if missing:
            raise DataError(f"{where}: finding {missing[0]!r} is declared but the table has no column {missing[0]} "
                            f"(or {FINDING_PREFIX}{missing[0]}); it has {short_list(original.values(), 8)}")
        columns = {d: d.lower() for d in declared}
        findings = declared
    labels = [tuple(_bit(row.get(columns[f], ""), original[columns[f]], f"{where}:{line}") for f in findings)
              for line, row in enumerate(rows, start=first_line)]
    return tuple(findings), labels


def table_artefacts(rows: list[dict[str, str]], header: list[str], findings: tuple[str, ...] | None, where: str,
                    first_line: int = 2) -> tuple[str, list[tuple[int, ...]]]:
    """(artefact_scope, each row's flags) from ``artefact`` (per image) or ``artefact:NAME`` (per finding of
    a multi-label table; -1 for a finding without a column) columns; ("", []) when there are none."""
    fields = [h.strip().lower() for h in header]
    image = [f for f in fields if f in ARTEFACT_COLUMNS]
    per_finding = [f for f in fields if f.startswith(ARTEFACT_PREFIXES)]
    if image and per_finding:
        raise DataError(f"{where}: mixed artefact conventions: columns {image[0]} and {per_finding[0]}; give one "
                        "artefact column per image or one per finding")
    if len(image) > 1:
        raise DataError(f"{where}: columns {image[0]} and {image[1]} both give the artefact; keep one")
    if image:
        return "image", [(_bit(row.get(image[0], ""), image[0], f"{where}:{line}"),)
                         for line, row in enumerate(rows, start=first_line)]
    if not per_finding:
        return "", []
    if findings is None:
        raise DataError(f"{where}: column {per_finding[0]} gives the artefact per finding, but the table has one "
                        "class per image; use an artefact column (0/1 per image)")
    original = {h.strip().lower(): h.strip() for h in header}
    lowered = [f.lower() for f in findings]
    index: dict[int, str] = {}
    for column in per_finding:
        name = column.split(":", 1)[1].strip()
        if name not in lowered:
            raise DataError(f"{where}: column {original[column]} names no finding; findings: {short_list(findings)}")
        index[lowered.index(name)] = column
    flags = []
    for line, row in enumerate(rows, start=first_line):
        flags.append(tuple(_bit(row.get(index[k], ""), original[index[k]], f"{where}:{line}") if k in index else -1
                           for k in range(len(findings))))
    return "finding", flags


# ---- npz ------------------------------------------------------------------------------------


def _bits(array: np.ndarray, what: str, where: str, names=None) -> np.ndarray:
    """An array of 0/1 (bool, integers or floats equal to 0 or 1) as int64; DataError naming ``what`` (and
    the finding of the bad column, from ``names``)."""
    if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)
            or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{where}: {what} must be 0/1 numbers; got {array.dtype}")
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        finding = f" (finding {names[position[1]]!r})" if names is not None and len(position) == 2 else ""
        raise DataError(f"{where}: {what} must be 0 or 1; found {array[position].item()!r} at {position}{finding}")
    return array.astype(np.int64)


def npz_findings(labels: np.ndarray, stored: list[str] | None, declared: list[str] | None,
                 where: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(findings, (N, K) int64 0/1) of an .npz's (N, K) ``labels``; ``stored``: its ``findings`` array,
    ``declared``: the option or dataset.json (matched by name, or naming unnamed columns)."""
    k = labels.shape[1]
    if k == 0:
        raise DataError(f"{where}: labels have shape {labels.shape}: the finding list is empty")
    named, what = (stored, "the archive's findings") if stored is not None else (declared, "the declared findings")
    if named is not None and len(named) != k:
        raise DataError(f"{where}: {len(named)} names in {what} for {k} label columns")
    if stored is None and declared is None:
        raise DataError(f"{where}: (N, {k}) labels need their finding names: a findings array of {k} names in the "
                        "archive, or dataset.json's findings")
    bits = _bits(labels, "the (N, K) labels", where, stored or declared)
    if stored is None or declared is None:
        return tuple(stored or declared), bits
    unknown = [d for d in declared if d not in stored]
    if unknown or len(declared) != len(stored):
        name = unknown[0] if unknown else next(s for s in stored if s not in declared)
        raise DataError(f"{where}: finding {name!r} is not in both the archive's findings ({short_list(stored)}) "
                        f"and the declared ones ({short_list(declared)})")
    return tuple(declared), bits[:, [stored.index(d) for d in declared]]


def npz_artefacts(artefact: np.ndarray | None, n: int, findings: tuple[str, ...] | None,
                  where: str) -> tuple[str, list[tuple[int, ...]]]:
    """(artefact_scope, per-record flags) of an .npz's ``artefact`` array: (N,) per image, (N, K) per finding."""
    if artefact is None:
        return "", []
    if artefact.shape == (n,):
        return "image", [(int(v),) for v in _bits(artefact, "artefact", where)]
    if findings is not None and artefact.shape == (n, len(findings)):
        return "finding", [tuple(int(v) for v in row) for row in _bits(artefact, "artefact", where, findings)]
    wanted = f"({n},)" + (f" or ({n}, {len(findings)})" if findings is not None else "")
    raise DataError(f"{where}: artefact must have shape {wanted}; got {artefact.shape}")


def npz_multilabel(path, images, labels, masks, columns, stored, artefact, meta, folder, option,
                   meaning: str) -> AuditDataset:
    """The multilabel dataset of an .npz with (N, K) labels (auditkit/data/readers.py ``read_npz``): ``columns``
    its variants, groups and splits, ``meta`` the dataset.json in ``folder``, ``option`` the findings option."""
    meta_path = folder / "dataset.json"
    if meta.get("label_kind") is not None and label_kind(meta["label_kind"], str(meta_path)) != MULTILABEL:
        raise DataError(f"{meta_path}: label_kind is {meta['label_kind']} but {path} has (N, K) finding labels")
    if option is not None:
        declared, source = declared_findings(option, "the findings option"), "the findings option"
    else:
        given = meta.get("findings", meta.get("classes"))
        declared, source = declared_findings(given, str(meta_path)), str(meta_path)
    names, bits = npz_findings(labels, stored, declared, str(path))
    scope, flags = npz_artefacts(artefact, len(images), tuple(stored) if stored else names, str(path))
    if scope == "finding" and stored is not None and declared is not None:
        flags = [tuple(f[stored.index(d)] for d in declared) for f in flags]
    order = ORDER_DECLARED.format(source if declared is not None else f"{path} (array 'findings')")
    records = [
        Record(
            image=images[k],
            label=tuple(int(v) for v in bits[k]),
            mask=None if masks is None else masks[k],
            variant=columns["variants"][k] if columns["variants"] else "original",
            group=columns["groups"][k] if columns["groups"] else "",
            split=columns["splits"][k] if columns["splits"] else "",
            artefact=flags[k] if flags else (),
        )
        for k in range(len(images))
    ]
    info = DatasetInfo(name=path.stem, source=str(path), classes=names, class_order=order,
                       mask_meaning=meaning, label_kind=MULTILABEL, artefact_scope=scope)
    return AuditDataset(records, info)


# ---- datasets ---------------------------------------------------------------------------------


def reorder_findings(dataset: AuditDataset, findings, where: str = "findings") -> AuditDataset:
    """A multilabel ``dataset`` with its findings (and every label and per-finding artefact tuple) in the
    order ``findings`` gives, by name; DataError for a finding it lacks or one left out."""
    declared = declared_findings(findings, where)
    have = list(dataset.classes)
    unknown = [f for f in declared if f not in have]
    if unknown or len(declared) != len(have):
        name = unknown[0] if unknown else next(f for f in have if f not in declared)
        raise DataError(f"{where}: finding {name!r} is not in both the dataset's findings ({', '.join(have)}) and "
                        f"the given ones ({', '.join(declared)})")
    if declared == have:
        return dataset
    order = [have.index(f) for f in declared]
    scoped = dataset.info.artefact_scope == "finding"
    records = [replace(r, label=tuple(r.label[k] for k in order),
                       artefact=tuple(r.artefact[k] for k in order) if scoped and r.artefact else r.artefact)
               for r in dataset.records]
    info = replace(dataset.info, classes=tuple(declared), class_order=ORDER_DECLARED.format(where))
    return AuditDataset(records, info, channels=dataset.channels, image_size=dataset.image_size)
