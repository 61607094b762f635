"""Data files that would train silently wrong or fail deep inside torch are refused, naming the
file: float or negative labels, labels beyond the models' classes, images of another size, empty
files, and compressed files that unpack to more than their header declares (read no further)."""

from __future__ import annotations

import gzip
import struct
import tracemalloc

import numpy as np
import pytest
from conftest import write_idx, write_idx_folder

from dropkit.lab import data
from dropkit.lab.cli import main
from dropkit.lab.data import load_idx_folder, read_idx
from dropkit.lab.train import load_splits

CLI_SMALL = ["--epochs", "1", "--val-size", "5", "--quiet"]


def _replace(folder, stem, array):
    """Overwrite one of the folder's four files with ``array``; returns its path."""
    return write_idx(folder / f"{stem}-idx{array.ndim}-ubyte.gz", array)


@pytest.mark.parametrize(("labels", "words"), [
    ((np.arange(40) % 10).astype(">f4"), ("labels must be integers", "float32")),
    ((np.arange(40) % 10).astype(">f8"), ("labels must be integers", "float64")),
    (np.full(40, -1, np.int8), ("labels must be >= 0", "-1")),
    (np.zeros(0, np.uint8), ("holds no labels",)),
])
def test_label_files_of_the_wrong_kind_are_refused_and_named(tmp_path, labels, words):
    folder = write_idx_folder(tmp_path / "d")
    path = _replace(folder, "train-labels", labels)
    with pytest.raises(ValueError) as err:
        load_idx_folder(folder)
    assert str(path) in str(err.value) and all(word in str(err.value) for word in words)


def test_labels_of_every_integer_type_load_as_int64(tmp_path):
    folder = write_idx_folder(tmp_path / "d")
    for dtype in (np.uint8, np.int8, ">i2", ">i4"):
        _replace(folder, "train-labels", (np.arange(40) % 10).astype(dtype))
        assert load_idx_folder(folder).train.labels.tolist() == [i % 10 for i in range(40)]


@pytest.mark.parametrize(("stem", "array", "words"), [
    ("train-labels", np.full(40, 10, np.uint8), ("label 10", "10 classes (0-9)")),
    ("t10k-labels", np.full(20, 200, np.uint8), ("label 200", "10 classes")),
    ("train-images", np.zeros((40, 32, 32), np.uint8), ("images are 32x32", "takes 28x28")),
])
def test_data_the_models_cannot_take_is_refused_naming_the_file(tmp_path, stem, array, words):
    folder = write_idx_folder(tmp_path / "d")
    if stem == "train-images":
        _replace(folder, "t10k-images", np.zeros((20, 32, 32), np.uint8))
    path = _replace(folder, stem, array)
    with pytest.raises(ValueError) as err:
        load_splits("mnist", str(folder), 5, None, None)
    assert str(path) in str(err.value) and all(word in str(err.value) for word in words)


def test_a_float_label_file_ends_the_command_with_one_line_naming_it(tmp_path, capsys):
    """The silently-wrong case: float32 labels used to be truncated to integers and trained on."""
    folder = write_idx_folder(tmp_path / "d")
    path = _replace(folder, "train-labels", ((np.arange(40) % 10) + 0.5).astype(">f4"))
    assert main(["train", *CLI_SMALL, "--data-dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dropkit train: error: ")
    assert str(path) in err and "labels must be integers" in err


# --- compressed files that unpack to more than they declare -----------------------------------

BOMB_ITEMS = 10
BOMB_ZEROS = 64 * 2**20


def _gzip_bomb(path, items=BOMB_ITEMS, zeros=BOMB_ZEROS):
    """A header claiming ``items`` 28x28 images, then ``zeros`` bytes of zeros, gzip-compressed
    chunk by chunk (about 64 KiB on disk for 64 MiB of zeros)."""
    header = struct.pack(">BBBB3I", 0, 0, 0x08, 3, items, 28, 28)
    chunk = bytes(2**20)
    with gzip.open(path, "wb") as handle:
        handle.write(header)
        for _ in range(zeros // len(chunk)):
            handle.write(chunk)
    return path


class _Counting:
    """A file object that counts the bytes read through it."""

    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def read(self, size=-1):
        chunk = self.inner.read(size)
        self.counter.append(len(chunk))
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()


def test_a_gzip_bomb_is_refused_after_reading_only_what_its_header_declares(tmp_path, monkeypatch):
    path = _gzip_bomb(tmp_path / "bomb-idx3-ubyte.gz")
    assert path.stat().st_size < 2**20  # a small file ...
    read = []
    real_open = gzip.open
    monkeypatch.setattr(data.gzip, "open", lambda *a, **k: _Counting(real_open(*a, **k), read))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as err:
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and "trailing bytes" in str(err.value) and "(10, 28, 28)" in str(err.value)
    declared = 16 + BOMB_ITEMS * 28 * 28
    assert sum(read) == declared + 1  # ... that unpacks to 64 MiB: one byte past the declared data, no more
    assert peak < 2**20  # bytes allocated while reading it, against the 64 MiB it unpacks to


def test_a_raw_file_longer_than_declared_is_refused_before_its_data_is_read(tmp_path, monkeypatch):
    path = tmp_path / "long-idx3-ubyte"
    path.write_bytes(struct.pack(">BBBB3I", 0, 0, 0x08, 3, 2, 28, 28) + bytes(4 * 2**20))
    read = []
    real_read = data._read_up_to
    monkeypatch.setattr(data, "_read_up_to", lambda stream, size: read.append(size) or real_read(stream, size))
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(path)
    assert read == [4, 12]  # the header only


def test_a_gzip_file_exactly_as_declared_still_loads(tmp_path):
    array = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    path = write_idx(tmp_path / "ok-idx3-ubyte.gz", array)
    assert np.array_equal(read_idx(path).numpy(), array)
