"""Triton kernels for the dropout family: one pass over memory per op, the CPU kernels' masks.

What: the per-element ops of :mod:`dropkit.kernels.reference` as Triton kernels, each next to the
Python function that launches it: the masked ops (dropout, alpha dropout and its gradient, ReLU then
dropout) with the mask regenerated from ``(seed, offset)`` or read from a packed bit mask, Gaussian
dropout, the boolean keep masks that the channel, locked and path variants broadcast, and the fused
``residual + dropout(act(x + bias))`` of :func:`dropkit.functional.bias_act_dropout` with its
backward. :data:`BACKEND` is what :mod:`dropkit.kernels` dispatches CUDA tensors to.

The stream layout is :mod:`dropkit.rng`'s, so a mask equals the CPU kernels' mask bit for bit for
the same ``(seed, offset)``: ``tl.randint4x(seed, counter)`` is Philox4x32-10 with key
``(seed & 0xFFFFFFFF, seed >> 32)`` and counter ``(counter & 0xFFFFFFFF, counter >> 32, 0, 0)``
for a 64-bit counter, exactly :func:`dropkit.rng.philox4x32`. A program handles :data:`BLOCK`
elements laid out as a ``(counters, elements per counter)`` tile: at ``w`` bits per element one
Philox call serves ``128 / w`` consecutive elements, element ``e`` of a counter reading ``w`` bits
from bit ``w * e`` of the four output words laid end to end. So Philox runs once per counter, not
once per element (at p = 0.5 one call gives 128 elements' draws).

Arithmetic follows the reference: float32 opmath for float32, float16 and bfloat16, one rounding
to the output dtype; the division is IEEE round-to-nearest (``div_rn``), and the alpha map's
multiply and add are two roundings, as the reference's: a select stands between them, so the
compiler cannot fuse them into one multiply-add. bfloat16 is widened and rounded (to nearest even,
NaN to 0x7FC0) through its bit pattern, as torch and the CPU kernels do. float64 tensors take the reference (Triton takes scalar arguments as
float32, and float64 dropout on a GPU is rare). Gaussian noise is float32 Box-Muller where the
reference is float64: ``log u1`` is taken as ``log1p(-(1 - u1))`` for ``u1 >= 1/2`` with
``1 - u1`` formed exactly from the integer draw (a plain float32 ``log u1`` would be off by up to
25 % there), so the multiplier ``1 + sigma z`` stays within :data:`GAUSSIAN_TOLERANCE` float32
epsilons of ``1 + sigma r`` of the reference's, ``r = sqrt(-2 log u1)`` the draw's radius (the
float32 angle moves z by up to r times its rounding).

Seeds reach a kernel either as a Python int (the :data:`BACKEND` functions, called with the ints
the dispatcher passes) or as a 0-dim int64 tensor read inside the kernel (the ``torch.library``
ops of :mod:`dropkit.ops`), so a captured CUDA graph reads a fresh seed at every replay. The rate
likewise: a Python float, or a 0-dim float64 tensor from which :func:`rate_params` computes the
draw width, threshold and constants with torch ops and the ``*_rate_kernel`` variants read them
from memory, taking the branch of their draw width; a compiled graph then serves every rate.

Everything here also runs under Triton's interpreter (``TRITON_INTERPRET=1``, read when this
module is imported) on CPU tensors; that is how the tests check it without a GPU.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from dropkit import kernels, rng
from dropkit.kernels import reference

__all__ = ["ACTIVATIONS", "BACKEND", "BLOCK", "GAUSSIAN_TOLERANCE", "bias_act_dropout", "bias_act_dropout_backward",
           "gaussian", "keep_mask", "masked", "masked_from_bits", "rate_params"]

#: elements per program: a multiple of 128, so every draw width fills whole counters
BLOCK = 1024
#: the multiplier ``1 + sigma z`` is within this many float32 epsilons times ``1 + sigma r`` of the
#: reference's (``r = sqrt(-2 log u1)``, the Box-Muller radius)
GAUSSIAN_TOLERANCE = 8
#: activation codes of the fused kernel
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2}
_KINDS = {"dropout": 0, "alpha": 1, "alpha_grad": 2, "relu_dropout": 3}
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- random draws ---------------------------------------------------------------------------------

@triton.jit
def _seed_value(seed, SEED_IN_TENSOR: tl.constexpr):
    """The 64-bit seed: read from a 0-dim int64 tensor, or the integer argument itself."""
    if SEED_IN_TENSOR:
        value = tl.load(seed).to(tl.int64)
    else:
        value = seed.to(tl.int64)
    return value


@triton.jit
def _uniform_tile(seed, offset, block, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """The ``WIDTH``-bit draws of elements ``block * BLOCK + (c * E + e)`` as a ``(C, E)`` tile,
    ``E = 128 / WIDTH`` elements per Philox counter and ``C = BLOCK / E`` counters."""
    E: tl.constexpr = 128 // WIDTH
    C: tl.constexpr = BLOCK // E
    counter = block * C + tl.arange(0, C).to(tl.int64) + offset
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    position = tl.arange(0, E)[None, :] * WIDTH  # bit of the 128 that element e starts at
    word = position // 32
    chosen = tl.where(word == 0, w0[:, None],
                      tl.where(word == 1, w1[:, None], tl.where(word == 2, w2[:, None], w3[:, None])))
    return (chosen.to(tl.uint32) >> (position % 32).to(tl.uint32)) & ((1 << WIDTH) - 1)


@triton.jit
def _tile_index(block, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """Element indices of the ``(C, E)`` tile that :func:`_uniform_tile` draws for."""
    E: tl.constexpr = 128 // WIDTH
    C: tl.constexpr = BLOCK // E
    return block * BLOCK + tl.arange(0, C).to(tl.int64)[:, None] * E + tl.arange(0, E)[None, :]


@triton.jit
def _pack_tile(keep, BLOCK: tl.constexpr):
    """Keep flags of a block (in element order) packed 8 per byte, element 8k+t in bit t."""
    flags = tl.reshape(keep.to(tl.int32), (BLOCK // 8, 8))
    return tl.sum(flags << tl.arange(0, 8)[None, :], axis=1).to(tl.uint8)


@triton.jit
def _widened(v):
    """A loaded tile in float32; bfloat16 by its bit pattern (exact, subnormals kept)."""
    if v.dtype == tl.bfloat16:
        wide = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        wide = v.to(tl.float32)
    return wide


@triton.jit
def _rounded(v, DTYPE: tl.constexpr):
    """float32 ``v`` rounded to ``DTYPE`` to nearest even; bfloat16 by its bit pattern (as torch
    and the CPU kernels round: NaN becomes 0x7FC0), so it does not rest on the conversion the
    backend or the interpreter picks."""
    if DTYPE == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(v != v, 0x7FC0, bits).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        rounded = v.to(DTYPE)
    return rounded


@triton.jit
def _masked_value(x, a, b, c, keep, KIND: tl.constexpr):
    """``keep ? f(x) : c`` in float32 (the reference's table of kinds)."""
    if KIND == 1:  # alpha: x * a + b; here c is sat * a (see masked), so that the select stands
        out = tl.where(keep, x * a, c) + b  # between the product and the add: two roundings
    else:
        if KIND == 0:  # dropout
            kept = tl.math.div_rn(x, a)
        elif KIND == 2:  # alpha_grad
            kept = x * a
        else:  # relu_dropout: torch.relu first (-0.0 and NaN pass), then the scale
            kept = tl.math.div_rn(tl.where(x < 0.0, 0.0, x), a)
        out = tl.where(keep, kept, c)
    return out


# --- the rate in a tensor -------------------------------------------------------------------------

def rate_params(rate: torch.Tensor, kind: str, rate_bits: int | None = None) -> torch.Tensor:
    """The kernel parameters of the drop rate held in ``rate`` (a 0-dim float64 tensor), as a float32
    tensor ``(width, thr, a, b, c)`` on the rate's device, computed by torch ops.

    ``(width, thr)`` is :func:`dropkit.rng.keep_threshold` at ``rate_bits`` (default: the current
    :func:`dropkit.rng.rate_bits`); ``(a, b, c)`` are :func:`_constants` of ``kind`` (``"gaussian"``:
    ``a`` is the noise's sigma). Every value is the one a launch with a Python float passes: the same
    float64 operations in the same order, then one rounding to float32 (``width`` and ``thr`` are
    integers below 2**17, exact in float32). A compiled graph computes them from the rate at run
    time, so a new rate runs the graph it has (the kernels read them, see :func:`_rate_draw`).
    """
    bits = rng.rate_bits() if rate_bits is None else rate_bits
    step = 2.0 ** (16 - bits)
    full = torch.round(rate * 2.0**bits) * step  # rng.threshold: round half to even, as Python's round
    width, thr = torch.full_like(rate, 16.0), full
    for w in (8, 4, 2, 1):  # the fewest bits that hold the threshold exactly wins
        fits = torch.remainder(full, 2.0 ** (16 - w)) == 0
        width = torch.where(fits, float(w), width)
        thr = torch.where(fits, full / 2.0 ** (16 - w), thr)
    keep = 1.0 - rate
    zero = torch.zeros_like(rate)
    if kind in ("dropout", "relu_dropout"):
        a, b, c = keep, zero, zero
    elif kind == "gaussian":
        a, b, c = torch.sqrt(rate / keep), zero, zero
    else:
        a = 1.0 / torch.sqrt(keep * (1.0 + rate * reference.SELU_SATURATION**2))
        b, c = (-a * reference.SELU_SATURATION * rate, zero) if kind == "alpha" else (zero, zero)
    values = [t.to(torch.float32) for t in (width, thr, a, b, c)]
    if kind == "alpha":  # SELU's saturation times a, in float32 (see _constants)
        values[4] = torch.full_like(values[2], reference.SELU_SATURATION) * values[2]
    return torch.stack(values)


@triton.jit
def _rate_draw(params_ptr):
    """``(width, thr)`` of a rate's parameters (:func:`rate_params`) as int32."""
    return tl.load(params_ptr).to(tl.int32), tl.load(params_ptr + 1).to(tl.int32)


# --- masked ops -----------------------------------------------------------------------------------

@triton.jit
def _masked_block(x_ptr, out_ptr, bits_ptr, seed, offset, n, thr, a, b, c,
                  KIND: tl.constexpr, WIDTH: tl.constexpr, SAVE_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """One program's block of a masked op (``seed`` the 64-bit value)."""
    block = tl.program_id(0).to(tl.int64)
    index = _tile_index(block, WIDTH, BLOCK)
    inside = index < n
    keep = (_uniform_tile(seed, offset, block, WIDTH, BLOCK) >= thr) & inside
    x = _widened(tl.load(x_ptr + index, mask=inside, other=0.0))
    out = _masked_value(x, a, b, c, keep, KIND)
    tl.store(out_ptr + index, _rounded(out, out_ptr.dtype.element_ty), mask=inside)
    if SAVE_BITS:
        byte = block * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(bits_ptr + byte, _pack_tile(tl.reshape(keep, (BLOCK,)), BLOCK), mask=byte < (n + 7) // 8)


@triton.jit(do_not_specialize=["seed", "offset", "thr"])
def _masked_kernel(x_ptr, out_ptr, bits_ptr, seed, offset, n, thr, a, b, c,
                   KIND: tl.constexpr, WIDTH: tl.constexpr, SAVE_BITS: tl.constexpr,
                   SEED_IN_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    _masked_block(x_ptr, out_ptr, bits_ptr, _seed_value(seed, SEED_IN_TENSOR), offset, n, thr, a, b, c,
                  KIND, WIDTH, SAVE_BITS, BLOCK)


@triton.jit(do_not_specialize=["offset"])
def _masked_rate_kernel(x_ptr, out_ptr, bits_ptr, seed_ptr, params_ptr, offset, n,
                        KIND: tl.constexpr, SAVE_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`_masked_kernel` with the seed and the rate's parameters read from memory: the draw
    width is a run-time value here, so each width has its branch."""
    seed = tl.load(seed_ptr).to(tl.int64)
    width, thr = _rate_draw(params_ptr)
    a, b, c = tl.load(params_ptr + 2), tl.load(params_ptr + 3), tl.load(params_ptr + 4)
    for k in tl.static_range(5):  # widths 1, 2, 4, 8, 16
        if width == (1 << k):
            _masked_block(x_ptr, out_ptr, bits_ptr, seed, offset, n, thr, a, b, c, KIND, 1 << k, SAVE_BITS, BLOCK)


def _launch(kernel, traceable: bool):
    """``kernel`` itself, or wrapped by ``torch.library.wrap_triton`` so that the body of a
    ``torch.library.triton_op`` shows torch.compile the kernel (eager launches skip that layer)."""
    return torch.library.wrap_triton(kernel) if traceable else kernel


@functools.lru_cache(maxsize=256)
def _constants(kind: str, p: float) -> tuple[float, float, float]:
    """The kernels' ``(a, b, c)`` of a masked op (float32 opmath), in plain Python and numpy. For
    alpha dropout ``c`` is SELU's saturation value times ``a`` rounded to float32: the kernel adds
    ``b`` to it, which gives the reference's dropped value (see :func:`_masked_value`)."""
    if kind == "alpha":
        a, b = reference.alpha_affine(p)
        return a, b, float(np.float32(reference.SELU_SATURATION) * np.float32(a))
    return reference.kind_constants(kind, p, torch.float32)


def masked(x: torch.Tensor, seed: int | torch.Tensor, p: float | torch.Tensor, kind: str, save_bits: bool = False,
           offset: int = 0, *, rate_bits: int | None = None,
           traceable: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``keep ? f(x) : c`` with the element-wise mask of ``(seed, offset)``; with ``save_bits`` also
    the packed keep mask. ``seed`` is an int or a 0-dim int64 tensor on ``x``'s device; ``p`` a float,
    or a 0-dim float64 tensor on ``x``'s device (then ``seed`` is a tensor too and the kernel reads
    both, see :func:`rate_params`); ``x`` is contiguous. float64 runs on the reference (not with ``traceable``)."""
    if x.dtype not in _TRITON_DTYPES:
        return kernels.REFERENCE.masked(x, int(seed), float(p), kind, save_bits, offset)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device) if save_bits else None
    if n and isinstance(p, torch.Tensor):
        _launch(_masked_rate_kernel, traceable)[(triton.cdiv(n, BLOCK),)](
            x, out, x if bits is None else bits, seed, rate_params(p, kind, rate_bits), offset, n,
            KIND=_KINDS[kind], SAVE_BITS=save_bits, BLOCK=BLOCK)
    elif n:
        width, thr = rng.keep_threshold(p)
        a, b, c = _constants(kind, p)
        _launch(_masked_kernel, traceable)[(triton.cdiv(n, BLOCK),)](
            x, out, x if bits is None else bits, seed, offset, n, thr, a, b, c,
            KIND=_KINDS[kind], WIDTH=width, SAVE_BITS=save_bits, SEED_IN_TENSOR=isinstance(seed, torch.Tensor),
            BLOCK=BLOCK)
    return out, bits


@triton.jit
def _from_bits_kernel(x_ptr, bits_ptr, out_ptr, n, a, b, c, KIND: tl.constexpr, RATE_IN_TENSOR: tl.constexpr,
                      BLOCK: tl.constexpr):
    if RATE_IN_TENSOR:  # a points at the rate's parameters (rate_params)
        ka, kb, kc = tl.load(a + 2), tl.load(a + 3), tl.load(a + 4)
    else:
        ka, kb, kc = a, b, c
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    byte = tl.load(bits_ptr + (index >> 3), mask=inside, other=0).to(tl.int32)
    keep = ((byte >> (index & 7).to(tl.int32)) & 1) != 0
    x = _widened(tl.load(x_ptr + index, mask=inside, other=0.0))
    tl.store(out_ptr + index, _rounded(_masked_value(x, ka, kb, kc, keep, KIND), out_ptr.dtype.element_ty),
             mask=inside)


def masked_from_bits(x: torch.Tensor, bits: torch.Tensor, p: float | torch.Tensor, kind: str, *,
                     traceable: bool = False) -> torch.Tensor:
    """``keep ? f(x) : c`` with the keep mask read from a packed bit mask; ``p`` as in :func:`masked`."""
    if x.dtype not in _TRITON_DTYPES:
        return kernels.REFERENCE.masked_from_bits(x, bits, float(p), kind)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n:
        in_tensor = isinstance(p, torch.Tensor)
        a, b, c = (rate_params(p, kind), 0.0, 0.0) if in_tensor else _constants(kind, p)
        _launch(_from_bits_kernel, traceable)[(triton.cdiv(n, BLOCK),)](
            x, bits, out, n, a, b, c, KIND=_KINDS[kind], RATE_IN_TENSOR=in_tensor, BLOCK=BLOCK)
    return out


# --- keep masks -----------------------------------------------------------------------------------

@triton.jit
def _keep_mask_block(out_ptr, seed, offset, n, thr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    index = _tile_index(block, WIDTH, BLOCK)
    keep = _uniform_tile(seed, offset, block, WIDTH, BLOCK) >= thr
    tl.store(out_ptr + index, keep.to(tl.uint8), mask=index < n)


@triton.jit(do_not_specialize=["seed", "offset", "thr"])
def _keep_mask_kernel(out_ptr, seed, offset, n, thr, WIDTH: tl.constexpr, SEED_IN_TENSOR: tl.constexpr,
                      BLOCK: tl.constexpr):
    _keep_mask_block(out_ptr, _seed_value(seed, SEED_IN_TENSOR), offset, n, thr, WIDTH, BLOCK)


@triton.jit(do_not_specialize=["offset"])
def _keep_mask_rate_kernel(out_ptr, seed_ptr, params_ptr, offset, n, BLOCK: tl.constexpr):
    """:func:`_keep_mask_kernel` with the seed and the rate read from memory (see :func:`_masked_rate_kernel`)."""
    seed = tl.load(seed_ptr).to(tl.int64)
    width, thr = _rate_draw(params_ptr)
    for k in tl.static_range(5):
        if width == (1 << k):
            _keep_mask_block(out_ptr, seed, offset, n, thr, 1 << k, BLOCK)


def keep_mask(seed: int | torch.Tensor, p: float | torch.Tensor, shape: tuple[int, ...], offset: int = 0,
              device: torch.device | str = "cuda", *, rate_bits: int | None = None,
              traceable: bool = False) -> torch.Tensor:
    """Boolean keep mask of ``shape`` on ``device`` (element i kept iff its draw >= the threshold);
    ``seed`` and ``p`` as in :func:`masked`, on ``device`` when they are tensors."""
    out = torch.empty(tuple(shape), dtype=torch.uint8, device=device)
    n = out.numel()
    if n and isinstance(p, torch.Tensor):
        _launch(_keep_mask_rate_kernel, traceable)[(triton.cdiv(n, BLOCK),)](
            out, seed, rate_params(p, "dropout", rate_bits), offset, n, BLOCK=BLOCK)
    elif n:
        width, thr = rng.keep_threshold(p)
        _launch(_keep_mask_kernel, traceable)[(triton.cdiv(n, BLOCK),)](
            out, seed, offset, n, thr, WIDTH=width, SEED_IN_TENSOR=isinstance(seed, torch.Tensor), BLOCK=BLOCK)
    return out.view(torch.bool)


# --- Gaussian dropout -----------------------------------------------------------------------------

@triton.jit
def _normal_tile(seed, offset, block, BLOCK: tl.constexpr):
    """Standard normal draws of the block's elements as a ``(BLOCK / 2, 2)`` tile (the ``normal``
    stream: element 2j + e of counter j takes words 2e, 2e + 1 as u1, u2), in float32."""
    counter = block * (BLOCK // 2) + tl.arange(0, BLOCK // 2).to(tl.int64) + offset
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    second = tl.arange(0, 2)[None, :] == 1
    first_word = tl.where(second, w2[:, None], w0[:, None]).to(tl.uint32)
    angle_word = tl.where(second, w3[:, None], w1[:, None]).to(tl.uint32)
    u1 = (first_word.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # (w + 1/2) / 2**32
    # 1 - u1 from the integer (exact before one rounding), for log(u1) = log1p(-(1 - u1)) near 1
    d = ((0xFFFFFFFF - first_word).to(tl.float32) + 0.5) * 2.3283064365386963e-10
    y = 1.0 - d
    log1p = tl.where(y == 1.0, -d, tl.log(y) * (-d / (y - 1.0)))  # Kahan's log1p from log
    log_u1 = tl.where(u1 < 0.5, tl.log(u1), log1p)
    u2 = angle_word.to(tl.float32) * 2.3283064365386963e-10
    return tl.sqrt(-2.0 * log_u1) * tl.cos(6.283185307179586 * u2)


@triton.jit(do_not_specialize=["seed", "offset"])
def _gaussian_kernel(x_ptr, out_ptr, seed, offset, n, sigma, SEED_IN_TENSOR: tl.constexpr,
                     RATE_IN_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    if RATE_IN_TENSOR:  # sigma points at the rate's parameters (rate_params, kind "gaussian")
        s = tl.load(sigma + 2)
    else:
        s = sigma
    block = tl.program_id(0).to(tl.int64)
    index = block * BLOCK + tl.arange(0, BLOCK // 2).to(tl.int64)[:, None] * 2 + tl.arange(0, 2)[None, :]
    inside = index < n
    z = _normal_tile(_seed_value(seed, SEED_IN_TENSOR), offset, block, BLOCK)
    x = _widened(tl.load(x_ptr + index, mask=inside, other=0.0))
    tl.store(out_ptr + index, _rounded(x * (1.0 + s * z), out_ptr.dtype.element_ty), mask=inside)


def gaussian(x: torch.Tensor, seed: int | torch.Tensor, p: float | torch.Tensor, offset: int = 0, *,
             traceable: bool = False) -> torch.Tensor:
    """Gaussian dropout ``x * (1 + sigma z)``, ``sigma = sqrt(p / (1 - p))``; also its gradient.
    ``seed`` and ``p`` as in :func:`masked`."""
    if x.dtype not in _TRITON_DTYPES:
        return kernels.REFERENCE.gaussian(x, int(seed), float(p), offset)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n:
        in_tensor = isinstance(p, torch.Tensor)
        _launch(_gaussian_kernel, traceable)[(triton.cdiv(n, BLOCK),)](
            x, out, seed, offset, n, rate_params(p, "gaussian") if in_tensor else math.sqrt(p / (1.0 - p)),
            SEED_IN_TENSOR=isinstance(seed, torch.Tensor), RATE_IN_TENSOR=in_tensor, BLOCK=BLOCK)
    return out


# --- fused bias + activation + dropout + residual -------------------------------------------------

@triton.jit
def _pre_activation(x_ptr, bias_ptr, index, inside, features, HAS_BIAS: tl.constexpr):
    """``x + bias`` in float32, rounded once to the dtype as the unfused add rounds it."""
    h = _widened(tl.load(x_ptr + index, mask=inside, other=0.0))
    if HAS_BIAS:
        bias = _widened(tl.load(bias_ptr + index % features, mask=inside, other=0.0))
        h = _widened(_rounded(h + bias, x_ptr.dtype.element_ty))
    return h


@triton.jit
def _gelu(h):
    """GELU with the exact erf form, as ``torch.nn.functional.gelu``'s default."""
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def _activation(h, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        act = tl.where(h < 0.0, 0.0, h)
    elif ACTIVATION == 2:
        act = _gelu(h)
    else:
        act = h
    return act


@triton.jit
def _gelu_grad(h):
    """d gelu(h) / dh = Phi(h) + h phi(h)."""
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)


@triton.jit
def _bias_act_dropout_block(x_ptr, bias_ptr, residual_ptr, out_ptr, seed, n, features, thr, scale,
                            ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                            WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    index = _tile_index(block, WIDTH, BLOCK)
    inside = index < n
    keep = _uniform_tile(seed, 0, block, WIDTH, BLOCK) >= thr
    h = _pre_activation(x_ptr, bias_ptr, index, inside, features, HAS_BIAS)
    act = _widened(_rounded(_activation(h, ACTIVATION), x_ptr.dtype.element_ty))
    out = tl.where(keep, tl.math.div_rn(act, scale), 0.0)
    if HAS_RESIDUAL:
        out = _widened(_rounded(out, x_ptr.dtype.element_ty))
        out += _widened(tl.load(residual_ptr + index, mask=inside, other=0.0))
    tl.store(out_ptr + index, _rounded(out, out_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["seed", "thr"])
def _bias_act_dropout_kernel(x_ptr, bias_ptr, residual_ptr, out_ptr, seed, n, features, thr, scale,
                             ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                             WIDTH: tl.constexpr, SEED_IN_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    _bias_act_dropout_block(x_ptr, bias_ptr, residual_ptr, out_ptr, _seed_value(seed, SEED_IN_TENSOR), n, features,
                            thr, scale, ACTIVATION, HAS_BIAS, HAS_RESIDUAL, WIDTH, BLOCK)


@triton.jit
def _bias_act_dropout_rate_kernel(x_ptr, bias_ptr, residual_ptr, out_ptr, seed_ptr, params_ptr, n, features,
                                  ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                  BLOCK: tl.constexpr):
    """The fused kernel with the seed and the rate read from memory (see :func:`_masked_rate_kernel`)."""
    seed = tl.load(seed_ptr).to(tl.int64)
    width, thr = _rate_draw(params_ptr)
    scale = tl.load(params_ptr + 2)
    for k in tl.static_range(5):
        if width == (1 << k):
            _bias_act_dropout_block(x_ptr, bias_ptr, residual_ptr, out_ptr, seed, n, features, thr, scale,
                                    ACTIVATION, HAS_BIAS, HAS_RESIDUAL, 1 << k, BLOCK)


@triton.jit
def _bias_act_dropout_backward_block(grad_ptr, x_ptr, bias_ptr, grad_x_ptr, seed, n, features, thr, scale,
                                     ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr,
                                     BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    index = _tile_index(block, WIDTH, BLOCK)
    inside = index < n
    keep = _uniform_tile(seed, 0, block, WIDTH, BLOCK) >= thr
    grad = _widened(tl.load(grad_ptr + index, mask=inside, other=0.0))
    grad_act = tl.where(keep, tl.math.div_rn(grad, scale), 0.0)
    if ACTIVATION != 0:
        grad_act = _widened(_rounded(grad_act, grad_ptr.dtype.element_ty))
        h = _pre_activation(x_ptr, bias_ptr, index, inside, features, HAS_BIAS)
        if ACTIVATION == 1:  # torch's threshold_backward: 0 where h <= 0, the gradient elsewhere (NaN too)
            grad_act = tl.where(h <= 0.0, 0.0, grad_act)
        else:
            grad_act = grad_act * _gelu_grad(h)
    tl.store(grad_x_ptr + index, _rounded(grad_act, grad_x_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["seed", "thr"])
def _bias_act_dropout_backward_kernel(grad_ptr, x_ptr, bias_ptr, grad_x_ptr, seed, n, features, thr, scale,
                                      ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr,
                                      SEED_IN_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    _bias_act_dropout_backward_block(grad_ptr, x_ptr, bias_ptr, grad_x_ptr, _seed_value(seed, SEED_IN_TENSOR), n,
                                     features, thr, scale, ACTIVATION, HAS_BIAS, WIDTH, BLOCK)


@triton.jit
def _bias_act_dropout_backward_rate_kernel(grad_ptr, x_ptr, bias_ptr, grad_x_ptr, seed_ptr, params_ptr, n, features,
                                           ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    seed = tl.load(seed_ptr).to(tl.int64)
    width, thr = _rate_draw(params_ptr)
    scale = tl.load(params_ptr + 2)
    for k in tl.static_range(5):
        if width == (1 << k):
            _bias_act_dropout_backward_block(grad_ptr, x_ptr, bias_ptr, grad_x_ptr, seed, n, features, thr, scale,
                                             ACTIVATION, HAS_BIAS, 1 << k, BLOCK)


def bias_act_dropout(x: torch.Tensor, bias: torch.Tensor | None, seed: int | torch.Tensor, p: float | torch.Tensor,
                     activation: str, residual: torch.Tensor | None, *, rate_bits: int | None = None,
                     traceable: bool = False) -> torch.Tensor:
    """``residual + dropout(act(x + bias))`` in one pass, the mask of ``(seed, 0)`` over ``x``'s
    elements; ``bias`` (or None) has ``x``'s last dimension, ``residual`` (or None) ``x``'s shape.
    Inputs contiguous, one Triton dtype; ``seed`` and ``p`` as in :func:`masked`."""
    out = torch.empty_like(x)
    n = x.numel()
    features = x.shape[-1] if bias is None else bias.numel()
    tensors = (x, x if bias is None else bias, x if residual is None else residual, out)
    flags = {"ACTIVATION": ACTIVATIONS[activation], "HAS_BIAS": bias is not None,
             "HAS_RESIDUAL": residual is not None, "BLOCK": BLOCK}
    _launch_fused((_bias_act_dropout_rate_kernel, _bias_act_dropout_kernel), tensors, seed, p, n, features, flags,
                  rate_bits, traceable)
    return out


def bias_act_dropout_backward(grad: torch.Tensor, x: torch.Tensor | None, bias: torch.Tensor | None,
                              seed: int | torch.Tensor, p: float | torch.Tensor, activation: str, *,
                              rate_bits: int | None = None, traceable: bool = False) -> torch.Tensor:
    """The gradient of :func:`bias_act_dropout` with respect to ``x`` (and, summed over rows, to
    ``bias``) in one pass; ``x`` and ``bias`` are read only for an activation other than ``none``
    (then ``x`` is required)."""
    grad_x = torch.empty_like(grad)
    n = grad.numel()
    features = grad.shape[-1] if bias is None else bias.numel()
    tensors = (grad, grad if x is None else x, grad if bias is None else bias, grad_x)
    flags = {"ACTIVATION": ACTIVATIONS[activation], "HAS_BIAS": bias is not None, "BLOCK": BLOCK}
    _launch_fused((_bias_act_dropout_backward_rate_kernel, _bias_act_dropout_backward_kernel), tensors, seed, p, n,
                  features, flags, rate_bits, traceable)
    return grad_x


def _launch_fused(kernels_by_rate: tuple, tensors: tuple, seed: int | torch.Tensor, p: float | torch.Tensor, n: int,
                  features: int, flags: dict, rate_bits: int | None, traceable: bool) -> None:
    """Launch a fused kernel over ``n`` elements: the ``*_rate_kernel`` of the pair when ``p`` is a
    tensor (its parameters read from memory), else the one with the rate's constants as arguments."""
    if not n:
        return
    rate_kernel, kernel = kernels_by_rate
    if isinstance(p, torch.Tensor):
        _launch(rate_kernel, traceable)[(triton.cdiv(n, BLOCK),)](
            *tensors, seed, rate_params(p, "dropout", rate_bits), n, features, **flags)
    else:
        width, thr = rng.keep_threshold(p)
        _launch(kernel, traceable)[(triton.cdiv(n, BLOCK),)](
            *tensors, seed, n, features, thr, 1.0 - p, WIDTH=width, SEED_IN_TENSOR=isinstance(seed, torch.Tensor),
            **flags)


#: whether the kernels run on Triton's interpreter (``TRITON_INTERPRET=1`` when this module was imported)
INTERPRETED = not isinstance(_masked_kernel, triton.runtime.JITFunction)

#: the four primitives of the ``triton`` path (see :class:`dropkit.kernels.Backend`)
BACKEND = kernels.Backend(masked, masked_from_bits, gaussian, keep_mask)
