"""dropkit.lab.data: the IDX reader's checks, folder and dataset loading, splits, normalisation, batching."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import idx_bytes, write_idx, write_idx_folder

from dropkit.lab import data
from dropkit.lab.data import BatchIterator, Split, load_dataset, load_idx_folder, normalise, read_idx, split_validation


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trips_every_type_raw_and_gz(tmp_path, name, dtype):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    tensor = read_idx(write_idx(tmp_path / name, array))
    assert tensor.shape == (2, 3, 4)
    np.testing.assert_array_equal(tensor.numpy(), array)


def _assert_error_names(err: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_truncated_file_is_refused_and_named(tmp_path):
    good = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    path = write_idx(tmp_path / "cut-idx3-ubyte.gz", good[:-10])
    with pytest.raises(ValueError) as err:
        read_idx(path)
    _assert_error_names(err, path, "truncated", "(3, 28, 28)")


def test_trailing_bytes_are_refused(tmp_path):
    path = write_idx(tmp_path / "long-idx1-ubyte", idx_bytes(np.zeros(5, np.uint8)) + b"\x00")
    with pytest.raises(ValueError) as err:
        read_idx(path)
    _assert_error_names(err, path, "trailing bytes")


def test_wrong_magic_is_refused(tmp_path):
    raw = bytearray(idx_bytes(np.zeros(5, np.uint8)))
    raw[0] = 0x1F
    path = write_idx(tmp_path / "bad-idx1-ubyte", bytes(raw))
    with pytest.raises(ValueError) as err:
        read_idx(path)
    _assert_error_names(err, path, "magic")


def test_unknown_type_code_is_refused(tmp_path):
    raw = bytearray(idx_bytes(np.zeros(5, np.uint8)))
    raw[2] = 0x07
    path = write_idx(tmp_path / "code-idx1-ubyte", bytes(raw))
    with pytest.raises(ValueError) as err:
        read_idx(path)
    _assert_error_names(err, path, "type code 0x07")


@pytest.mark.parametrize("raw", [b"", b"\x00\x00", b"\x00\x00\x08\x03\x00\x00\x00\x05", b"\x00\x00\x08\x00"])
def test_short_or_rankless_headers_are_refused(tmp_path, raw):
    path = write_idx(tmp_path / "short-idx3-ubyte", raw)
    with pytest.raises(ValueError) as err:
        read_idx(path)
    _assert_error_names(err, path)


def test_missing_file_and_corrupt_gzip_name_the_file(tmp_path):
    missing = tmp_path / "nothing-idx1-ubyte"
    with pytest.raises(FileNotFoundError) as err:
        read_idx(missing)
    _assert_error_names(err, missing)
    corrupt = tmp_path / "corrupt-idx1-ubyte.gz"
    corrupt.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:20])
    with pytest.raises(ValueError) as err:
        read_idx(corrupt)
    _assert_error_names(err, corrupt, "gzip")


@pytest.mark.parametrize(("stem", "array", "words"), [
    ("train-images-idx3-ubyte.gz", np.zeros((40, 784), np.uint8), ("expected 3-D uint8 images", "2-D")),
    ("train-labels-idx1-ubyte.gz", np.zeros((40, 1), np.uint8), ("expected 1-D labels", "2-D")),
])
def test_image_and_label_files_of_the_wrong_rank_are_named(tmp_path, stem, array, words):
    folder = write_idx_folder(tmp_path / "d")
    path = write_idx(folder / stem, array)
    with pytest.raises(ValueError) as err:
        load_idx_folder(folder)
    _assert_error_names(err, path, *words)


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_folder_reads_raw_and_gz(tmp_path, gz):
    folder = write_idx_folder(tmp_path / "d", n_train=7, n_test=3, gz=gz)
    ds = load_idx_folder(folder)
    assert ds.name == "d" and ds.source == folder
    assert ds.train.images.shape == (7, 28, 28) and ds.train.images.dtype == torch.uint8
    assert ds.test.labels.shape == (3,) and ds.test.labels.dtype == torch.int64
    assert len(ds.train) == 7 and len(ds.test) == 3


def test_load_idx_folder_accepts_dotted_names(tmp_path):
    folder = write_idx_folder(tmp_path / "d", n_train=4, n_test=2, gz=False)
    for path in folder.iterdir():
        path.rename(folder / path.name.replace("-idx", ".idx"))
    assert len(load_idx_folder(folder).train) == 4


def test_count_mismatch_names_both_files(idx_folder):
    labels = idx_folder / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(19, np.uint8))
    with pytest.raises(ValueError) as err:
        load_idx_folder(idx_folder)
    _assert_error_names(err, labels, "t10k-images-idx3-ubyte.gz", "20 images", "19 labels")


def test_image_size_mismatch_between_train_and_test(idx_folder):
    write_idx(idx_folder / "t10k-images-idx3-ubyte.gz", np.zeros((20, 14, 14), np.uint8))
    with pytest.raises(ValueError, match="size"):
        load_idx_folder(idx_folder)


def test_missing_file_in_folder_is_named(idx_folder):
    (idx_folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        load_idx_folder(idx_folder)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_idx_folder(idx_folder / "absent")


def test_load_dataset_from_data_dir(idx_folder):
    ds = load_dataset("custom", data_dir=idx_folder)
    assert ds.name == "custom" and len(ds.train) == 40


def test_unknown_dataset_name_lists_choices():
    with pytest.raises(ValueError, match="mnist, fashion-mnist"):
        load_dataset("cifar")


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN", tmp_path / "absent")
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        load_dataset("fashion-mnist")


def test_env_var_is_the_fallback_for_mnist(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "root" / "mnist", n_train=6, n_test=2)
    monkeypatch.setattr(data, "BUNDLED_MNIST", tmp_path / "absent")
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "root"))
    assert len(load_dataset("mnist").train) == 6


def test_bundled_mnist_loads():
    ds = load_dataset("mnist")
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert ds.train.images.shape[1:] == (28, 28)
    assert ds.num_classes == 10
    assert torch.bincount(ds.test.labels).min() > 800  # every digit is present in quantity


def _split(n: int) -> Split:
    return Split(torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 2, 2).clone(), torch.arange(n))


def test_split_validation_is_disjoint_complete_and_fixed():
    train, val = split_validation(_split(100), val_size=30, seed=1)
    assert (len(train), len(val)) == (70, 30)
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(100))
    assert torch.equal(train.images[:, 0, 0].long(), train.labels)  # images stay aligned with labels
    again = split_validation(_split(100), val_size=30, seed=1)[1]
    other = split_validation(_split(100), val_size=30, seed=2)[1]
    assert torch.equal(val.labels, again.labels)
    assert not torch.equal(val.labels, other.labels)


def test_split_validation_size_zero_and_bounds():
    train, val = split_validation(_split(10), val_size=0)
    assert (len(train), len(val)) == (10, 0)
    for bad in (-1, 10):
        with pytest.raises(ValueError, match=r"val_size must be in \[0, 9\]"):
            split_validation(_split(10), val_size=bad)


def test_normalise_uses_training_statistics():
    train = Split(torch.tensor([[[0, 255]]] * 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    test = Split(torch.tensor([[[255, 255]]], dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    train_f, test_f = normalise(train, test)
    assert train_f.images.dtype == torch.float32
    assert train_f.images.mean().abs() < 1e-6 and (train_f.images.std() - 1).abs() < 1e-6
    std = torch.tensor([0.0, 1, 0, 1]).std()
    assert torch.allclose(test_f.images, (1 - 0.5) / std)  # test pixels shifted by the train mean, not their own
    with pytest.raises(ValueError, match="zero pixel variance"):
        normalise(test)


def test_normalise_without_standardising_keeps_pixels_in_unit_range():
    train = Split(torch.tensor([[[0, 51, 255]]], dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    (train_f,) = normalise(train, standardise=False)
    assert train_f.images.dtype == torch.float32
    assert torch.equal(train_f.images, torch.tensor([[[0.0, 0.2, 1.0]]]))
    (blank,) = normalise(Split(torch.zeros(1, 1, 2, dtype=torch.uint8), train.labels), standardise=False)
    assert torch.equal(blank.images, torch.zeros(1, 1, 2))  # no statistics needed, so no zero-variance error


def test_batch_iterator_covers_every_example_once_per_pass():
    split = _split(10)
    batches = list(BatchIterator(split, 4, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))
    assert all(torch.equal(x[:, 0, 0].long(), y) for x, y in batches)
    assert len(BatchIterator(split, 4)) == 3


def test_batch_iterator_is_repeatable_from_the_generator():
    def order(gen: torch.Generator) -> list[int]:
        return torch.cat([y for _, y in BatchIterator(_split(50), 8, generator=gen)]).tolist()

    gen = torch.Generator().manual_seed(3)
    first, second = order(gen), order(gen)
    assert first != second  # a new shuffle each pass
    assert order(torch.Generator().manual_seed(3)) == first


def test_batch_iterator_without_shuffle_keeps_order_and_rejects_bad_size():
    labels = torch.cat([y for _, y in BatchIterator(_split(9), 4, shuffle=False)])
    assert labels.tolist() == list(range(9))
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(_split(9), 0)
