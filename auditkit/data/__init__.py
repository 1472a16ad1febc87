"""Datasets with known or suspected shortcuts: generators, sources, readers, writers.

    open_dataset(spec, split=..., variant=...)   any supported source -> AuditDataset
    make_dataset(kind, source=..., seed=...)      contaminate real digits or user data
    write_dataset(dataset, out_dir, fmt=...)      png + manifest.csv, or npz
    make_contamination(kind, **params)            generators; .apply() contaminates a batch
"""

from __future__ import annotations

from .builtin import BUILTINS, builtin_dataset, make_dataset
from .contaminations import CONTAMINATIONS, contaminate_dataset, make_contamination
from .dataset import AuditDataset, Batch, DatasetInfo, Record, Sample, collate, make_loader
from .entry import open_dataset
from .images import to_uint8
from .sources import SOURCES, load_source, stratified_split
from .write import write_dataset

__all__ = [
    "BUILTINS",
    "CONTAMINATIONS",
    "SOURCES",
    "AuditDataset",
    "Batch",
    "DatasetInfo",
    "Record",
    "Sample",
    "builtin_dataset",
    "collate",
    "contaminate_dataset",
    "load_source",
    "make_contamination",
    "make_dataset",
    "make_loader",
    "open_dataset",
    "stratified_split",
    "to_uint8",
    "write_dataset",
]
