"""Files written so that a reader never sees half of one: write beside the target, then rename.

A rename within one folder is atomic on POSIX, so a process killed mid-write leaves either the old
file or the new one (plus a hidden ``.NAME.tmp`` that the next write replaces). Training uses this
for checkpoints and metrics; distributed workers for the records that name a failed rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp_path)``, then rename the temporary file over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))
