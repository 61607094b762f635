"""How the process's C heap treats freed memory: keep it for the next training step (glibc).

Why. torch allocates CPU tensors with the C library's ``malloc``. glibc serves a block above its
mmap threshold (128 KiB at start, raised on the fly up to 32 MiB) from fresh pages, and hands the
top of the heap back to the OS once more than twice that threshold lies free there. A training
step allocates and frees the same megabyte-sized activations and gradients every step, so with
these defaults a step can give its memory back at the end and page-fault it in again at the next
one. Measured on the 2-core VM (784-1024-1024-10 MLP, batch 256, one thread; ``BENCHMARKS.md``):
about 1,400 minor page faults and 3 ms of system time per step with dropout (torch's or
dropkit's), against 40-170 faults without; 0-30 with the memory kept.

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
import os

#: the environment variable that carries the choice to the command and its worker processes
ENV = "DROPKIT_HEAP"
CHOICES = ("retain", "default")
#: glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


def retain_freed_memory() -> bool:
    """Keep freed heap memory mapped and serve blocks below 32 MiB from the heap (see the module
    docstring). Returns whether it took effect: False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
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
