"""An exclusive lock on a run's folder, so that two runs never write into the same one.

A run holds ``DIR/.dropkit.lock`` with ``flock`` for as long as it writes into ``DIR``; the file
names the holder (pid and host). A second run into the folder is refused at once with
:class:`RunFolderBusy`, which names that pid. The operating system drops an ``flock`` when its
process ends in any way (``kill -9`` included), so the lock of a dead run is simply taken over;
its stale file is rewritten with the new holder. The file is removed when the lock is released.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_FILE", "RunFolderBusy", "hold", "holder", "prepare_folder"]

LOCK_FILE = ".dropkit.lock"


class RunFolderBusy(RuntimeError):
    """Another live process holds the lock on the folder; the message names it."""


def prepare_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the folder ``path`` (and its parents) or check the existing one; errors name the part
    of the path that is not a usable folder and the option (``flag``) that gave it."""
    folder = Path(path)
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            kind = "a file" if part.is_file() else "not a regular folder"
            raise NotADirectoryError(errno.ENOTDIR, f"{kind}, not a folder ({flag} needs a folder to write into)",
                                     str(part))
        if part.exists():
            break
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"not writable ({flag} needs a folder to write into)", str(folder))
    return folder


def holder(folder: str | os.PathLike) -> str | None:
    """What the lock file of ``folder`` says about its holder (``pid N on HOST``), or None without one.

    The file may be stale: only :func:`hold` can tell a live holder from a dead one."""
    try:
        return Path(folder, LOCK_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


@contextmanager
def hold(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock on ``folder`` (created if missing) for the duration of the block.

    Raises:
        RunFolderBusy: a live process holds it; the message names that process and the folder.
        OSError: the folder cannot be created or written (the error names the path).
    """
    folder = prepare_folder(folder)
    handle = _acquire(folder / LOCK_FILE)
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield folder
    finally:
        try:
            os.unlink(folder / LOCK_FILE)  # before unlocking, so no one locks a file about to vanish
        except FileNotFoundError:
            pass
        os.close(handle)


def _acquire(path: Path) -> int:
    """A descriptor of ``path`` locked with ``flock``; retried when the file was replaced between
    opening and locking it (its previous holder removed it on release)."""
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(path.parent) or "a process that has not yet written its pid"
            os.close(handle)
            raise RunFolderBusy(f"{path.parent} is in use by another run ({who}); wait for it to end or "
                                f"choose another output folder") from None
        except BaseException:
            os.close(handle)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        os.close(handle)
