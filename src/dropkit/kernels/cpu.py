"""Compiled CPU kernels (numba) for the dropout family: about one memory pass per op.

What: the per-element ops of :mod:`dropkit.kernels.reference` — the masked ops (dropout, alpha
dropout and its gradient, from a regenerated mask or from a packed bit mask), Gaussian dropout and
the keep masks that the channel, locked and path variants share over dimensions — compiled with
numba. They reproduce :mod:`dropkit.rng`'s streams (Philox4x32-10, Salmon et al. 2011) and the
reference's arithmetic bit for bit; Gaussian noise is the exception noted below.

Why this shape. torch's CPU dropout draws one float per element and makes three passes over the
data; the cost is almost all random number generation. Here randomness is spent sparingly: one
Philox call gives 128 bits, and a mask spends only as many bits per element as its quantised rate
needs (:func:`dropkit.rng.keep_threshold`: 16 bits, i.e. 8 elements per call, at p = 0.1; one bit,
128 elements per call, at p = 0.5). Work is cut into blocks of :data:`BLOCK` elements: per block
the kernel first runs Philox for the block's counters into a small scratch array (a loop over
independent counters that LLVM vectorises: one vector multiply serves several counters), spreads
narrower draws out to one 16-bit value per element, then makes one pass of branch-free selects
over the block's elements, reading the draws from that L1-resident scratch. Blocks are spread
over threads with ``prange``; the number of threads follows ``torch.get_num_threads()``. A mask is
a pure function of (seed, offset, index), so the result does not depend on the thread count or on
the block size.

Dtypes. float32 and float64 natively; bfloat16 through its 16-bit pattern (a ``uint16`` view, no
copy): loads widen to float32 (exact), the arithmetic is float32 and stores round to nearest even
(NaN becomes the canonical 0x7FC0), which is what torch does for bfloat16. numba has no float16
type on the CPU, so :mod:`dropkit.kernels` runs float16 through the float32 kernels between two
conversions (exact, since the contract rounds once from float32).

Gaussian noise is computed in float64 (numba's log/cos/sqrt, i.e. the C library's), where the
reference uses torch's vectorised float64 functions; the two differ by a few float64 ulps, so after
rounding to float32 the results agree to within one ulp of the output dtype (tested so).

Compilation is cached on disk, in a per-user directory (:mod:`.numba_cache`), so a new process
loads the kernels instead of compiling them; :func:`dropkit.kernels.warmup` compiles them ahead of time.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from dropkit import rng
from dropkit.kernels import numba_cache


#: whether the kernels are cached on disk (see :mod:`.numba_cache`)
CACHE = numba_cache.enable()

#: elements per block: at most 256 Philox calls (16-bit draws), 4 KiB of draws (stays in L1)
BLOCK = 2048
#: Philox output words a block needs at the widest draw (16 bits per element)
_BLOCK_WORDS = BLOCK * 16 // 32
_BITS_PER_COUNTER = rng.BITS_PER_COUNTER
#: kernel codes of the masked ops (reference.KINDS)
DROPOUT, ALPHA, ALPHA_GRAD, RELU_DROPOUT = 0, 1, 2, 3

_U32 = np.uint64(0xFFFFFFFF)
_S16 = np.uint64(16)
_S32 = np.uint64(32)
_S56 = np.uint64(56)
_PACK_MAGIC = np.uint64(0x0102040810204080)
_M0 = np.uint64(rng.PHILOX_M0)
_M1 = np.uint64(rng.PHILOX_M1)
_W0 = np.uint64(rng.PHILOX_W0)
_W1 = np.uint64(rng.PHILOX_W1)
_ZERO = np.uint64(0)
_ROUNDS = rng.PHILOX_ROUNDS
_BF16_BIAS = np.uint64(0x7FFF)
_BF16_NAN = np.uint16(0x7FC0)


# --- element access: bfloat16 arrays arrive as uint16 bit patterns --------------------------------

def _load(a, i):
    """``a[i]`` as the opmath float (bfloat16 bit patterns widen to float32)."""


def _store(a, i, v):
    """``a[i] = v``, rounding float32 to bfloat16 (nearest even) for bit-pattern arrays."""


def _opmath(a, v):
    """``v`` (a float64) cast to the opmath type of array ``a``."""


@overload(_load)
def _load_impl(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: np.uint32(np.uint64(a[i]) << _S16).view(np.float32)
    return lambda a, i: a[i]


@overload(_store)
def _store_impl(a, i, v):
    if a.dtype == types.uint16:
        def store_bfloat16(a, i, v):
            u = np.uint64(np.float32(v).view(np.uint32))
            rounded = np.uint16((u + _BF16_BIAS + ((u >> _S16) & np.uint64(1))) >> _S16)
            a[i] = rounded if v == v else _BF16_NAN
        return store_bfloat16

    def store(a, i, v):
        a[i] = v
    return store


@overload(_opmath)
def _opmath_impl(a, v):
    if a.dtype == types.float64:
        return lambda a, v: v
    return lambda a, v: np.float32(v)


# --- random draws ------------------------------------------------------------------------------

@njit(inline="always")
def _philox(c0, c1, k0, k1):
    """Philox4x32-10 of counter (c0, c1, 0, 0) under key (k0, k1); uint32 values held in uint64."""
    c2 = _ZERO
    c3 = _ZERO
    for _ in range(_ROUNDS):
        prod0 = c0 * _M0
        prod1 = c2 * _M1
        c0, c1, c2, c3 = (prod1 >> _S32) ^ c1 ^ k0, prod1 & _U32, (prod0 >> _S32) ^ c3 ^ k1, prod0 & _U32
        k0 = (k0 + _W0) & _U32
        k1 = (k1 + _W1) & _U32
    return c0, c1, c2, c3


@njit(inline="always")
def _draw(words, counter, n_counters, k0, k1):
    """Philox output words of counters counter..counter+n_counters-1 into ``words`` (4 per counter)."""
    for j in range(n_counters):
        ctr = counter + np.uint64(j)
        w0, w1, w2, w3 = _philox(ctr & _U32, ctr >> _S32, k0, k1)
        words[4 * j] = w0
        words[4 * j + 1] = w1
        words[4 * j + 2] = w2
        words[4 * j + 3] = w3


@njit(inline="always")
def _spread_width(words, draws, n, width):
    """The ``width``-bit values of elements 0..n-1 from ``words`` (low bits first) into ``draws``, a
    byte of ``words`` at a time: a fixed-length loop of shifts of one byte vectorises (1.6-4x faster
    than shifting whole 32-bit words, measured alone on one core). ``width`` is a constant in each
    call below, so each loop compiles to plain shifts and masks."""
    per_byte = 8 // width
    mask = np.uint16((1 << width) - 1)
    as_bytes = words.view(np.uint8)
    for k in range((n + per_byte - 1) // per_byte):  # whole bytes: ``draws`` holds BLOCK, a multiple of 8
        byte = np.uint16(as_bytes[k])
        for t in range(per_byte):
            draws[k * per_byte + t] = (byte >> np.uint16(width * t)) & mask


@njit(inline="always")
def _as_draws(words, n, width):
    """One 16-bit draw per element for n elements from a block's Philox ``words``: at width 16 the
    words already are the draws (returned as a view); narrower draws are spread out into a new
    block-sized array."""
    if width == 16:
        return words.view(np.uint16)
    draws = np.empty(BLOCK, np.uint16)
    if width == 1:
        _spread_width(words, draws, n, 1)
    elif width == 2:
        _spread_width(words, draws, n, 2)
    elif width == 4:
        _spread_width(words, draws, n, 4)
    else:
        _spread_width(words, draws, n, 8)
    return draws


@njit(inline="always")
def _counters(n, width):
    """Philox counters that ``n`` draws of ``width`` bits take."""
    return (n * width + _BITS_PER_COUNTER - 1) // _BITS_PER_COUNTER


@njit(inline="always")
def _pack(draws, thr, bits, n_bytes, flags):
    """Packed keep flags (draw >= thr) of 8 * n_bytes elements: element 8k+t in bit t of byte k.

    Two vectorisable loops instead of a bit-by-bit one (1.3-2.5x slower per block, measured alone on
    one core): the flags go to ``flags`` as bytes 0/1; each 8 of them, read as one
    little-endian uint64 ``w`` (flag t in bit 8t), become one byte as the top byte of
    ``w * 0x0102040810204080``: that product moves bit 8t to bit 56 + t, and no two of its 64
    partial products land on the same bit, so nothing carries into the top byte.
    """
    thr = np.int32(thr)  # an int64 compare would take 4 lanes per vector instead of 8
    for i in range(8 * n_bytes):
        flags[i] = np.uint8(np.int32(draws[i]) >= thr)
    words = flags[: 8 * n_bytes].view(np.uint64)
    for k in range(n_bytes):
        bits[k] = np.uint8((words[k] * _PACK_MAGIC) >> _S56)


@njit(inline="always")
def _unpack(bits, flags, n):
    """Keep flags (0 or 1) of n elements from a packed mask, whole bytes at a time: a fixed-length
    loop of shifts of one byte vectorises, where indexing ``bits[i >> 3]`` per element does not
    (2-3x slower, measured alone on one core). ``flags`` holds a multiple of 8 elements."""
    for k in range((n + 7) // 8):
        byte = np.uint16(bits[k])
        for t in range(8):
            flags[8 * k + t] = (byte >> np.uint16(t)) & np.uint16(1)


@njit(inline="always")
def _select(kind, x, out, draws, thr, a, b, c):
    """``out = draws >= thr ? f(x) : c`` over one block; the kind is resolved outside the loops.

    The arguments arrive as float64 and int64 and are narrowed first: left wide they would turn
    every element's arithmetic and compare into 64-bit lanes (4 per vector instead of 8)."""
    a, b, c = _opmath(x, a), _opmath(x, b), _opmath(x, c)
    thr = np.int32(thr)
    if kind == DROPOUT:
        for i in range(x.size):
            v = _load(x, i) / a
            _store(out, i, v if np.int32(draws[i]) >= thr else c)
    elif kind == RELU_DROPOUT:
        for i in range(x.size):
            v = _load(x, i)
            v = c if v < c else v / a  # ReLU first, as torch.relu: -0.0 and NaN pass through
            _store(out, i, v if np.int32(draws[i]) >= thr else c)
    elif kind == ALPHA:
        for i in range(x.size):
            v = _load(x, i) * a + b
            _store(out, i, v if np.int32(draws[i]) >= thr else c)
    else:
        for i in range(x.size):
            v = _load(x, i) * a
            _store(out, i, v if np.int32(draws[i]) >= thr else c)


