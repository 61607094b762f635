"""The dropout family as functions: validate arguments, settle the trivial cases, call a primitive.

Papers:
    dropout, Gaussian dropout: Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks
        from Overfitting", JMLR 2014.
    channel (spatial) dropout: Tompson et al., "Efficient Object Localization Using Convolutional
        Networks", CVPR 2015.
    alpha dropout: Klambauer et al., "Self-Normalizing Neural Networks", NIPS 2017.
    locked (variational) dropout: Gal & Ghahramani, "A Theoretically Grounded Application of
        Dropout in Recurrent Neural Networks", NIPS 2016; Merity et al., AWD-LSTM, ICLR 2018.
    DropConnect: Wan et al., "Regularization of Neural Networks using DropConnect", ICML 2013.
    DropPath (stochastic depth): Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.
    DropBlock: Ghiasi et al., "DropBlock: A regularization method for convolutional networks",
        NeurIPS 2018.

Conventions shared by every op:
    * ``training`` is a required keyword. ``F.dropout`` defaults it to True, which leaves dropout
      silently on at test time when a caller forgets it; here forgetting it is a TypeError.
    * ``training=False`` or ``p=0`` returns the input itself; ``p=1`` returns zeros whose gradient
      is zero (never NaN, even for infinite inputs).
    * ``mask_shape`` (Keras's ``noise_shape``) gives the shape of the random mask, which is
      broadcast to the input: a 1 shares one draw along that dimension, ``None`` or the input's
      size keeps one draw per index.
    * ``seed`` fixes the mask (same seed, same mask); otherwise a fresh seed is drawn from
      ``generator`` or from torch's global generator, so ``dropkit.manual_seed`` makes a run repeat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dropkit import ops, rng

MaskShape = Sequence[int | None]


def check_p(p: float, name: str = "p") -> float:
    """Validate a drop probability: a real number in [0, 1]; returns it as a float."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(p).__name__}")
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return float(p)


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")


def resolve_mask_shape(x: torch.Tensor, mask_shape: MaskShape | None) -> tuple[int, ...]:
    """The concrete mask shape for ``x``: ``None`` entries take the input's size; 1 shares a draw."""
    if mask_shape is None:
        return tuple(x.shape)
    mask_shape = tuple(mask_shape)
    if len(mask_shape) != x.dim():
        raise ValueError(
            f"mask_shape must have one entry per input dimension ({x.dim()}), got {list(mask_shape)} "
            f"for an input of shape {list(x.shape)}"
        )
    resolved = tuple(size if m is None else m for m, size in zip(mask_shape, x.shape))
    for dim, (m, size) in enumerate(zip(resolved, x.shape)):
        if m not in (1, size):
            raise ValueError(
                f"mask_shape[{dim}] must be 1 or the input's size {size} (or None), got {m}: "
                f"mask_shape {list(mask_shape)} does not broadcast to input shape {list(x.shape)}"
            )
    return resolved


def _zeros_like_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like x whose gradient w.r.t. x is zero (x * 0 would give NaN for inf inputs)."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x, 0.0)


