"""Issue 28, item 3: the repair from discovered masks against the repair from the true masks.

Per kind and seed (one pair per process, so pairs can run side by side on a small CPU):

1. the kinds table's shortcut model (auditkit/reproduce.py ``kinds``: tap-cnn trained on the
   contaminated variant of the train split, seeded);
2. ``run_discovery`` on the contaminated train split with masks and variants withheld, what a user
   without annotations has (discovery seeded like the model); ``proposed_dataset`` is its output;
3. the same repair (TAP with its defaults, the first method of ``--method auto`` and the one the
   discovery's recommendation starts with) from the true masks and from the discovered ones;
4. test accuracy of both on the built-in test split's variants, and the discovered masks' quality
   against the true ones (marked images masked with IoU >= 0.5, unmarked images masked).

    python tools/discovered_vs_true.py --kind marker --seed 0 --out results/dvt-marker-0.json

``--table results/dvt-*.json`` prints the docs/discover.md table from the JSON files.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time
from pathlib import Path

import numpy as np

from auditkit.data import AuditDataset
from auditkit.data.dataset import Record
from auditkit.data import open_dataset
from auditkit.discover import DiscoveryConfig, proposed_dataset, run_discovery
from auditkit.reproduce import KINDS, _copy, _variants, repair_model, trained
from auditkit.training import evaluate


def stripped(dataset: AuditDataset) -> AuditDataset:
    """``dataset`` without its masks (a user's data before discovery)."""
    return AuditDataset([Record(r.image, r.label, None, r.variant, r.group, r.split) for r in dataset.records],
                        dataset.info, channels=dataset.channels, image_size=dataset.image_size)


def mask_quality(truth: AuditDataset, found: AuditDataset) -> dict:
    """Coverage (marked images masked with IoU >= 0.5) and false masks (unmarked images masked)."""
    marked = covered = unmarked = false = identical = 0
    ious = []
    for t, f in zip(truth.records, found.records):
        true_mask = None if t.mask is None else np.asarray(t.mask) > 127
        found_mask = None if f.mask is None else np.asarray(f.mask) > 127
        if true_mask is not None and true_mask.any():
            marked += 1
            if found_mask is not None:
                iou = (true_mask & found_mask).sum() / max(1, (true_mask | found_mask).sum())
                covered += bool(iou >= 0.5)
                identical += bool((true_mask == found_mask).all())
                ious.append(float(iou))
            else:
                ious.append(0.0)
        else:
            unmarked += 1
            false += found_mask is not None and bool(found_mask.any())
    return {"marked": marked, "covered_iou50": covered, "identical": identical,
            "median_iou": float(np.median(ious)) if ious else None, "unmarked": unmarked, "falsely_masked": false}


def accuracy(model, test) -> dict:
    return {k: round(float(v.accuracy), 4) for k, v in _variants(evaluate(model, test)).items()}


def run(kind: str, seed: int, split: str, method: str, out: Path) -> None:
    data = open_dataset(KINDS[kind])
    test = data.select(split="test")
    row: dict = {"kind": kind, "seed": seed, "split_analysed": split, "method": method, "arch": "tap-cnn"}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(row, indent=1))  # after every step: a killed run keeps what it measured

    started = time.perf_counter()
    shortcut = trained(data, "tap-cnn", "contaminated", seed)
    row["shortcut"] = {"test": accuracy(shortcut, test), "seconds": round(time.perf_counter() - started, 1)}
    save()
    truth = data.select(split=split, variant="contaminated")
    started = time.perf_counter()
    report = run_discovery(shortcut, stripped(truth), DiscoveryConfig(seed=seed))
    found = proposed_dataset(truth, report)
    row["discovery"] = {"verdict": report.data["verdict"], "recommendation": report.data["recommendation"]["method"],
                        "masks": mask_quality(truth, found), "seconds": round(time.perf_counter() - started, 1)}
    save()
    for name, repair_data in (("true masks", data), ("discovered masks", found)):
        started = time.perf_counter()
        try:
            model = repair_model(_copy(shortcut), repair_data, method, seed)
            row[name] = {"test": accuracy(model, test), "seconds": round(time.perf_counter() - started, 1)}
        except Exception as error:  # noqa: BLE001 - no masks at all is a result of this table, not a crash
            row[name] = {"error": str(error).split("\n")[0]}
        save()
    print(json.dumps(row), flush=True)


def table(paths: list[str]) -> str:
    """The docs/discover.md table: per kind, the shortcut model and both repairs, per seed."""
    rows: dict = {}
    for path in sorted(paths):
        row = json.loads(Path(path).read_text())
        rows.setdefault(row["kind"], []).append(row)
    seeds = sorted({r["seed"] for group in rows.values() for r in group})
    lines = [f"| kind | masks | masked (IoU ≥ 0.5) | permuted, seeds {seeds} (mean) | clean (mean) |",
             "| --- | --- | --- | --- | --- |"]

    def cell(values):
        return " / ".join(f"{v:.3f}" for v in values) + f" ({statistics.fmean(values):.3f})" if values else "–"

    for kind, group in rows.items():
        group.sort(key=lambda r: r["seed"])
        for name, label in (("shortcut", "none (shortcut)"), ("true masks", "true"),
                            ("discovered masks", "discovered")):
            done = [r for r in group if "test" in r.get(name, {})]
            masked = "–"
            if name == "discovered masks":
                found = [r["discovery"]["masks"] for r in group if "discovery" in r]
                masked = " / ".join(f"{m['covered_iou50']:,}" for m in found)  # of the marked: the caption
            lines.append(f"| {kind} | {label} | {masked} | "
                         f"{cell([r[name]['test']['permuted'] for r in done])} | "
                         f"{cell([r[name]['test']['clean'] for r in done])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="marker", choices=sorted(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", help="split analysed by discovery (the repair trains on it)")
    parser.add_argument("--method", default="tap")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", nargs="*", help="JSON files to lay out as the docs table")
    args = parser.parse_args()
    if args.table is not None:
        print(table([p for pattern in args.table for p in glob.glob(pattern)]))
        return
    run(args.kind, args.seed, args.split, args.method, args.out)


if __name__ == "__main__":
    main()
