"""Where dropkit's compiled CPU kernels are cached: a per-user directory that only its owner can write.

numba compiles a kernel on its first call (seconds per kernel) and, with ``cache=True``, keeps the
machine code on disk so that later processes load it instead. Its cache files are pickles, so a
directory that another user can write is a way to run code in this process. dropkit therefore
keeps its kernels in a directory of its own:

* ``$DROPKIT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/dropkit``, else ``~/.cache/dropkit``;
  the kernels go under ``numba/`` there;
* created with mode 0700, and used only if it belongs to the current user and neither its group
  nor others may write it; otherwise the kernels compile in every process (a warning says why);
* the cache is keyed on each kernel file's contents (numba stamps entries with a hash of the
  source), not on where dropkit is installed, so it survives reinstalls and is shared by every
  environment of the same user that has the same dropkit source.

This is done with a numba cache locator that answers only for files in this package
(:class:`DropkitCacheLocator`); numba's settings (``NUMBA_CACHE_DIR``) and the caching of any other
code in the process are left alone. ``dropkit warmup`` (:func:`dropkit.kernels.warmup`) fills the
cache ahead of time.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

from numba.core import caching

__all__ = ["CACHE_ENV", "DropkitCacheLocator", "cache_dir", "enable"]

#: environment variable that overrides the cache directory
CACHE_ENV = "DROPKIT_CACHE_DIR"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """The directory dropkit's compiled kernels are cached in (it may not exist yet)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "numba"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dropkit" / "numba"


def _private_dir(path: Path) -> str | None:
    """Create ``path`` owner-only (its parent too, if missing); ``None`` if code may be loaded from
    it, else the reason it may not. Both ``path`` and its parent must belong to this user and be
    closed to writes by others: whoever can write the parent can swap the directory itself."""
    for folder in (path.parent, path):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = folder.stat()
        except OSError as err:
            return f"cannot create {folder} ({err.strerror})"
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            return f"{folder} belongs to uid {info.st_uid}, not to this user ({os.getuid()})"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"other users may write {folder} (mode {stat.filemode(info.st_mode)})"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


class DropkitCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """numba cache locator for the kernels defined in dropkit's own files (see the module docstring)."""

    def __init__(self, py_func, py_file: str) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        relative = Path(py_file).resolve().relative_to(_PACKAGE_DIR)
        self._cache_path = str(cache_dir() / "_".join(relative.with_suffix("").parts))

    def get_cache_path(self) -> str:
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file: str):
        if not Path(py_file).resolve().is_relative_to(_PACKAGE_DIR):
            return None  # not dropkit's: numba's own locators decide
        return super().from_function(py_func, py_file)


def enable() -> bool:
    """Register :class:`DropkitCacheLocator` with numba once and say whether kernels may be cached
    (``cache=`` of their ``njit``): False, with a warning naming the reason, if the directory is
    not private to this user."""
    problem = _private_dir(cache_dir())
    if problem is not None:
        warnings.warn(f"dropkit: not caching compiled kernels: {problem}; each process "
                      f"compiles them again (set {CACHE_ENV} to a private directory)", RuntimeWarning, stacklevel=2)
        return False
    if DropkitCacheLocator not in caching.CacheImpl._locator_classes:
        caching.CacheImpl._locator_classes.insert(0, DropkitCacheLocator)
    return True
