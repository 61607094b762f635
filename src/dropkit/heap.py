"""How the process's C heap treats freed memory: keep it for the next training step (glibc).

Why. torch allocates CPU tensors with the C library's ``malloc``. glibc serves a block above its
mmap threshold (128 KiB at start, raised on the fly up to 32 MiB) from fresh pages, and hands the
top of the heap back to the OS once more than twice that threshold lies free there. A training
step allocates and frees the same megabyte-sized activations and gradients every step, so with
these defaults a step can give its memory back at the end and page-fault it in again at the next
one. Measured on the 2-core VM (784-1024-1024-10 MLP, batch 256, one thread; ``BENCHMARKS.md``):
about 1,400 minor page faults and 3 ms of system time per step with dropout (torch's or
dropkit's), against 40-170 faults without; 0-50 with the memory kept. The default's count moves
between identical runs (400-2,400 per step, once 127 on CI): where glibc trims depends on which
small blocks the addresses and the hash seed put at the heap's top.

:func:`retain_freed_memory` fixes both thresholds (32 MiB for mmap, 1 GiB for trimming), so
blocks below 32 MiB come from the heap and freed memory stays mapped for reuse. The process then
keeps its peak heap, which a training process reaches every step anyway. It is a process-wide
choice, so the library never makes it on import. The ``dropkit`` command sets the environment
variable ``DROPKIT_HEAP`` (``retain`` unless it is set already; ``default`` keeps glibc as it is)
and applies it; :func:`dropkit.train.train` applies it too, so every process the command starts
to train (data-parallel ranks, isolated ``compare`` runs, sweep workers) follows it, while a
script that calls ``train`` without the variable gets glibc's behaviour. PyTorch's CPU tuning guides reach the same end by preloading jemalloc
or tcmalloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

#: the environment variable that carries the choice to the command and its worker processes
ENV = "DROPKIT_HEAP"
CHOICES = ("retain", "default")
#: glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30
#: madvise's advice number for transparent huge pages (linux/mman.h) and the huge page size of x86-64 and arm64
_MADV_HUGEPAGE = 14
HUGE_PAGE = 2 * 2**20
#: outputs from this size on are advised (see :func:`huge_page_empty_like`): glibc never raises its
#: mmap threshold above this, so a block this large is a fresh mmap, unmapped again when the tensor
#: is freed, unless a free block of the retained heap can hold it (then its pages are mapped already
#: and the advice only lets the kernel merge them into huge pages later)
HUGE_PAGE_MIN_BYTES = 32 * 2**20
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
#: set to ``off`` to leave the kernels' outputs as torch allocates them (read once, at the first large output)
HUGE_PAGES_ENV = "DROPKIT_HUGE_PAGES"


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except (OSError, TypeError):
        return None


@functools.cache
def _madvise():
    """libc's ``madvise`` where advice for huge pages can change anything (Linux, THP in madvise mode)
    and ``DROPKIT_HUGE_PAGES`` is not ``off``; else None."""
    choice = os.environ.get(HUGE_PAGES_ENV, "advise")
    if choice not in ("advise", "off"):
        raise ValueError(f"{HUGE_PAGES_ENV} must be one of advise, off, got {choice!r}")
    if choice == "off":
        return None
    libc = _libc()
    if not sys.platform.startswith("linux") or libc is None or not hasattr(libc, "madvise"):
        return None
    try:
        with open(_THP_MODE, encoding="ascii") as handle:
            if "[madvise]" not in handle.read():  # "always" needs no advice, "never" ignores it
                return None
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return madvise


def huge_page_empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` (contiguous), whose pages are huge pages where the kernel allows.

    Why. A fresh output of 64 MiB is a fresh mmap, and writing it first faults it in page by page:
    16,384 faults of 4 KiB, three quarters of the time of a 2**24-element float32 copy on the 2-core
    VM (BENCHMARKS.md, "Huge pages"). On a Linux kernel whose transparent huge pages are in
    ``madvise`` mode (the VM's), advising the block before the first write makes those 32 faults of
    2 MiB instead. torch's allocator does the same for all its blocks when ``THP_MEM_ALLOC_ENABLE=1``;
    this does it for dropkit's own large outputs only, from :data:`HUGE_PAGE_MIN_BYTES` on: the
    new blocks of :mod:`dropkit.block_cache`, and every such output where that cache is off. Only
    the whole 2 MiB pages inside the block are advised; elsewhere (no such kernel, THP always or
    never, CUDA tensors) this is plain ``torch.empty_like``. A kernel short of free 2 MiB blocks
    may compact memory at the first write (the usual price of huge pages); ``DROPKIT_HUGE_PAGES=off``
    turns the advice off.
    """
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.device.type == "cpu" and out.nbytes >= HUGE_PAGE_MIN_BYTES:
        advise_huge_pages(out.data_ptr(), out.nbytes)
    return out


def advise_huge_pages(address: int, nbytes: int) -> None:
    """Advise the whole 2 MiB pages inside ``nbytes`` of memory from ``address`` to be huge pages,
    where that can change anything (see :func:`huge_page_empty_like`); advice only: a refusal
    changes speed, never results."""
    madvise = _madvise()
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    if madvise is not None and end > start:
        madvise(start, end - start, _MADV_HUGEPAGE)


def retain_freed_memory() -> bool:
    """Keep freed heap memory mapped and serve blocks below 32 MiB from the heap (see the module
    docstring). Returns whether it took effect: False where the C library is not glibc."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def configure() -> str:
    """Apply ``DROPKIT_HEAP`` (unset: ``default``, glibc as it is) and return the choice that took
    effect, which is also left in the variable for worker processes and benchmark records."""
    choice = os.environ.get(ENV, "default")
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "retain" and not retain_freed_memory():
        choice = "default"
    os.environ[ENV] = choice
    return choice