def _apply(
    primitive,
    x: torch.Tensor,
    p: float,
    training: bool,
    mask_shape: MaskShape | None,
    seed: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Shared path of every mask-based op: validate, settle eval/p=0/p=1, draw a seed, call."""
    _check_input(x)
    p = check_p(p)
    shape = resolve_mask_shape(x, mask_shape)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return _zeros_like_with_grad(x)
    if x.numel() == 0:
        return x.clone()
    return primitive(x, p, rng.resolve_seed(seed, generator), shape)


def dropout(
    x: torch.Tensor,
    p: float = 0.5,
    *,
    training: bool,
    mask_shape: MaskShape | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Inverted dropout: each unit is zeroed with probability ``p``, kept ones become ``x / (1 - p)``.

    Example:
        >>> y = dropout(torch.ones(4, 8), 0.5, training=True, seed=0)
        >>> sorted(set(y.flatten().tolist()))
        [0.0, 2.0]
    """
    return _apply(ops.dropout, x, p, training, mask_shape, seed, generator)


def relu_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    *,
    training: bool,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``dropout(relu(x))`` as one op: the same mask, values and gradients as the two ops in a row
    with the same seed, in one pass forward and one backward, keeping only the output for backward.

    In eval mode (or at p=0) it is ``torch.relu(x)``. :func:`dropkit.convert.fuse_relu_dropout`
    puts it in place of ``ReLU -> Dropout`` pairs of a model.

    Example:
        >>> y = relu_dropout(torch.tensor([-1.0, 1.0, 2.0, 3.0]), 0.5, training=True, seed=0)
        >>> bool((y >= 0).all())
        True
    """
    _check_input(x)
    p = check_p(p)
    if not training or p == 0.0:
        return torch.relu(x)
    if p == 1.0:
        return _zeros_like_with_grad(x)
    if x.numel() == 0:
        return x.clone()
    return ops.relu_dropout(x, p, rng.resolve_seed(seed, generator))


def _channel_mask_shape(x: torch.Tensor, spatial_dims: int, name: str) -> tuple[int, ...]:
    """Mask (N, C, 1, ...) for batched or (C, 1, ...) for unbatched channel-first input."""
    if x.dim() not in (spatial_dims + 1, spatial_dims + 2):
        raise ValueError(
            f"{name} expects a {spatial_dims + 2}-D (N, C, ...) or {spatial_dims + 1}-D (C, ...) input, "
            f"got shape {list(x.shape)}"
        )
    channel_dims = x.dim() - spatial_dims
    return tuple(x.shape[:channel_dims]) + (1,) * spatial_dims


def channel_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    *,
    training: bool,
    spatial_dims: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Channel (spatial) dropout: zeroes whole feature maps of a (N, C, *spatial) input.

    Neighbouring pixels of a feature map are strongly correlated, so dropping single pixels barely
    regularises a CNN; dropping the whole map does (Tompson et al. 2015).
    """
    _check_input(x)
    shape = _channel_mask_shape(x, spatial_dims, f"dropout{spatial_dims}d")
    return dropout(x, p, training=training, mask_shape=shape, seed=seed, generator=generator)


def dropout1d(x: torch.Tensor, p: float = 0.5, *, training: bool, seed: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Channel dropout for (N, C, L) or (C, L) inputs."""
    return channel_dropout(x, p, training=training, spatial_dims=1, seed=seed, generator=generator)


def dropout2d(x: torch.Tensor, p: float = 0.5, *, training: bool, seed: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Channel dropout for (N, C, H, W) or (C, H, W) inputs.

    Unlike ``torch.nn.functional.dropout2d``, a 3-D input is read as one unbatched (C, H, W) image,
    as its shape documents, not as (N, C, L).
    """
    return channel_dropout(x, p, training=training, spatial_dims=2, seed=seed, generator=generator)


def dropout3d(x: torch.Tensor, p: float = 0.5, *, training: bool, seed: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Channel dropout for (N, C, D, H, W) or (C, D, H, W) inputs."""
    return channel_dropout(x, p, training=training, spatial_dims=3, seed=seed, generator=generator)


def alpha_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    *,
    training: bool,
    mask_shape: MaskShape | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Alpha dropout for SELU networks: dropped units take SELU's saturation value and an affine
    map keeps zero mean and unit variance (Klambauer et al. 2017)."""
    return _apply(ops.alpha_dropout, x, p, training, mask_shape, seed, generator)


def feature_alpha_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    *,
    training: bool,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Alpha dropout with one draw per channel of a (N, C, *spatial) input."""
    _check_input(x)
    if x.dim() < 2:
        raise ValueError(f"feature_alpha_dropout expects an input of at least 2 dims (N, C, ...), got {list(x.shape)}")
    shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
    return alpha_dropout(x, p, training=training, mask_shape=shape, seed=seed, generator=generator)


def gaussian_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    *,
    training: bool,
    mask_shape: MaskShape | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian dropout: multiplies by N(1, p/(1-p)) noise, the same mean and variance as inverted
    Bernoulli dropout with rate p (Srivastava et al. 2014, section 10). p=1 gives zeros."""
    return _apply(ops.gaussian_dropout, x, p, training, mask_shape, seed, generator)


def locked_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    *,
    training: bool,
    batch_first: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Locked (variational) dropout for sequences: one mask per sequence, shared over all time steps.

    Input is (T, N, *features), or (N, T, *features) with ``batch_first`` (Gal & Ghahramani 2016).
    """
    _check_input(x)
    if x.dim() < 2:
        raise ValueError(f"locked_dropout expects an input of at least 2 dims (time and batch), got {list(x.shape)}")
    shape = list(x.shape)
    shape[1 if batch_first else 0] = 1
    return dropout(x, p, training=training, mask_shape=shape, seed=seed, generator=generator)


def drop_path(
    x: torch.Tensor,
    p: float = 0.1,
    *,
    training: bool,
    scale_by_keep: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DropPath (stochastic depth): drops a residual branch for whole samples of the batch.

    Apply it to the branch output before the residual sum: ``x + drop_path(f(x), p, ...)``.
    With ``scale_by_keep=False`` kept samples are not rescaled by 1/(1-p).
    """
    _check_input(x)
    if x.dim() < 1:
        raise ValueError("drop_path expects an input with a batch dimension, got a 0-d tensor")
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    primitive = ops.dropout if scale_by_keep else _unscaled_dropout
    return _apply(primitive, x, p, training, shape, seed, generator)


def _unscaled_dropout(x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...]) -> torch.Tensor:
    """Zero dropped units and leave kept ones as they are (no 1/(1-p) rescaling)."""
    return torch.where(ops.keep_mask(seed, p, mask_shape), x, 0.0)


def drop_block2d(
    x: torch.Tensor,
    p: float = 0.1,
    block_size: int = 7,
    *,
    training: bool,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DropBlock: drops contiguous ``block_size`` x ``block_size`` squares of each feature map.

    Block centres are drawn with rate gamma = p / block_size**2 * H*W / ((H-bs+1)(W-bs+1)) over
    the positions where a whole block fits, so that about a fraction p of units is dropped; the
    kept units are rescaled by (number of units) / (number kept) (Ghiasi et al. 2018).
    """
    _check_input(x)
    p = check_p(p)
    if x.dim() != 4:
        raise ValueError(f"drop_block2d expects a 4-D (N, C, H, W) input, got shape {list(x.shape)}")
    height, width = x.shape[-2:]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= min(height, width):
        raise ValueError(
            f"block_size must be an int in [1, min(H, W) = {min(height, width)}] for a feature map of "
            f"{height}x{width}, got {block_size!r}"
        )
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return _zeros_like_with_grad(x)
    if x.numel() == 0:
        return x.clone()
    valid_h, valid_w = height - block_size + 1, width - block_size + 1
    gamma = min(1.0, p / block_size**2 * (height * width) / (valid_h * valid_w))
    centre_shape = (x.shape[0], x.shape[1], valid_h, valid_w)
    centres = ~ops.keep_mask(rng.resolve_seed(seed, generator), gamma, centre_shape)
    pad = block_size - 1
    padded = F.pad(centres.float(), (pad, pad, pad, pad))
    keep = 1.0 - F.max_pool2d(padded, kernel_size=block_size, stride=1)
    kept = keep.sum()
    scale = torch.where(kept > 0, keep.numel() / kept.clamp_min(1.0), 0.0)
    return x * (keep * scale).to(x.dtype)


def dropconnect(
    weight: torch.Tensor,
    p: float = 0.5,
    *,
    training: bool,
    mask_shape: MaskShape | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DropConnect: inverted dropout on a weight tensor (Wan et al. 2013); a thin alias of
    :func:`dropout` named for what it is applied to."""
    return dropout(weight, p, training=training, mask_shape=mask_shape, seed=seed, generator=generator)
