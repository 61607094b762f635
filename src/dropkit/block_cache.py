"""A cache of the memory behind dropkit's large CPU outputs, handed out again once an output is freed.

Why. glibc serves every block from 32 MiB up with a fresh ``mmap`` and unmaps it again when it is
freed, so each large output of a kernel is written into pages that are not there yet: the first
write faults them in (and, for huge pages, zeroes 2 MiB at a time), which on the 2-core VM costs
about as much as the kernel's own pass over the data. On that VM (a Firecracker guest with free
page reporting) a freed block may also go back to the host, and the next first write to it then
waits for the host: single 64 MiB kernel calls took 90-120 ms instead of 5-14 (BENCHMARKS.md,
stop 17). A training loop frees and requests the same sizes every step. So dropkit keeps the
freed blocks of its own outputs of :data:`MIN_BYTES` and more, by size, and hands them out
again, as torch's CUDA caching allocator does on the GPU: the kernel then writes into memory that
is mapped and resident already. Outputs below that size come from the C heap, which
:func:`dropkit.heap.retain_freed_memory` keeps mapped.

How. A block is a private anonymous ``mmap`` (advised to use huge pages,
:func:`dropkit.heap.advise_huge_pages`) seen as a numpy byte array. Each output is
``torch.from_numpy`` of a fresh view of its block, and a finalizer on that view puts the block back
in the cache when the last tensor that shares its storage is freed, never earlier: views and
autograd's saved tensors keep it out. Free blocks are kept up to ``DROPKIT_BLOCK_CACHE`` MiB
(default 1024, or a sixteenth of the machine's memory if that is less; ``0`` turns the cache off
and every output is allocated by torch); beyond it, the least recently freed blocks are unmapped.
:func:`empty_cache` unmaps every free block.

One difference from a tensor torch allocates: the storage of a cached output cannot be resized
(``resize_`` raises), as for any tensor made by ``torch.from_numpy``.
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
import weakref

import numpy as np
import torch

from dropkit import heap

__all__ = ["ENV", "MIN_BYTES", "cached_bytes", "empty_cache", "empty_like", "limit_bytes"]

#: the environment variable that sets the cache's limit, in MiB of free blocks (0: no cache)
ENV = "DROPKIT_BLOCK_CACHE"
#: the default limit: 1 GiB, or a sixteenth of the machine's memory if that is less
DEFAULT_LIMIT_MIB = 1024
#: outputs from this size on come from the cache: glibc maps every block this large afresh
MIN_BYTES = heap.HUGE_PAGE_MIN_BYTES

# reentrant: a garbage collection inside a locked section may free a cached output, whose
# finalizer then takes the lock again on the same thread
_lock = threading.RLock()
#: free blocks, the least recently freed first
_free: list[np.ndarray] = []
_free_bytes = 0


def _reset_lock_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # a lock held by another thread at fork time would never be released here


os.register_at_fork(after_in_child=_reset_lock_in_child)


@functools.cache
def limit_bytes() -> int:
    """Most bytes of free blocks the cache keeps (read from ``DROPKIT_BLOCK_CACHE`` once); 0: no cache."""
    text = os.environ.get(ENV, str(_default_limit_mib()))
    if not text.strip().isdigit():
        raise ValueError(f"{ENV} must be a whole number of MiB >= 0 (0 turns the cache off), got {text!r}")
    return int(text) * 2**20


def _default_limit_mib() -> int:
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no such query on this system
        return DEFAULT_LIMIT_MIB
    return min(DEFAULT_LIMIT_MIB, memory // 16 // 2**20)


def cached_bytes() -> int:
    """Bytes of free blocks the cache holds now."""
    return _free_bytes


def empty_cache() -> None:
    """Unmap every free block (blocks of live outputs return to the cache when those are freed)."""
    global _free_bytes
    with _lock:
        _free.clear()
        _free_bytes = 0


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` (contiguous); for a CPU tensor of :data:`MIN_BYTES` or more, in a
    block of the cache (see the module docstring), else as :func:`dropkit.heap.huge_page_empty_like`."""
    nbytes = x.nbytes
    if x.device.type != "cpu" or nbytes < MIN_BYTES or limit_bytes() == 0:
        return heap.huge_page_empty_like(x)
    block = _take(nbytes)
    if block is None:
        # private: Python's default for an anonymous map is shared memory, which a forked child
        # would write through and which gets no transparent huge pages
        block = np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=np.uint8)
        heap.advise_huge_pages(block.ctypes.data, nbytes)
    view = block.view()
    weakref.finalize(view, _give_back, block).atexit = False
    return torch.from_numpy(view).view(x.dtype).view(x.shape)


def _take(nbytes: int) -> np.ndarray | None:
    """The most recently freed block of ``nbytes``, out of the cache; None if there is none."""
    global _free_bytes
    with _lock:
        for i in range(len(_free) - 1, -1, -1):
            if _free[i].nbytes == nbytes:
                _free_bytes -= nbytes
                return _free.pop(i)
    return None


def _give_back(block: np.ndarray) -> None:
    """Keep a freed block; past the limit, let the least recently freed blocks go (unmapped with
    their last reference), so the sizes in use now stay cached when the sizes in use change."""
    global _free_bytes
    with _lock:
        _free.append(block)
        _free_bytes += block.nbytes
        while _free_bytes > limit_bytes():
            _free_bytes -= _free.pop(0).nbytes
