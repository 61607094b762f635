"""Differentiable primitives under :mod:`dropkit.functional`: mask-based noise with regenerated masks.

Each primitive draws its noise from the counter-based streams of :mod:`dropkit.rng` over a
``mask_shape`` that broadcasts to the input, and keeps only the 8-byte seed for backward: the
backward pass regenerates the same noise from it. Validation and the trivial cases (eval, p=0,
p=1) are handled by the caller.
"""

from __future__ import annotations

import math

import torch

from dropkit import rng

#: SELU's negative saturation value, -lambda * alpha (Klambauer et al., "Self-Normalizing Neural
#: Networks", NIPS 2017): the value alpha dropout sets dropped units to.
SELU_SATURATION = -1.7580993408473766


def keep_mask(seed: torch.Tensor, p: float, shape: tuple[int, ...]) -> torch.Tensor:
    """Boolean keep mask of ``shape``: element i is kept iff its u16 draw >= threshold(p)."""
    numel = math.prod(shape)
    return (rng.uniform16(int(seed), 0, numel) >= rng.threshold(p)).reshape(shape)


def alpha_dropout_affine(p: float) -> tuple[float, float]:
    """The (a, b) of alpha dropout that keep zero mean and unit variance for SELU activations."""
    q = 1.0 - p
    a = 1.0 / math.sqrt(q * (1.0 + p * SELU_SATURATION**2))
    return a, -a * SELU_SATURATION * p


def gaussian_noise(seed: torch.Tensor, p: float, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Multiplicative noise ~ N(1, p/(1-p)) of ``shape`` (Srivastava et al. 2014, section 10)."""
    z = rng.normal(int(seed), 0, math.prod(shape)).reshape(shape)
    return (1.0 + math.sqrt(p / (1.0 - p)) * z).to(dtype)


class _Dropout(torch.autograd.Function):
    """Inverted dropout: kept units become x/(1-p), dropped ones 0; backward regenerates the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...]) -> torch.Tensor:
        ctx.p, ctx.mask_shape = p, mask_shape
        ctx.save_for_backward(seed)
        return torch.where(keep_mask(seed, p, mask_shape), x / (1.0 - p), 0.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (seed,) = ctx.saved_tensors
        keep = keep_mask(seed, ctx.p, ctx.mask_shape)
        return torch.where(keep, grad / (1.0 - ctx.p), 0.0).to(grad.dtype), None, None, None


class _AlphaDropout(torch.autograd.Function):
    """Alpha dropout: dropped units go to SELU's saturation value, then an affine map restores moments."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...]) -> torch.Tensor:
        ctx.p, ctx.mask_shape = p, mask_shape
        ctx.save_for_backward(seed)
        a, b = alpha_dropout_affine(p)
        return (torch.where(keep_mask(seed, p, mask_shape), x, SELU_SATURATION) * a + b).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (seed,) = ctx.saved_tensors
        a, _ = alpha_dropout_affine(ctx.p)
        keep = keep_mask(seed, ctx.p, ctx.mask_shape)
        return torch.where(keep, grad * a, 0.0).to(grad.dtype), None, None, None


class _GaussianDropout(torch.autograd.Function):
    """Gaussian dropout: x times N(1, p/(1-p)) noise; backward regenerates the same noise."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...]) -> torch.Tensor:
        ctx.p, ctx.mask_shape = p, mask_shape
        ctx.save_for_backward(seed)
        return x * gaussian_noise(seed, p, mask_shape, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (seed,) = ctx.saved_tensors
        return grad * gaussian_noise(seed, ctx.p, ctx.mask_shape, grad.dtype), None, None, None


def dropout(x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...]) -> torch.Tensor:
    """Inverted dropout of ``x`` with a keep mask of ``mask_shape`` (0 < p < 1)."""
    return _Dropout.apply(x, p, seed, mask_shape)


def alpha_dropout(x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...]) -> torch.Tensor:
    """Alpha dropout of ``x`` with a keep mask of ``mask_shape`` (0 < p < 1)."""
    return _AlphaDropout.apply(x, p, seed, mask_shape)


def gaussian_dropout(x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian dropout of ``x`` with noise of ``mask_shape`` (0 < p < 1)."""
    return _GaussianDropout.apply(x, p, seed, mask_shape)
