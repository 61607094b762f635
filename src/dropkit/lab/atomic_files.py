"""Files written so that a reader never sees half of one: write beside the target, then rename.

A rename within one folder is atomic on POSIX, so a process killed mid-write leaves either the old
file or the new one (plus a hidden ``.NAME.<pid>.<random>.tmp``). Each write has a temporary file
of its own, so writers in other processes or threads never write into one another's. Training uses
this for checkpoints and metrics; distributed workers for the records that name a failed rank.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "temporary_name"]


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for one writer: ``.NAME.<pid>.<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp_path)``, then rename the temporary file over ``path``; the
    temporary file is removed if writing fails."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))
