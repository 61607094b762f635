"""Plain-PyTorch reference of every per-element op of the dropout family: the ground truth.

Each function transcribes an op's definition directly on top of :mod:`dropkit.rng`'s streams, with
no attention to speed. The compiled kernels (:mod:`dropkit.kernels.cpu`) must reproduce these
results bit for bit (Gaussian noise within float rounding, see below), and everything the kernels
do not cover (other devices, float16 arithmetic inside a kernel) runs on these functions.

Arithmetic contract. A keep mask comes from the ``uniform`` stream at the width that
``rng.keep_threshold(p)`` gives: a unit is kept iff its draw is >= that threshold, so the drop rate
is p quantised to a multiple of 2**-16 (``rng.threshold(p) / 65536``). Values are computed in the
*opmath* type of the input dtype (float32 for bfloat16 and float16, the dtype itself otherwise)
and rounded once to the dtype; a Python constant enters the computation cast to the opmath type,
as torch casts a scalar operand. The masked ops are
``out = keep ? f(x) : c`` with

================  =======================  ===================  ===============================
kind              f(x)                     c (dropped units)    used for
================  =======================  ===================  ===============================
``dropout``       ``x / (1 - p)``          0                    dropout (Srivastava et al.
                                                                2014) forward and its gradient
``alpha``         ``x * a + b``            ``sat * a + b``      alpha dropout forward
``alpha_grad``    ``x * a``                0                    alpha dropout gradient
``relu_dropout``  ``relu(x) / (1 - p)``    0                    ReLU then dropout, in one pass
================  =======================  ===================  ===============================

with ``sat`` SELU's negative saturation value and ``(a, b)`` from :func:`alpha_affine`. Gaussian
dropout multiplies by ``1 + sigma * z`` (``sigma = sqrt(p / (1 - p))``, z from the ``normal``
stream in float64), rounded to the opmath type; its gradient is the same product applied to the
incoming gradient.

The gradient of ``relu_dropout`` needs no mask: an output is non-zero exactly where the unit was
kept and its input was positive, so it is ``out > 0 ? grad / (1 - p) : 0``
(:func:`relu_dropout_grad`), computed from the output that the next layer keeps anyway. ``relu``
here is ``torch.relu`` (-0.0 and NaN pass through); the gradient is cut where ``out <= 0``, as
``torch.relu``'s backward cuts it, and passes where ``out`` is NaN.

Packed masks (``saved="bits"``): byte k holds the keep flags of elements 8k..8k+7, element 8k+t in
bit t (1 = kept); the unused bits of the last byte are 0.
"""

from __future__ import annotations

import math

import torch

from dropkit import rng

__all__ = ["KINDS", "SELU_SATURATION", "alpha_affine", "gaussian", "gaussian_multiplier", "keep_mask", "kind_constants", "masked", "masked_from_seed", "opmath_dtype", "pack_bits", "relu_dropout_grad", "unpack_bits"]

#: SELU's negative saturation value, -lambda * alpha (Klambauer et al., "Self-Normalizing Neural
#: Networks", NIPS 2017): the value alpha dropout gives dropped units before its affine map.
SELU_SATURATION = -1.7580993408473766

#: the masked ops, ``out = keep ? f(x) : c`` (see the module docstring)
KINDS = ("dropout", "alpha", "alpha_grad", "relu_dropout")

_BIT_WEIGHTS = torch.tensor([1 << t for t in range(8)], dtype=torch.uint8)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type the arithmetic of a ``dtype`` tensor is done in: float32 for the 16-bit floats."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def alpha_affine(p: float) -> tuple[float, float]:
    """The (a, b) of alpha dropout that keep zero mean and unit variance for SELU activations."""
    a = 1.0 / math.sqrt((1.0 - p) * (1.0 + p * SELU_SATURATION**2))
    return a, -a * SELU_SATURATION * p


def kind_constants(kind: str, p: float, dtype: torch.dtype) -> tuple[float, float, float]:
    """``(a, b, c)`` of a masked op: f(x) is ``x / a`` (dropout), ``relu(x) / a`` (relu_dropout),
    ``x * a + b`` (alpha) or ``x * a`` (alpha_grad); ``c`` is the dropped units' value, exact in the
    opmath type of ``dtype``."""
    if kind in ("dropout", "relu_dropout"):
        return 1.0 - p, 0.0, 0.0
    a, b = alpha_affine(p)
    if kind == "alpha_grad":
        return a, 0.0, 0.0
    if kind == "alpha":
        dropped = torch.tensor(SELU_SATURATION, dtype=opmath_dtype(dtype)) * a + b
        return a, b, float(dropped)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def keep_mask(
    seed: int, p: float, shape: tuple[int, ...], offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean keep mask of ``shape`` from the ``uniform`` stream: element i kept iff its draw >= the threshold."""
    width, thr = rng.keep_threshold(p)
    return (rng.uniform(seed, offset, math.prod(shape), width, device) >= thr).reshape(shape)


def masked(x: torch.Tensor, keep: torch.Tensor, kind: str, p: float) -> torch.Tensor:
    """``keep ? f(x) : c`` for a keep mask that broadcasts to ``x`` (differentiable in ``x``)."""
    a, b, c = kind_constants(kind, p, x.dtype)
    xo = x.to(opmath_dtype(x.dtype))
    if kind == "dropout":
        kept = xo / a
    elif kind == "relu_dropout":
        kept = torch.relu(xo) / a
    elif kind == "alpha":
        kept = xo * a + b
    else:
        kept = xo * a
    return torch.where(keep, kept, c).to(x.dtype)


def relu_dropout_grad(grad: torch.Tensor, out: torch.Tensor, p: float) -> torch.Tensor:
    """Gradient of ``relu_dropout`` from its output: ``grad / (1 - p)`` where ``out`` is not <= 0, else 0."""
    a, _, c = kind_constants("relu_dropout", p, grad.dtype)
    return torch.where(out <= 0, c, grad.to(opmath_dtype(grad.dtype)) / a).to(grad.dtype)


def masked_from_seed(x: torch.Tensor, seed: int, p: float, kind: str, offset: int = 0) -> torch.Tensor:
    """A masked op with an element-wise mask drawn for ``x``'s logical index order."""
    return masked(x, keep_mask(seed, p, tuple(x.shape), offset, x.device), kind, p)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A keep mask packed 8 flags per byte (element 8k+t in bit t of byte k; pad bits 0)."""
    flat = keep.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).reshape(-1, 8)
    return (padded * _BIT_WEIGHTS.to(keep.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean keep mask of ``shape`` stored in ``bits`` by :func:`pack_bits`."""
    flags = (bits.reshape(-1, 1) & _BIT_WEIGHTS.to(bits.device)) != 0
    return flags.reshape(-1)[: math.prod(shape)].reshape(shape)


def gaussian_multiplier(
    seed: int, p: float, shape: tuple[int, ...], dtype: torch.dtype, offset: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Gaussian dropout's noise ``1 + sigma * z`` of ``shape``, in the opmath type of ``dtype``."""
    z = rng.normal(seed, offset, math.prod(shape), device).reshape(shape)
    return (1.0 + math.sqrt(p / (1.0 - p)) * z).to(opmath_dtype(dtype))


def gaussian(x: torch.Tensor, seed: int, p: float, offset: int = 0) -> torch.Tensor:
    """Gaussian dropout of ``x`` (also its gradient, applied to the incoming gradient)."""
    noise = gaussian_multiplier(seed, p, tuple(x.shape), x.dtype, offset, x.device)
    return (x.to(noise.dtype) * noise).to(x.dtype)
