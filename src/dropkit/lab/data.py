"""Image datasets stored as IDX files (MNIST, Fashion-MNIST, or any folder laid out like them).

The IDX format (LeCun et al., the MNIST database) is a tiny header followed by raw big-endian
numbers: two zero bytes, a type code, the number of dimensions, one 4-byte size per dimension,
then the data. The reader below checks every part of that header against the file and names the
file in every error, because "bad magic number" without a path is useless when four files are
read at once.

Everything stays as plain tensors in memory: MNIST is 47 MB as uint8, so there is no need for
``DataLoader`` worker processes, and an in-memory index shuffle (:class:`BatchIterator`) is both
faster and exactly repeatable from a ``torch.Generator`` state.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

__all__ = [
    "BatchIterator",
    "DATASETS",
    "ImageDataset",
    "Split",
    "load_dataset",
    "load_idx_folder",
    "normalise",
    "read_idx",
    "split_validation",
]

#: IDX type code -> numpy dtype of the stored (big-endian) numbers
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: name of the environment variable that points at a folder holding ``<dataset name>/`` folders
DATA_ENV = "DROPKIT_DATA"

#: where the Debian package ``dataset-fashion-mnist`` puts its files
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")

#: the copy of MNIST shipped inside the package (package data of ``dropkit.lab``, so it is found
#: the same way in a source checkout and in an installed wheel)
BUNDLED_MNIST = Path(__file__).resolve().parent / "datasets" / "mnist"

#: datasets known by name; any other folder of IDX files is loaded with ``data_dir``
DATASETS = ("mnist", "fashion-mnist")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read one IDX file (raw, or gzip-compressed when its name ends in ``.gz``) into a tensor.

    The header is checked in full: the two leading zero bytes, a known type code, and a data
    length that is exactly the product of the declared dimensions times the item size (so a
    truncated download or a file with trailing bytes is refused rather than silently reshaped).
    The data is read in chunks and never beyond what the header declares: a raw file's size is
    checked before its data is read, and a compressed file stops decompressing at the first byte
    past the declared length, so a small file that unpacks to gigabytes (a "gzip bomb") is refused
    having used no more memory than its header claimed.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a well-formed IDX file; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix != ".gz":
        with open(path, "rb") as handle:
            return _parse_idx(handle, path, os.fstat(handle.fileno()).st_size)
    try:
        with gzip.open(path, "rb") as handle:
            return _parse_idx(handle, path, None)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # a cut-off stream raises EOFError
        raise ValueError(f"{path}: cannot decompress gzip data ({err})") from err


#: bytes read (or decompressed) at a time
READ_CHUNK = 1 << 20


def _read_up_to(stream: BinaryIO, size: int) -> bytearray:
    """At most ``size`` bytes of ``stream``, fewer at its end; read in chunks, so that memory
    grows with the bytes actually there, not with ``size``."""
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(min(READ_CHUNK, size - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _parse_idx(stream: BinaryIO, path: Path, file_size: int | None) -> torch.Tensor:
    """The array of the IDX data in ``stream``; ``file_size`` (None for compressed data) lets a raw
    file's length be checked before its data is read."""
    head = _read_up_to(stream, 4)
    if len(head) < 4:
        raise ValueError(f"{path}: {len(head)} bytes is too short for an IDX header (needs at least 4)")
    if head[0] != 0 or head[1] != 0:
        raise ValueError(f"{path}: bad magic number 0x{bytes(head).hex()}: an IDX file starts with two zero bytes")
    code, ndim = head[2], head[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    sizes = _read_up_to(stream, 4 * ndim)
    if len(sizes) < 4 * ndim:
        raise ValueError(f"{path}: truncated header: {ndim} dimensions need {header_len} bytes, "
                         f"file has {4 + len(sizes)}")
    shape = tuple(int(d) for d in np.frombuffer(sizes, dtype=">u4"))
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    declared = f"header declares shape {shape} of {dtype.name} ({expected} data bytes)"
    if file_size is not None and file_size - header_len != expected:
        found = file_size - header_len
        problem = "truncated" if found < expected else "trailing bytes"
        raise ValueError(f"{path}: {problem}: {declared}, file holds {found} data bytes")
    raw = _read_up_to(stream, expected + 1)  # one byte more tells a longer stream from an exact one
    if len(raw) < expected:
        raise ValueError(f"{path}: truncated: {declared}, file holds {len(raw)} data bytes")
    if len(raw) > expected:
        raise ValueError(f"{path}: trailing bytes: {declared}, but the data goes on past them "
                         f"(reading stopped there)")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


@dataclass(frozen=True)
class Split:
    """Images and their labels, index-aligned: uint8 ``(N, H, W)`` (or float once normalised) and int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (all of them when ``n`` is None); used to train on small slices."""
        if n is None:
            return self
        return Split(self.images[:n], self.labels[:n])

    def shard(self, rank: int, world: int) -> Split:
        """Every ``world``-th example starting at ``rank``: this process's part of a distributed evaluation."""
        return self if world == 1 else Split(self.images[rank::world], self.labels[rank::world])


@dataclass(frozen=True)
class ImageDataset:
    """A classification dataset as loaded from disk: the official train and test parts, untouched."""

    name: str
    train: Split
    test: Split
    source: Path
    #: role (``train_images``, ``train_labels``, ``test_images``, ``test_labels``) -> the file read
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(max(self.train.labels.max(), self.test.labels.max())) + 1

    def check_fits(self, image_size: tuple[int, int], num_classes: int, model: str = "the model") -> None:
        """Refuse a dataset that ``model`` cannot take: images of another size, or labels outside
        ``[0, num_classes)``; the error names the file.

        Raises:
            ValueError: naming the image or label file, what it holds and what the model takes.
        """
        for part, split in (("train", self.train), ("test", self.test)):
            images = self.files.get(f"{part}_images", self.source)
            labels = self.files.get(f"{part}_labels", self.source)
            size = tuple(split.images.shape[1:])
            if size != tuple(image_size):
                raise ValueError(f"{images}: images are {'x'.join(map(str, size))} pixels but {model} takes "
                                 f"{'x'.join(map(str, image_size))}")
            if len(split) and int(split.labels.max()) >= num_classes:
                raise ValueError(f"{labels}: label {int(split.labels.max())} is outside the {num_classes} classes "
                                 f"(0-{num_classes - 1}) that {model} predicts")


#: role -> (stem, IDX rank) of the four files; ``train-images-idx3-ubyte`` and friends
_ROLES = {
    "train_images": ("train-images", 3),
    "train_labels": ("train-labels", 1),
    "test_images": ("t10k-images", 3),
    "test_labels": ("t10k-labels", 1),
}


def _find_idx_file(folder: Path, stem: str, rank: int) -> Path:
    """The file for one role, accepting the raw or .gz form and the ``-idx`` or ``.idx`` spelling."""
    names = [f"{stem}{sep}idx{rank}-ubyte{ext}" for sep in ("-", ".") for ext in ("", ".gz")]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: none of {', '.join(names)} found")


def load_idx_folder(path: str | os.PathLike, name: str | None = None) -> ImageDataset:
    """Load the four MNIST-style IDX files from one folder.

    Images must be 3-D uint8 arrays with the same image size in train and test; labels 1-D.
    Each image file must hold as many examples as its label file (the error names both files).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = {role: _find_idx_file(folder, stem, rank) for role, (stem, rank) in _ROLES.items()}
    arrays = {role: read_idx(file) for role, file in files.items()}
    for part in ("train", "test"):
        images, labels = f"{part}_images", f"{part}_labels"
        _check_pair(files[images], arrays[images], files[labels], arrays[labels])
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ValueError(
            f"{files['train_images']} holds images of size {tuple(arrays['train_images'].shape[1:])} but "
            f"{files['test_images']} holds {tuple(arrays['test_images'].shape[1:])}"
        )
    return ImageDataset(
        name=name or folder.name,
        train=Split(arrays["train_images"], arrays["train_labels"].long()),
        test=Split(arrays["test_images"], arrays["test_labels"].long()),
        source=folder,
        files=files,
    )


#: label types an IDX label file may hold: integers only (a float label would be truncated silently)
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32)


def _check_pair(image_file: Path, images: torch.Tensor, label_file: Path, labels: torch.Tensor) -> None:
    """Images are (N, H, W) uint8, labels are (N,) non-negative integers, N > 0 and the two N agree."""
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(f"{image_file}: expected 3-D uint8 images, found {images.dim()}-D {images.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{label_file}: expected 1-D labels, found {labels.dim()}-D")
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"{label_file}: labels must be integers (IDX type 0x08, 0x09, 0x0B or 0x0C), "
                         f"found {str(labels.dtype).removeprefix('torch.')}")
    if len(labels) == 0:
        raise ValueError(f"{label_file}: holds no labels (0 examples)")
    if int(labels.min()) < 0:
        raise ValueError(f"{label_file}: labels must be >= 0 (class numbers), found {int(labels.min())}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_file} holds {images.shape[0]} images but {label_file} holds {labels.shape[0]} labels"
        )


def _default_folders(name: str) -> list[Path]:
    """Where a named dataset is looked for, in order."""
    folders = {"mnist": [BUNDLED_MNIST], "fashion-mnist": [FASHION_MNIST_DEBIAN]}[name]
    if os.environ.get(DATA_ENV):
        folders.append(Path(os.environ[DATA_ENV]) / name)
    return folders


def load_dataset(name: str = "mnist", data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Load a dataset by name, or from ``data_dir`` when given (any folder of the four IDX files).

    ``mnist`` is the copy shipped with the package (``dropkit/lab/datasets/mnist``); ``fashion-mnist`` is read
    from Debian's ``dataset-fashion-mnist`` package. Either may also sit under ``$DROPKIT_DATA/<name>``.
    """
    if data_dir is not None:
        return load_idx_folder(data_dir, name=name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or pass a data_dir")
    folders = _default_folders(name)
    for folder in folders:
        if folder.is_dir():
            return load_idx_folder(folder, name=name)
    tried = ", ".join(str(f) for f in folders)
    hint = {
        "mnist": f"the bundled copy is missing; set {DATA_ENV} or pass --data-dir",
        "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist`, or pass --data-dir",
    }[name]
    raise FileNotFoundError(f"dataset {name!r} not found (looked in {tried}): {hint}")


def split_validation(train: Split, val_size: int = 5000, seed: int = 0) -> tuple[Split, Split]:
    """Carve a validation set out of the training set: ``(train minus val, val)``.

    The examples are drawn by a permutation from their own generator seeded with ``seed``, so the
    validation set is the same whatever seed the training run uses: model choices (p, lr, ...)
    are then compared on identical held-out data, and the test set is kept for the final figure.
    """
    if not 0 <= val_size < len(train):
        raise ValueError(
            f"val_size must be in [0, {len(train) - 1}] for {len(train)} training examples, got {val_size}"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    return Split(train.images[train_idx], train.labels[train_idx]), Split(train.images[val_idx], train.labels[val_idx])


def normalise(train: Split, *others: Split, standardise: bool = True) -> tuple[Split, ...]:
    """Scale uint8 pixels to [0, 1], then standardise every split with the *training* mean and std.

    Statistics come from ``train`` only so that nothing about held-out data leaks into the
    inputs; one scalar mean/std over all pixels (MNIST's well-known 0.1307 / 0.3081). With
    ``standardise=False`` the pixels stay in [0, 1].
    Returns float32 splits in the order given: ``(train, *others)``.
    """
    mean, std = 0.0, 1.0
    if standardise:
        pixels = train.images.float().div_(255)
        mean, std = pixels.mean(), pixels.std()
        if not std > 0:
            raise ValueError(f"training images have zero pixel variance ({len(train)} images); cannot standardise")

    def scale(split: Split) -> Split:
        return Split(split.images.float().div_(255).sub_(mean).div_(std), split.labels)

    return tuple(scale(split) for split in (train, *others))


class BatchIterator:
    """Mini-batches over in-memory tensors, reshuffled at every pass.

    Each ``iter()`` draws one permutation from ``generator`` (so a run is repeatable from the
    generator's seed, and a resumed run continues from its saved state) and yields index-selected
    ``(images, labels)`` batches; the last batch is smaller when ``len`` is not a multiple of
    ``batch_size``. With ``shuffle=False`` batches come in order and no random number is drawn.

    In a distributed run every rank holds the same generator state and so the same permutation;
    with ``rank``/``world`` each yields every ``world``-th example of each global batch, so the N
    ranks together see exactly the batches one process would. A global batch with fewer examples
    than ranks (only ever the last) is skipped, since some rank would get none.
    """

    def __init__(
        self, split: Split, batch_size: int, *, shuffle: bool = True, generator: torch.Generator | None = None,
        rank: int = 0, world: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        full, rest = divmod(len(self.split), self.batch_size)
        return full + (1 if rest >= self.world else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            if len(idx) < self.world:
                continue
            idx = idx[self.rank :: self.world]
            yield self.split.images[idx], self.split.labels[idx]
