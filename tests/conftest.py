"""Shared test helpers: tiny IDX files written on the fly, so data tests need no real dataset; a
throwaway PostgreSQL server (tests/pg_server.py) for the sweeps that share a study through one."""

from __future__ import annotations

import os

# One thread per process unless asked otherwise, set before torch starts its thread pool: ``-n 2``
# runs two test processes on a 2-core machine, and many tests start processes of their own (which
# inherit this), so every extra OpenMP thread would compete for a core; a thread that loses its
# core holds up each parallel region, and a small training run then takes many times longer.
# Tests about thread counts set them themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors
# (tests/test_gpu_kernels.py). Triton reads TRITON_INTERPRET when it decorates a function, its own
# library included (tl.randint4x) when triton is first imported, which torch._dynamo does; so the
# flag is set here, before any test module is imported. Only Triton reads it.
if not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from vision_shim import import_torchvision  # noqa: E402

# before anything imports timm or transformers (both import torchvision when it is installed)
import_torchvision()

#: numpy dtype -> IDX type code
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``: zero magic bytes, type code, rank, big-endian sizes and data."""
    code = _IDX_CODES[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray | bytes) -> Path:
    """Write an array (or ready-made bytes) as an IDX file; gzip it when the name ends in .gz."""
    data = array if isinstance(array, bytes) else idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_idx_folder(folder: Path, n_train: int = 40, n_test: int = 20, *, gz: bool = True, seed: int = 0) -> Path:
    """A fake MNIST folder: random 28x28 uint8 images, labels 0-9, the standard four file names."""
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{stem}-labels-idx1-ubyte{ext}", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests marked slow first, each group in its usual order: under ``-n 2`` a worker starts
    the long end-to-end tests while the other works through the short ones, and the last minutes
    are short tests that both workers share, rather than one long test on a worker alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    """A folder of four small gzip-compressed IDX files in MNIST's layout."""
    return write_idx_folder(tmp_path / "fake")


@pytest.fixture(scope="module")
def postgres_server():
    """A throwaway PostgreSQL server for the tests of one module (see tests/pg_server.py), stopped
    and deleted after them; the test is skipped with the reason where none can be started, and fails
    instead when DROPKIT_TEST_POSTGRES=required."""
    from pg_server import Unavailable, start_server

    try:
        server = start_server()
    except Unavailable as err:
        if os.environ.get("DROPKIT_TEST_POSTGRES") == "required":
            pytest.fail(f"DROPKIT_TEST_POSTGRES=required, but no PostgreSQL server could be started: {err}")
        pytest.skip(f"no PostgreSQL server could be started: {err}")
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """The URL of a fresh, empty database on the test PostgreSQL server; the server runs."""
    if not postgres_server.running():
        postgres_server.start()
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    name += f"_{len(postgres_server.databases)}"
    return postgres_server.create_database(name)
