"""Per-element ops of the dropout family on torch tensors: picks a kernel and moves no data.

On the CPU, float32, float64 and bfloat16 run on the numba kernels of :mod:`.cpu`, which read and
write the tensors' own memory (``Tensor.numpy()`` views; bfloat16 as its ``uint16`` bit pattern).
float16 runs on the float32 kernels between two conversions, which is exact because every op is
computed in float32 and rounded once. Everything else (other devices) falls back to the plain-torch
:mod:`.reference`, the ground truth the kernels are tested against. The one op here with no
random mask, the gradient of ``relu_dropout``, is torch's own ReLU gradient and a division on
every device (see :func:`relu_dropout_grad`).

Inputs are read in their logical index order: a non-contiguous input is copied to a contiguous one
first, and outputs are contiguous; outputs of 32 MiB and more reuse the memory of earlier ones
that were freed (:mod:`dropkit.block_cache`), which spares the page faults of their first write,
and inputs that large with 8- or 16-bit draws are prefetched a block ahead
(:func:`prefetches`). ``seed`` is a Python int (a Philox key) and ``offset`` the first counter of the stream, 0 for
a whole-tensor op.
"""

from __future__ import annotations

import functools
import math
import threading

import numba
import numpy as np
import torch

from dropkit import rng
from dropkit.block_cache import empty_like as output_like
from dropkit.kernels import cpu, reference

__all__ = ["compiled", "gaussian", "keep_mask", "masked", "masked_from_bits", "prefetches", "reference",
           "relu_dropout_grad"]

#: elements per thread below which a kernel runs on fewer threads (see run_parallel)
MIN_ELEMENTS_PER_THREAD = 2**16
#: a Box-Muller draw (log, cos, sqrt) costs about as much as this many selects
_GAUSSIAN_COST = 32
#: the narrowest draws whose Philox phase is long enough to hide the next block's prefetches in
PREFETCH_MIN_WIDTH = 8
#: inputs from this size on are prefetched: past the 32 MiB last-level cache of the project's VMs.
#: Inputs that fit in it only pay for the extra instructions (float32 at 2**20 elements: 2.3-2.9 ->
#: 2.9-3.8x a warm copy; BENCHMARKS.md, stop 17)
PREFETCH_MIN_BYTES = 32 * 2**20
_NATIVE = (torch.float32, torch.float64, torch.bfloat16)
_NO_BITS = np.empty(0, dtype=np.uint8)
_KIND_CODES = {"dropout": cpu.DROPOUT, "alpha": cpu.ALPHA, "alpha_grad": cpu.ALPHA_GRAD, "relu_dropout": cpu.RELU_DROPOUT}


def compiled(x: torch.Tensor) -> bool:
    """Whether ops on ``x`` run on the compiled kernels (else on the reference)."""
    return x.device.type == "cpu" and (x.dtype in _NATIVE or x.dtype == torch.float16)


def prefetches(width: int, nbytes: int) -> bool:
    """Whether a masked op with ``width``-bit draws on an input of ``nbytes`` prefetches each next
    block during the current block's Philox phase (:func:`.cpu._draw_prefetching`): where there is a
    Philox phase to hide the prefetches in, and data that comes from memory rather than a cache."""
    return width >= PREFETCH_MIN_WIDTH and nbytes >= PREFETCH_MIN_BYTES


def masked(
    x: torch.Tensor, seed: int, p: float, kind: str, *, save_bits: bool = False, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``keep ? f(x) : c`` (see :mod:`.reference`) with an element-wise mask from ``(seed, offset)``.

    Returns the output and, with ``save_bits``, the packed keep mask (``ceil(numel / 8)`` bytes).
    """
    x = x.contiguous()
    if not compiled(x):
        keep = reference.keep_mask(seed, p, tuple(x.shape), offset, x.device)
        bits = reference.pack_bits(keep) if save_bits else None
        return reference.masked(x, keep, kind, p), bits
    if x.dtype == torch.float16:
        out, bits = masked(x.float(), seed, p, kind, save_bits=save_bits, offset=offset)
        return out.half(), bits
    out = output_like(x)
    bits = torch.empty(-(-x.numel() // 8), dtype=torch.uint8) if save_bits else None
    a, b, c = _constants(kind, p, x.dtype)
    k0, k1 = _key(seed)
    width, thr = rng.keep_threshold(p)
    run_parallel(x.numel(), cpu.masked_seed, _array(x), _array(out), _NO_BITS if bits is None else bits.numpy(),
                 k0, k1, offset, width, thr, _KIND_CODES[kind], a, b, c, save_bits, prefetches(width, x.nbytes))
    return out, bits


def masked_from_bits(x: torch.Tensor, bits: torch.Tensor, p: float, kind: str) -> torch.Tensor:
    """``keep ? f(x) : c`` with the keep mask read from a packed mask made by :func:`masked`."""
    x = x.contiguous()
    if not compiled(x):
        return reference.masked(x, reference.unpack_bits(bits, tuple(x.shape)), kind, p)
    if x.dtype == torch.float16:
        return masked_from_bits(x.float(), bits, p, kind).half()
    out = output_like(x)
    a, b, c = _constants(kind, p, x.dtype)
    run_parallel(x.numel(), cpu.masked_bits, _array(x), _array(out), bits.contiguous().numpy(), _KIND_CODES[kind], a, b, c)
    return out


def relu_dropout_grad(grad: torch.Tensor, out: torch.Tensor, p: float) -> torch.Tensor:
    """Gradient of the ``relu_dropout`` masked op from its output ``out`` (see :mod:`.reference`).

    No mask is involved, so this is torch's own ReLU gradient (``threshold_backward``) divided in
    place by ``1 - p``: bit for bit the reference (NaN outputs pass the gradient, as torch's ReLU
    does), in every dtype. In the MLP step it beat a numba pass over the same bytes (1.008-1.033x
    of the no-dropout step against 1.036-1.051x, same runs): torch's element-wise loops start from
    C++ on its own thread pool, with no Python in between.
    """
    grad, out = grad.contiguous(), out.contiguous()
    return torch.ops.aten.threshold_backward(grad, out, 0).div_(1.0 - p)


def gaussian(x: torch.Tensor, seed: int, p: float, offset: int = 0) -> torch.Tensor:
    """Gaussian dropout ``x * (1 + sigma * z)``; applied to a gradient it is also the backward."""
    x = x.contiguous()
    if not compiled(x):
        return reference.gaussian(x, seed, p, offset)
    if x.dtype == torch.float16:
        return gaussian(x.float(), seed, p, offset).half()
    out = output_like(x)
    k0, k1 = _key(seed)
    run_parallel(x.numel() * _GAUSSIAN_COST, cpu.gaussian, _array(x), _array(out), k0, k1, offset,
                 math.sqrt(p / (1.0 - p)))
    return out


def keep_mask(
    seed: int, p: float, shape: tuple[int, ...], offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean keep mask of ``shape`` (p in [0, 1]), e.g. the shared masks of channel dropout."""
    if torch.device(device).type != "cpu":
        return reference.keep_mask(seed, p, shape, offset, device)
    out = torch.empty(shape, dtype=torch.bool)
    k0, k1 = _key(seed)
    run_parallel(out.numel(), cpu.keep_mask, out.numpy().reshape(-1), k0, k1, offset, *rng.keep_threshold(p))
    return out


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
