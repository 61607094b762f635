"""The kernel dispatcher: every per-element op of the dropout family on torch tensors goes through it.

It picks one of three implementations ("paths") per tensor, each producing the same masks bit for
bit from the same ``(seed, offset)`` (the stream layout of :mod:`dropkit.rng` is the contract):

* ``numba``: the compiled CPU kernels of :mod:`.cpu` (float32, float64 and bfloat16 in place;
  float16 through the float32 kernels between two conversions, exact because every op is computed
  in float32 and rounded once), reading and writing the tensors' own memory;
* ``triton``: the GPU kernels of :mod:`.gpu` (float32, float16, bfloat16), used for CUDA tensors
  whenever Triton is importable;
* ``reference``: the plain-torch :mod:`.reference`, the ground truth the others are tested
  against, on any device; slow on a GPU (many passes over memory per mask), so choosing it for a
  CUDA tensor because Triton is missing warns once.

``DROPKIT_KERNELS`` = ``auto`` (the default: numba on the CPU, Triton on CUDA) | ``numba`` |
``triton`` | ``reference`` forces one path for every op: to run the Triton kernels on CPU tensors
under ``TRITON_INTERPRET=1`` (how the tests check them without a GPU), or to rule a kernel out
while debugging. It is read at every call.

Inputs are read in their logical index order (a mask is defined on the logical index, so memory
layout never changes it); outputs are ordinary tensors from torch's allocator. ``seed`` is a
Python int (a Philox key) and ``offset`` the first counter of the stream, 0 for a whole-tensor op.
The one op here with no random mask, the gradient of ``relu_dropout``, is torch's own ReLU
gradient and a division on every device (see :func:`relu_dropout_grad`).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
import warnings
from typing import Callable, NamedTuple

import numba
import numpy as np
import torch

from dropkit import rng
from dropkit.kernels import cpu, reference

__all__ = ["ENV", "PATHS", "accelerated", "gaussian", "keep_mask", "masked", "masked_from_bits", "path_for",
           "path_on", "reference", "relu_dropout_grad", "run_parallel", "warmup"]

#: environment variable that forces one kernel path for every op
ENV = "DROPKIT_KERNELS"
#: its values
PATHS = ("auto", "numba", "triton", "reference")
#: elements per thread below which a kernel runs on fewer threads (see run_parallel)
MIN_ELEMENTS_PER_THREAD = 2**16
#: a Box-Muller draw (log, cos, sqrt) costs about as much as this many selects
_GAUSSIAN_COST = 32
_NUMBA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_NATIVE = (torch.float32, torch.float64, torch.bfloat16)
_NO_BITS = np.empty(0, dtype=np.uint8)
_KIND_CODES = {"dropout": cpu.DROPOUT, "alpha": cpu.ALPHA, "alpha_grad": cpu.ALPHA_GRAD, "relu_dropout": cpu.RELU_DROPOUT}


class Backend(NamedTuple):
    """The four primitives one path provides (inputs contiguous, in a dtype the path takes)."""

    #: ``(x, seed, p, kind, save_bits, offset) -> (out, packed bits or None)``
    masked: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    #: ``(x, bits, p, kind) -> out``
    masked_from_bits: Callable[..., torch.Tensor]
    #: ``(x, seed, p, offset) -> out``
    gaussian: Callable[..., torch.Tensor]
    #: ``(seed, p, shape, offset, device) -> bool mask``
    keep_mask: Callable[..., torch.Tensor]


def requested_path() -> str:
    """The path ``DROPKIT_KERNELS`` asks for (``auto`` when unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in PATHS:
        raise ValueError(f"{ENV} must be one of {', '.join(PATHS)}, got {value!r}")
    return value


#: whether Triton imports, once asked (None before)
_triton_importable: bool | None = None


@torch.compiler.assume_constant_result  # torch.compile asks while tracing and never traces the import
def triton_available() -> bool:
    """Whether Triton can be imported (it comes with torch's CUDA wheels, or ``pip install triton``)."""
    global _triton_importable
    if _triton_importable is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_importable = False
        else:
            _triton_importable = True
    return _triton_importable


@functools.lru_cache(maxsize=1)
def _warn_reference_on_gpu() -> None:
    warnings.warn("dropkit: Triton is not importable, so dropout on CUDA tensors runs on the plain-torch "
                  "reference, which makes many passes over memory per mask and is several times slower than "
                  "torch's own dropout; install Triton (`pip install triton`, or torch's CUDA wheels bring it)",
                  RuntimeWarning, stacklevel=3)


def path_for(x: torch.Tensor) -> str:
    """The path that ops on ``x`` run on (see the module docstring)."""
    return path_on(x.device, x.dtype)


def path_on(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The path that ops on a ``dtype`` tensor on ``device`` run on; a keep mask, which has no
    input, runs on the path of a float32 tensor on the device it is drawn on."""
    path = requested_path()
    if path == "auto":
        if device.type == "cpu":
            return "numba" if dtype in _NUMBA_DTYPES else "reference"
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cuda":
            _warn_reference_on_gpu()
        return "reference"
    if path == "numba" and device.type != "cpu":
        raise ValueError(f"{ENV}=numba runs CPU tensors only, got a tensor on {device}")
    if path == "triton" and not triton_available():
        raise RuntimeError(f"{ENV}=triton, but Triton cannot be imported: pip install triton")
    return path


def accelerated(x: torch.Tensor) -> bool:
    """Whether ops on ``x`` run on compiled kernels (numba or Triton), not on the reference."""
    return path_for(x) != "reference"


def _triton_backend() -> Backend:
    from dropkit.kernels import gpu

    return gpu.BACKEND


#: path -> its Backend (Triton imported when first asked for)
_BACKENDS: dict[str, Callable[[], Backend]] = {"numba": lambda: NUMBA, "triton": _triton_backend,
                                               "reference": lambda: REFERENCE}


def _backend(x: torch.Tensor) -> Backend:
    return _BACKENDS[path_for(x)]()


# --- the dispatched ops ----------------------------------------------------------------------------

def masked(
    x: torch.Tensor, seed: int, p: float, kind: str, *, save_bits: bool = False, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``keep ? f(x) : c`` (see :mod:`.reference`) with an element-wise mask from ``(seed, offset)``.

    Returns the output and, with ``save_bits``, the packed keep mask (``ceil(numel / 8)`` bytes).
    """
    return _backend(x).masked(x.contiguous(), seed, p, kind, save_bits, offset)


def masked_from_bits(x: torch.Tensor, bits: torch.Tensor, p: float, kind: str) -> torch.Tensor:
    """``keep ? f(x) : c`` with the keep mask read from a packed mask made by :func:`masked`."""
    return _backend(x).masked_from_bits(x.contiguous(), bits.contiguous(), p, kind)


def gaussian(x: torch.Tensor, seed: int, p: float, offset: int = 0) -> torch.Tensor:
    """Gaussian dropout ``x * (1 + sigma * z)``; applied to a gradient it is also the backward."""
    return _backend(x).gaussian(x.contiguous(), seed, p, offset)


def keep_mask(
    seed: int, p: float, shape: tuple[int, ...], offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean keep mask of ``shape`` (p in [0, 1]) drawn on ``device`` by that device's path, e.g. the
    shared masks of channel dropout (on CUDA the Triton kernel: no mask crosses from the CPU)."""
    device = torch.device(device)
    return _BACKENDS[path_on(device)]().keep_mask(seed, p, tuple(shape), offset, device)


def relu_dropout_grad(grad: torch.Tensor, out: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Gradient of the ``relu_dropout`` masked op from its output ``out`` (see :mod:`.reference`).

    No mask is involved, so this is torch's own ReLU gradient (``threshold_backward``) divided by
    ``1 - p`` in the opmath type: bit for bit the reference (NaN outputs pass the gradient, as torch's
    ReLU does), in every dtype and on every device. On the CPU with a float ``p`` the division is in
    place by the Python number (CPU kernels divide by a scalar exactly; CUDA ones multiply by its
    reciprocal, so elsewhere the divisor is a tensor on the gradient's device). ``p`` may be a 0-dim
    tensor (a compiled graph's rate). In the MLP step it beat a numba pass over the same bytes:
    torch's element-wise loops start from C++ on its own thread pool, with no Python in between.
    """
    grad, out = grad.contiguous(), out.contiguous()
    kept = torch.ops.aten.threshold_backward(grad, out, 0)
    if grad.device.type == "cpu" and not isinstance(p, torch.Tensor):
        return kept.div_(1.0 - p)
    opmath = reference.opmath_dtype(grad.dtype)
    if isinstance(p, torch.Tensor):
        scale = (1.0 - p).to(opmath)
    else:
        scale = torch.full((), 1.0 - p, dtype=opmath, device=grad.device)
    return (kept.to(opmath) / scale).to(grad.dtype)


# --- reference path --------------------------------------------------------------------------------

def _reference_masked(x, seed, p, kind, save_bits, offset):
    keep = reference.keep_mask(seed, p, tuple(x.shape), offset, x.device)
    return reference.masked(x, keep, kind, p), reference.pack_bits(keep) if save_bits else None


def _reference_from_bits(x, bits, p, kind):
    return reference.masked(x, reference.unpack_bits(bits, tuple(x.shape)), kind, p)


REFERENCE = Backend(_reference_masked, _reference_from_bits, reference.gaussian, reference.keep_mask)


# --- numba path ------------------------------------------------------------------------------------

def _numba_masked(x, seed, p, kind, save_bits, offset):
    if x.dtype == torch.float16:
        out, bits = _numba_masked(x.float(), seed, p, kind, save_bits, offset)
        return out.half(), bits
    out = torch.empty_like(x)
    bits = torch.empty(-(-x.numel() // 8), dtype=torch.uint8) if save_bits else None
    a, b, c = _constants(kind, p, x.dtype)
    k0, k1 = _key(seed)
    width, thr = rng.keep_threshold(p)
    run_parallel(x.numel(), cpu.masked_seed, _array(x), _array(out), _NO_BITS if bits is None else bits.numpy(),
                 k0, k1, offset, width, thr, _KIND_CODES[kind], a, b, c, save_bits)
    return out, bits


def _numba_from_bits(x, bits, p, kind):
    if x.dtype == torch.float16:
        return _numba_from_bits(x.float(), bits, p, kind).half()
    out = torch.empty_like(x)
    a, b, c = _constants(kind, p, x.dtype)
    run_parallel(x.numel(), cpu.masked_bits, _array(x), _array(out), bits.numpy(), _KIND_CODES[kind], a, b, c)
    return out


def _numba_gaussian(x, seed, p, offset):
    if x.dtype == torch.float16:
        return _numba_gaussian(x.float(), seed, p, offset).half()
    out = torch.empty_like(x)
    k0, k1 = _key(seed)
    run_parallel(x.numel() * _GAUSSIAN_COST, cpu.gaussian, _array(x), _array(out), k0, k1, offset,
                 math.sqrt(p / (1.0 - p)))
    return out


def _numba_keep_mask(seed, p, shape, offset, device):
    out = torch.empty(shape, dtype=torch.bool)
    k0, k1 = _key(seed)
    run_parallel(out.numel(), cpu.keep_mask, out.numpy().reshape(-1), k0, k1, offset, *rng.keep_threshold(p))
    return out


NUMBA = Backend(_numba_masked, _numba_from_bits, _numba_gaussian, _numba_keep_mask)


def warmup() -> float:
    """Compile (or load from the on-disk cache) every CPU kernel for every dtype now, rather than in
    the first training step; returns the seconds it took. ``dropkit warmup`` calls it."""
    start = time.perf_counter()
    for dtype in _NATIVE:
        x = torch.zeros(16, dtype=dtype)
        out, bits = _numba_masked(x, 1, 0.5, "dropout", True, 0)
        _numba_from_bits(x, bits, 0.5, "dropout")
        _numba_gaussian(x, 1, 0.5, 0)
    _numba_keep_mask(1, 0.5, (16,), 0, "cpu")
    return time.perf_counter() - start


def _array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor; bfloat16 as its uint16 bit pattern."""
    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(np.uint16).reshape(-1)
    return t.detach().numpy().reshape(-1)


@functools.lru_cache(maxsize=256)
def _constants(kind: str, p: float, dtype: torch.dtype) -> tuple[np.floating, ...]:
    """The masked op's constants as scalars of the kernel's arithmetic type."""
    scalar = np.float64 if dtype == torch.float64 else np.float32
    return tuple(scalar(v) for v in reference.kind_constants(kind, p, dtype))


def _key(seed: int) -> tuple[np.uint64, np.uint64]:
    """Philox key words (k0, k1) of a 64-bit seed."""
    return np.uint64(seed & rng.MASK32), np.uint64((seed >> 32) & rng.MASK32)


def run_parallel(work: int, kernel, *args) -> None:
    """Run a compiled ``kernel(*args)`` on a thread team sized like torch's intra-op pool, with at
    least :data:`MIN_ELEMENTS_PER_THREAD` elements' worth of ``work`` per thread, and leave torch's
    thread count as it was.

    A parallel region lasts as long as its slowest thread, and a thread that has to share its core
    with another process can hold it up for a scheduler time slice, so tiny inputs run on the
    calling thread. torch's own workers are no such risk: numba's OpenMP layer runs on the same
    OpenMP runtime and the same pool threads, which are awake right after torch's last op. In the
    MLP step (2**18-element activations) two threads made the dropout step 1.033-1.045x the step
    without dropout, against 1.039-1.085x on one (seven runs each).

    numba's team size is set only when it changes (:func:`_set_numba_threads`). Starting numba's
    pool resets the shared runtime's thread count: without the restore below, the first large
    kernel would silently undo ``torch.set_num_threads`` (and oversubscribe the cores of
    data-parallel workers).
    """
    threads = torch.get_num_threads()
    _set_numba_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS, work // MIN_ELEMENTS_PER_THREAD)))
    kernel(*args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


#: ``count``: the team size this Python thread last gave numba (numba's setting is per thread too)
_numba_threads = threading.local()


def _set_numba_threads(count: int) -> None:
    """``numba.set_num_threads(count)`` unless this thread already set it. The call takes two locks,
    one of them process-wide, and cost about 30 us before every kernel in the middle of a training
    step (1 us alone). A team size set by other code in between goes unnoticed; that changes the
    speed of a kernel, never its result."""
    if getattr(_numba_threads, "count", 0) != count:
        numba.set_num_threads(count)
        _numba_threads.count = count