# --- kernels -----------------------------------------------------------------------------------

@njit(parallel=True, cache=CACHE)
def masked_seed(x, out, bits, k0, k1, offset, width, thr, kind, a, b, c, write_bits):
    """A masked op with the mask regenerated from (seed, offset) at ``width`` bits per element
    (``thr`` in those bits); writes ``bits`` if asked."""
    n = x.size
    counters_per_block = BLOCK * width // _BITS_PER_COUNTER
    for blk in prange((n + BLOCK - 1) // BLOCK):
        words = np.empty(_BLOCK_WORDS, np.uint32)
        start = blk * BLOCK
        m = min(BLOCK, n - start)
        n_bytes = (m + 7) // 8
        counter = np.uint64(offset) + np.uint64(blk * counters_per_block)
        _draw(words, counter, _counters(8 * n_bytes, width), k0, k1)
        draws = _as_draws(words, 8 * n_bytes, width)
        if write_bits and width == 1 and thr == 1:
            # a 1-bit draw is its own keep flag, in the packed mask's order: the mask is Philox's bytes
            bits[start // 8: start // 8 + n_bytes] = words.view(np.uint8)[:n_bytes]
        elif write_bits:
            _pack(draws, thr, bits[start // 8: start // 8 + n_bytes], n_bytes, np.empty(BLOCK, np.uint8))
        _select(kind, x[start:start + m], out[start:start + m], draws, thr, a, b, c)
    if write_bits and n % 8:
        bits[n // 8] &= np.uint8((1 << (n % 8)) - 1)


@njit(parallel=True, cache=CACHE)
def masked_bits(x, out, bits, kind, a, b, c):
    """A masked op with the mask read from a packed bit mask."""
    n = x.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        flags = np.empty(BLOCK, np.uint16)
        start = blk * BLOCK
        m = min(BLOCK, n - start)
        _unpack(bits[start // 8: start // 8 + (m + 7) // 8], flags, m)
        _select(kind, x[start:start + m], out[start:start + m], flags, 1, a, b, c)


@njit(parallel=True, cache=CACHE)
def keep_mask(out, k0, k1, offset, width, thr):
    """The boolean keep mask (draw >= thr, draws of ``width`` bits) of ``out.size`` elements."""
    n = out.size
    counters_per_block = BLOCK * width // _BITS_PER_COUNTER
    for blk in prange((n + BLOCK - 1) // BLOCK):
        words = np.empty(_BLOCK_WORDS, np.uint32)
        start = blk * BLOCK
        m = min(BLOCK, n - start)
        _draw(words, np.uint64(offset) + np.uint64(blk * counters_per_block), _counters(m, width), k0, k1)
        draws = _as_draws(words, m, width)
        block = out[start:start + m]
        for i in range(m):
            block[i] = np.int32(draws[i]) >= np.int32(thr)


@njit(parallel=True, cache=CACHE)
def gaussian(x, out, k0, k1, offset, sigma):
    """Gaussian dropout: ``out = x * (1 + sigma * z)``, z by Box-Muller from the ``normal`` stream."""
    n = x.size
    for blk in prange((n + BLOCK - 1) // BLOCK):
        words = np.empty(BLOCK * 2, np.uint32)
        start = blk * BLOCK
        m = min(BLOCK, n - start)
        _draw(words, np.uint64(offset) + np.uint64(blk * (BLOCK // 2)), (m + 1) // 2, k0, k1)
        xb = x[start:start + m]
        ob = out[start:start + m]
        for i in range(m):
            u1 = (np.float64(words[2 * i]) + 0.5) * 2.0**-32
            u2 = np.float64(words[2 * i + 1]) * 2.0**-32
            z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
            _store(ob, i, _load(xb, i) * _opmath(xb, 1.0 + sigma * z))
