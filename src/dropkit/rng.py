"""Counter-based random streams for dropout masks.

Every mask dropkit draws is a pure function of ``(seed, offset, index)``: the Philox4x32-10
generator (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a 64-bit
key and a 128-bit counter to 128 random bits with no state in between. That is what lets the
backward pass regenerate the forward mask from 8 bytes instead of keeping it, lets
``torch.utils.checkpoint`` recompute the very same mask, and lets a GPU kernel (Triton's
``tl.randint4x`` uses this generator with the same key split) reproduce a CPU mask.

Stream layouts (shared by the reference and the compiled kernels; they are the contract):

* key: ``k0 = seed & 0xFFFFFFFF``, ``k1 = seed >> 32`` (seed in [0, 2**63)).
* ``uniform`` (keep masks): a mask spends ``w`` bits per element, the fewest of 1, 2, 4, 8 and 16
  that hold its drop threshold exactly (:func:`keep_threshold`: 1 bit at p = 0.5, 2 at 0.25 and
  0.75, 16 at p = 0.1). One Philox call gives 128 bits, i.e. ``128 / w`` elements: element ``i``
  reads counter ``offset + i // (128 / w)`` and, with the four 32-bit output words laid end to end
  (word 0 lowest), the ``w`` bits from bit ``w * (i % (128 / w))``. At ``w = 16`` that is 8
  elements per counter, element ``i`` taking word ``(i // 2) % 4`` and of that the low half for
  even ``i``, the high half for odd ``i``. A unit is dropped iff its ``w``-bit value is below
  ``threshold(p) >> (16 - w)``, where ``threshold(p) = round(p * 65536)``: p is quantised to a
  multiple of 2**-16 (at most 7.6e-6 away from the p asked for; ``p`` itself is still used for the
  1/(1-p) scale), and ``w`` only decides how many random bits that quantised rate needs. Spending
  1 bit instead of 16 at p = 0.5 makes the mask's Philox work 16 times smaller.
  :func:`set_rate_bits` (8) coarsens every rate to a multiple of 2**-8 instead, as fused GPU
  dropout commonly does (FlashAttention and TransformerEngine compare 8-bit draws): p = 0.1 then
  drops at 26/256 = 0.1016 and needs 8 bits per element, half the Philox work of 16.
* ``normal`` (Gaussian noise): element ``i`` reads counter ``offset + i // 2`` and takes words
  ``2 * (i % 2)`` and ``2 * (i % 2) + 1`` as u1, u2 for one Box-Muller draw.

The counter's high word ``c1`` carries the counter's bits above 32; ``c2 = c3 = 0``. This is
exactly ``tl.randint4x(seed, counter)`` for an int64 counter, the high word included (Triton puts
an int64 counter's high bits in ``c1``; tests/test_gpu_kernels.py checks it across 2**32).

Seeds: an op called without ``seed`` draws a fresh 63-bit seed from torch's generator (the
global one, or the ``generator`` passed), so ``torch.manual_seed``/``dropkit.manual_seed`` make a
run repeatable, two calls differ, and ``torch.utils.checkpoint`` (which restores torch's RNG state
before recomputing) regenerates identical masks.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["DRAW_WIDTHS", "RATE_BITS", "SEED_BOUND", "check_seed", "derive_seed", "draw_seed", "keep_threshold",
           "manual_seed", "normal", "philox4x32", "philox4x32_block", "rate_bits", "resolve_seed", "set_rate_bits",
           "threshold", "uniform"]

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
SEED_BOUND = 2**63 - 1
THRESHOLD_SCALE = 65536
#: the resolutions a drop rate may be rounded to, in bits (see :func:`set_rate_bits`)
RATE_BITS = (8, 16)
_rate_bits = 16
#: bits per element a keep mask may spend (see :func:`keep_threshold`); each divides 32
DRAW_WIDTHS = (1, 2, 4, 8, 16)
#: random bits one Philox call gives
BITS_PER_COUNTER = 128


def manual_seed(seed: int, rank: int = 0) -> None:
    """Seed dropkit's masks and torch's generator (weights, shuffling) so a run repeats exactly.

    ``rank`` gives each process of a distributed job its own stream derived from ``(seed, rank)``
    (see :func:`derive_seed`); rank 0 uses ``seed`` itself.
    """
    check_seed(seed)
    check_seed(rank, "rank")
    torch.manual_seed(derive_seed(seed, rank) if rank else seed)


def derive_seed(seed: int, *streams: int) -> int:
    """A 63-bit seed for the sub-stream ``streams`` of ``seed`` (e.g. ``(MASKS, rank, epoch)``), by
    hashing them together: distinct paths give independent-looking seeds, the same path the same."""
    digest = hashlib.blake2b(":".join(str(n) for n in (seed, *streams)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & SEED_BOUND


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh 63-bit seed as a 0-dim int64 tensor, drawn from ``generator`` or torch's global one."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return torch.randint(0, SEED_BOUND, (), generator=generator, dtype=torch.int64)


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """The seed an op uses: ``seed`` if given (same seed, same mask), else a fresh draw."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is None:
        return draw_seed(generator)
    check_seed(seed)
    return torch.tensor(seed, dtype=torch.int64)


