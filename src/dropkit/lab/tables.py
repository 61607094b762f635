"""Feature tables for learners that take rows of numbers (tree ensembles): images flattened, or a
CSV/Parquet file with one target column.

A :class:`Table` holds training, validation and test parts as numpy arrays, ``X`` float32 of shape
``(N, features)`` and ``y`` int64 class indices. Images come from :mod:`dropkit.lab.data` with the
lab's own splits (the official test set, and :func:`~dropkit.lab.data.split_validation`'s
validation set, the same whatever the training seed), pixels scaled to [0, 1]. A file is split
once, by a permutation seeded with 0, so every setting and every seed sees the same rows.

CSV files are read with the standard library: a header row naming the columns, then one row per
example. Feature cells must be numbers; an empty cell (or ``NA``, ``NaN``, ``nan``) is a missing
value (NaN, which tree learners route on their own). The target may hold numbers or strings; its
distinct values, sorted, become the classes. Parquet needs ``pyarrow``.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dropkit.lab.data import Split, load_dataset, split_validation

__all__ = ["Part", "Table", "image_table", "read_table", "split_table", "table_from_file"]

#: cell texts read as a missing value
MISSING = frozenset({"", "na", "nan", "null"})


@dataclass(frozen=True)
class Part:
    """Rows and their class indices: ``X`` float32 ``(N, F)``, ``y`` int64 ``(N,)``."""

    X: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Table:
    """A classification table split three ways, with its feature and class names."""

    name: str
    train: Part
    val: Part
    test: Part
    features: tuple[str, ...]
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _cell(path: Path, line: int, column: str, text: str) -> float:
    text = text.strip()
    if text.lower() in MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: line {line}, column {column!r}: {text!r} is not a number "
                         "(feature columns must be numeric; empty cells are missing values)") from None


def _read_csv(path: Path, target: str) -> tuple[list[str], np.ndarray, list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header row naming the columns")
        header = [name.strip() for name in header]
        if target not in header:
            raise ValueError(f"{path}: no column {target!r} for --target (columns: {', '.join(header)})")
        where = header.index(target)
        features = [name for i, name in enumerate(header) if i != where]
        rows, labels = [], []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}: line {line} has {len(row)} cells, the header has {len(header)}")
            labels.append(row[where].strip())
            rows.append([_cell(path, line, header[i], text) for i, text in enumerate(row) if i != where])
    X = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(features))
    return features, X, labels


def _read_parquet(path: Path, target: str) -> tuple[list[str], np.ndarray, list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs the package pyarrow (pip install pyarrow), "
                         "or convert the file to CSV") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError for a broken file
        raise ValueError(f"{path}: cannot read as Parquet ({err})") from err
    if target not in table.column_names:
        raise ValueError(f"{path}: no column {target!r} for --target (columns: {', '.join(table.column_names)})")
    features = [name for name in table.column_names if name != target]
    columns = []
    for name in features:
        column = table.column(name).to_numpy(zero_copy_only=False)
        if not (np.issubdtype(column.dtype, np.number) or column.dtype == np.bool_):
            raise ValueError(f"{path}: column {name!r} holds {column.dtype} values; feature columns must be numeric")
        columns.append(column.astype(np.float32))
    X = np.stack(columns, axis=1) if columns else np.zeros((table.num_rows, 0), np.float32)
    labels = [str(v) for v in table.column(target).to_pylist()]
    return features, X, labels


def _encode(path: Path, target: str, labels: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices from the target's texts: numbers sort as numbers, anything else as text."""
    if any(label.lower() in MISSING for label in labels):
        raise ValueError(f"{path}: column {target!r} (the target) has empty or missing values")
    distinct = set(labels)
    try:
        classes = sorted(distinct, key=float)
    except ValueError:
        classes = sorted(distinct)
    if len(classes) < 2:
        raise ValueError(f"{path}: column {target!r} (the target) holds {len(classes)} class; need at least 2")
    index = {label: i for i, label in enumerate(classes)}
    return np.array([index[label] for label in labels], dtype=np.int64), tuple(classes)


def read_table(path: str | os.PathLike, target: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """Read a CSV (``.csv``) or Parquet (``.parquet``, ``.pq``) file.

    Returns ``(X, y, features, classes)``: float32 features, int64 class indices, the feature
    column names and the class names (the target's distinct values, sorted).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown suffix, a missing target column, a non-numeric feature cell, a
            ragged row, or Parquet without pyarrow; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        features, X, labels = _read_csv(path, target)
    elif suffix in (".parquet", ".pq"):
        features, X, labels = _read_parquet(path, target)
    else:
        raise ValueError(f"{path}: unknown table format {suffix!r}: --data accepts .csv, .parquet or .pq files")
    if not labels:
        raise ValueError(f"{path}: no rows after the header")
    if not features:
        raise ValueError(f"{path}: no feature columns besides the target {target!r}")
    y, classes = _encode(path, target, labels)
    return X, y, tuple(features), classes


def split_table(
    X: np.ndarray, y: np.ndarray, *, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0,
) -> tuple[Part, Part, Part]:
    """Split rows into ``(train, val, test)`` by one permutation drawn with ``seed``.

    The fractions are of all rows; each part that is asked for gets at least one row, and training
    keeps at least one.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    n = len(y)
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n_test + n_val >= n:
        raise ValueError(f"{n} rows cannot give {n_val} validation and {n_test} test rows and still train on one")
    order = np.random.default_rng(seed).permutation(n)
    test_idx, val_idx, train_idx = (np.sort(order[:n_test]), np.sort(order[n_test:n_test + n_val]),
                                    np.sort(order[n_test + n_val:]))
    return tuple(Part(X[idx], y[idx]) for idx in (train_idx, val_idx, test_idx))  # type: ignore[return-value]


def table_from_file(
    path: str | os.PathLike, target: str, *, val_fraction: float = 0.2, test_fraction: float = 0.2,
    limit_train: int | None = None,
) -> Table:
    """A :class:`Table` from a CSV or Parquet file (see :func:`read_table` and :func:`split_table`)."""
    X, y, features, classes = read_table(path, target)
    train, val, test = split_table(X, y, val_fraction=val_fraction, test_fraction=test_fraction)
    if limit_train is not None:
        train = Part(train.X[:limit_train], train.y[:limit_train])
    return Table(Path(path).name, train, val, test, features, classes)


def image_table(
    dataset: str = "mnist", data_dir: str | os.PathLike | None = None, *, val_size: int = 5000,
    limit_train: int | None = None, limit_test: int | None = None,
) -> Table:
    """A lab image dataset as a :class:`Table`: pixels flattened and scaled to [0, 1].

    The splits are the lab's own (see :func:`dropkit.lab.data.split_validation`), so a tree
    ensemble and a network trained with the same ``val_size`` and limits see the same examples.

    Example::

        table = image_table("fashion-mnist", limit_train=5000)
        table.train.X.shape   # (5000, 784)
    """
    ds = load_dataset(dataset, data_dir)
    train, val = split_validation(ds.train, val_size) if val_size else (ds.train, ds.train.head(0))
    train, test = train.head(limit_train), ds.test.head(limit_test)

    def part(split: Split) -> Part:
        images = split.images.reshape(len(split), -1).numpy()
        return Part(images.astype(np.float32) / 255.0, split.labels.numpy().astype(np.int64))

    pixels = tuple(f"pixel{i}" for i in range(ds.train.images[0].numel()))
    classes = tuple(str(c) for c in range(ds.num_classes))
    return Table(ds.name, part(train), part(val), part(test), pixels, classes)
