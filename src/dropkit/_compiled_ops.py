"""The primitives of :mod:`dropkit.ops` inside a ``torch.compile`` graph on the CPU: the rate as a tensor.

A custom op's ``float`` argument is a constant of the graph: ``torch.compile`` specialises on its
value, so a schedule that moves ``p`` every epoch would compile a new graph for every rate. These
ops take the rate as a 0-dim float64 tensor instead (``torch.ones(()) * p``, which dynamo turns
into a graph input once ``p`` has changed), so one graph serves every rate. They run the very
kernels of the eager path with the very same float ``p`` (a float64 holds it exactly), so the
masks and values are bit for bit those of eager mode; masks shared along dimensions are drawn
small and applied by ``torch.where`` with the constants computed as tensors, in the same order
and precision as :func:`dropkit.kernels.reference.masked`.
"""

from __future__ import annotations

import torch

from dropkit import kernels
from dropkit.kernels import reference

__all__ = ["gaussian_dropout", "keep_mask", "masked", "rate_tensor", "relu_dropout", "shared_masked", "wanted"]

_GRAD_KIND = {"dropout": "dropout", "alpha": "alpha_grad", "alpha_grad": "alpha_grad"}


def wanted(x: torch.Tensor) -> bool:
    """Whether ``x``'s op is being compiled for the CPU (other devices keep their own wiring)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu"


def rate_tensor(p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``p`` as a 0-dim float64 tensor (on ``device``, default the CPU) that a compiled graph
    computes from its input ``p``, not a constant."""
    return torch.ones((), dtype=torch.float64, device=device) * p


@torch.library.custom_op("dropkit::masked_rate", mutates_args=())
def _masked_rate(x: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor, kind: str) -> torch.Tensor:
    """``dropkit::masked`` with the rate as a tensor."""
    return kernels.masked(x, int(seed), float(rate), kind)[0]


@torch.library.custom_op("dropkit::relu_dropout_rate", mutates_args=())
def _relu_dropout_rate(x: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """``dropkit::relu_dropout`` with the rate as a tensor."""
    return kernels.masked(x, int(seed), float(rate), "relu_dropout")[0]


@torch.library.custom_op("dropkit::gaussian_rate", mutates_args=())
def _gaussian_rate(x: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """``dropkit::gaussian`` with the rate as a tensor."""
    return kernels.gaussian(x, int(seed), float(rate))


@torch.library.custom_op("dropkit::keep_mask_rate", mutates_args=())
def _keep_mask_rate(seed: torch.Tensor, rate: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """``dropkit::keep_mask`` with the rate as a tensor."""
    return kernels.keep_mask(int(seed), float(rate), tuple(shape), device=seed.device)


@torch.library.custom_op("dropkit::gaussian_noise_rate", mutates_args=())
def _gaussian_noise_rate(seed: torch.Tensor, rate: torch.Tensor, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``dropkit::gaussian_noise`` with the rate as a tensor."""
    return reference.gaussian_multiplier(int(seed), float(rate), tuple(shape), dtype, device=seed.device).to(dtype)


@_masked_rate.register_fake
@_relu_dropout_rate.register_fake
@_gaussian_rate.register_fake
def _like_input(x, *_):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_keep_mask_rate.register_fake
def _keep_mask_fake(seed, rate, shape):
    return seed.new_empty(shape, dtype=torch.bool)


@_gaussian_noise_rate.register_fake
def _gaussian_noise_fake(seed, rate, shape, dtype):
    return seed.new_empty(shape, dtype=dtype)


def _save_seed_rate_kind(ctx, inputs, output) -> None:
    _, seed, rate, ctx.kind = inputs
    ctx.save_for_backward(seed, rate)


def _masked_backward(ctx, grad):
    seed, rate = ctx.saved_tensors
    return _masked_rate(grad, seed, rate, _GRAD_KIND[ctx.kind]), None, None, None


def _save_seed_rate(ctx, inputs, output) -> None:
    _, seed, rate = inputs
    ctx.save_for_backward(seed, rate)


def _gaussian_backward(ctx, grad):
    seed, rate = ctx.saved_tensors
    return _gaussian_rate(grad, seed, rate), None, None


def _save_output_rate(ctx, inputs, output) -> None:
    ctx.save_for_backward(output, inputs[2])


def _relu_dropout_backward(ctx, grad):
    """torch's ReLU gradient divided by ``1 - p``, as :func:`dropkit.kernels.relu_dropout_grad`."""
    out, rate = ctx.saved_tensors
    return torch.ops.aten.threshold_backward(grad, out, 0) / (1.0 - rate), None, None


_masked_rate.register_autograd(_masked_backward, setup_context=_save_seed_rate_kind)
_relu_dropout_rate.register_autograd(_relu_dropout_backward, setup_context=_save_output_rate)
_gaussian_rate.register_autograd(_gaussian_backward, setup_context=_save_seed_rate)


# --- the primitives -----------------------------------------------------------------------------------

def keep_mask(seed: torch.Tensor, p: float, shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`dropkit.ops.keep_mask` in a compiled graph."""
    return _keep_mask_rate(seed, rate_tensor(p), list(shape))


def relu_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """:func:`dropkit.ops.relu_dropout` in a compiled graph."""
    return _relu_dropout_rate(x, seed, rate_tensor(p))


def masked(kind: str, x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """An element-wise masked op of :mod:`dropkit.ops` (``dropout`` or ``alpha``) in a compiled graph."""
    return _masked_rate(x, seed, rate_tensor(p), kind)


def shared_masked(kind: str, x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout`` or ``alpha`` of ``x`` with a ``keep`` mask that broadcasts to it, in a compiled
    graph on any device: :func:`dropkit.kernels.reference.masked` with the constants computed from
    the rate tensor. The rate stays a CPU tensor, a scalar to the ops on ``x``'s device, so they
    round as with the Python float of eager mode (a CUDA division by a scalar multiplies by its
    reciprocal)."""
    rate = rate_tensor(p)
    xo = x.to(reference.opmath_dtype(x.dtype))
    if kind == "dropout":
        return torch.where(keep, xo / (1.0 - rate), 0.0).to(x.dtype)
    a = 1.0 / torch.sqrt((1.0 - rate) * (1.0 + rate * reference.SELU_SATURATION**2))
    b = -a * reference.SELU_SATURATION * rate
    # in the opmath type, as reference.kind_constants computes it (0-dim operands alone would promote)
    dropped = torch.full((), reference.SELU_SATURATION, dtype=xo.dtype) * a.to(xo.dtype) + b.to(xo.dtype)
    return torch.where(keep, xo * a + b, dropped).to(x.dtype)


def gaussian_dropout(x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`dropkit.ops.gaussian_dropout` in a compiled graph."""
    rate = rate_tensor(p)
    if tuple(mask_shape) == tuple(x.shape):
        return _gaussian_rate(x, seed, rate)
    noise = _gaussian_noise_rate(seed, rate, list(mask_shape), reference.opmath_dtype(x.dtype))
    return (x.to(noise.dtype) * noise).to(x.dtype)