def check_seed(seed: int, name: str = "seed") -> None:
    """Validate a seed: an int (not a bool) in [0, 2**63 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int in [0, 2**63 - 1], got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= SEED_BOUND:
        raise ValueError(f"{name} must be an int in [0, 2**63 - 1], got {seed!r}")


def set_rate_bits(bits: int) -> int:
    """Round every drop rate to a multiple of ``2**-bits`` from now on; returns the previous setting.

    16 (the default) keeps each rate within 2**-17 of the p asked for. 8 rounds it to the nearest
    multiple of 1/256 (within 2**-9: p = 0.1 drops at 0.1016), so a rate that needed 16 random bits
    per element needs at most 8, which halves the Philox work of the mask (BENCHMARKS.md, "Dropout kernels").
    The kept values are still scaled by 1/(1-p) with the p asked for. The setting is process-wide
    and is read whenever a mask is drawn, including the backward pass that regenerates a forward
    mask: set it once, before training, not between a forward and its backward.
    """
    global _rate_bits
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, one of {', '.join(map(str, RATE_BITS))}, got {type(bits).__name__} {bits!r}")
    if bits not in RATE_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, RATE_BITS))}, got {bits!r}")
    previous, _rate_bits = _rate_bits, bits
    return previous


def rate_bits() -> int:
    """The resolution drop rates are rounded to, in bits (see :func:`set_rate_bits`)."""
    return _rate_bits


def threshold(p: float) -> int:
    """The 16-bit drop threshold of probability ``p``: ``round(p * 2**16)``, p quantised to 2**-16,
    or to 2**-8 under ``set_rate_bits(8)`` (then a multiple of 256)."""
    step = 1 << (16 - _rate_bits)
    return int(round(p * (THRESHOLD_SCALE // step))) * step


def keep_threshold(p: float) -> tuple[int, int]:
    """``(width, thr)`` of a keep mask at drop rate ``p``: each element spends ``width`` random bits
    (the fewest of :data:`DRAW_WIDTHS` that represent :func:`threshold` exactly) and drops iff its
    ``width``-bit value is below ``thr``. The drop probability is ``threshold(p) / 2**16`` whatever
    the width."""
    full = threshold(p)
    for width in DRAW_WIDTHS:
        if full % (1 << (16 - width)) == 0:
            return width, full >> (16 - width)
    raise AssertionError("unreachable: width 16 divides every threshold")


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * m`` for int64 tensors holding uint32 values.

    The 64-bit product would overflow int64, so ``m`` is split into 16-bit halves.
    """
    m_hi, m_lo = m >> 16, m & 0xFFFF
    low_part = a * m_lo
    mid = a * m_hi + (low_part >> 16)
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (low_part & 0xFFFF)
    return hi, lo


def philox4x32(
    counter: torch.Tensor, seed: int, rounds: int = PHILOX_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on a tensor of 64-bit counters; returns the four output words (int64, uint32 values).

    This is the plain-PyTorch ground truth that the compiled kernels must reproduce bit for bit.
    """
    zeros = torch.zeros_like(counter)
    key = (seed & MASK32, (seed >> 32) & MASK32)
    return philox4x32_block((counter & MASK32, (counter >> 32) & MASK32, zeros, zeros), key, rounds)


def philox4x32_block(
    counter: tuple[torch.Tensor, ...], key: tuple[int, int], rounds: int = PHILOX_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on a full 128-bit counter (four uint32 words in int64 tensors) and 64-bit key."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def uniform(
    seed: int, offset: int, numel: int, width: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The ``uniform`` stream of ``width``-bit values (int64 tensor) for elements 0..numel-1."""
    if width not in DRAW_WIDTHS:
        raise ValueError(f"width must be one of {DRAW_WIDTHS}, got {width}")
    n_counters = -(-numel * width // BITS_PER_COUNTER)
    words = torch.stack(philox4x32(torch.arange(n_counters, device=device) + offset, seed), dim=1)
    shifts = torch.arange(0, 32, width, device=device)
    values = (words[:, :, None] >> shifts) & ((1 << width) - 1)  # (counter, word, value), low bits first
    return values.reshape(-1)[:numel]


def normal(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``normal`` stream: ``numel`` standard normal draws (float64) by Box-Muller."""
    n_counters = -(-numel // 2)
    w0, w1, w2, w3 = philox4x32(torch.arange(n_counters, device=device) + offset, seed)
    a = torch.stack((w0, w2), dim=1).reshape(-1)[:numel].double()
    b = torch.stack((w1, w3), dim=1).reshape(-1)[:numel].double()
    u1 = (a + 0.5) * 2.0**-32  # in (0, 1): log never sees 0
    u2 = b * 2.0**-32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
