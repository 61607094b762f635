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
    * The leading arguments follow torch's order, ``(input, p, training, inplace)``, but
      ``training`` has no default. ``F.dropout`` defaults it to True, which leaves dropout silently
      on at test time when a caller forgets it; here forgetting it is a TypeError, and it must be a
      bool (``"False"`` or ``None`` are refused, as torch refuses them).
    * ``training=False`` or ``p=0`` returns the input itself; ``p=1`` returns zeros whose gradient
      is zero (never NaN, even for infinite inputs).
    * ``inplace=True`` writes the result into the input and returns the input, as torch's
      ``inplace`` does; autograd sees an in-place write (so a leaf that requires grad is refused).
    * The output has the input's memory format (channels_last, permuted and sliced inputs keep their
      stride order, like torch's element-wise ops). Masks are defined on the logical index, so the
      memory layout never changes which units are dropped.
    * ``mask_shape`` (Keras's ``noise_shape``) gives the shape of the random mask, which is
      broadcast to the input: a 1 shares one draw along that dimension, ``None`` or the input's
      size keeps one draw per index.
    * ``seed`` fixes the mask (same seed, same mask); otherwise a fresh seed is drawn from
      ``generator`` or from torch's global generator, so ``dropkit.manual_seed`` makes a run repeat.
    * Inputs are dense (strided) float16, bfloat16, float32 or float64 tensors; anything else is
      refused with a message naming the argument.
    * Under ``torch.func.vmap`` the masks follow ``randomness``: ``"different"`` draws one mask per
      sample, ``"same"`` one mask for the whole batch, ``"error"`` refuses to draw (an explicit
      ``seed`` is not a draw).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from dropkit import ops, rng

__all__ = [
    "ACTIVATIONS",
    "DTYPES",
    "REQUIRED",
    "alpha_dropout",
    "bias_act_dropout",
    "channel_dropout",
    "check_p",
    "drop_block2d",
    "drop_path",
    "dropconnect",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "feature_alpha_dropout",
    "gaussian_dropout",
    "locked_dropout",
    "relu_dropout",
    "resolve_mask_shape",
]

MaskShape = Sequence[int | None]

#: the input dtypes every op takes
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Required:
    """Default of ``training``: marks an argument that has to be passed."""

    def __repr__(self) -> str:
        return "<required>"


#: the default of ``training`` in every op: leaving it out is a TypeError
REQUIRED: Any = _Required()


# --- argument checks --------------------------------------------------------------------------------

def check_p(p: float, name: str = "p") -> float:
    """Validate a drop probability: a real number in [0, 1] (not a bool, not a string, not a
    tensor); returns it as a float. Also works on the symbolic floats of a ``torch.compile`` trace."""
    if isinstance(p, bool) or not isinstance(p, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(p).__name__} {p!r}")
    if not 0.0 <= p <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return p if isinstance(p, torch.SymFloat) else float(p)


def _check_bool(value: bool, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


def _check_training(training: bool, op: str) -> bool:
    if training is REQUIRED:
        raise TypeError(f"{op}() missing required argument 'training': pass training=True or training=False "
                        "(a layer passes self.training)")
    return _check_bool(training, "training")


def _check_input(x: torch.Tensor, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; call .to_dense() first")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {x.dtype}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {x.dtype}")


def _check_operand(name: str, t: torch.Tensor | None, x: torch.Tensor, shape: Sequence[int]) -> None:
    """``t`` is None or a tensor of ``x``'s dtype and device and of ``shape`` (a bias, a residual)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != x.dtype or t.device != x.device:
        raise TypeError(f"{name} must be None or a tensor of the input's dtype {x.dtype} on {x.device}, got "
                        f"{type(t).__name__ if not isinstance(t, torch.Tensor) else f'{t.dtype} on {t.device}'}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} for an input of shape {list(x.shape)}, "
                         f"got {list(t.shape)}")


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_seed(seed: int | None, generator: torch.Generator | None) -> None:
    _check_generator(generator)
    if seed is not None:
        rng.check_seed(seed)
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")


def _check_common(op: str, x: torch.Tensor, p: float, training: bool, inplace: bool, seed: int | None,
                  generator: torch.Generator | None) -> float:
    """The checks every op makes, in argument order; returns ``p`` as a float."""
    _check_input(x)
    p = check_p(p)
    _check_training(training, op)
    _check_bool(inplace, "inplace")
    _check_seed(seed, generator)
    return p


def resolve_mask_shape(x: torch.Tensor, mask_shape: MaskShape | None) -> tuple[int, ...]:
    """The concrete mask shape for ``x``: ``None`` entries take the input's size; 1 shares a draw."""
    if mask_shape is None:
        return tuple(x.shape)
    if isinstance(mask_shape, (str, bytes)) or not isinstance(mask_shape, (Sequence, torch.Size)):
        raise TypeError(f"mask_shape must be a sequence of ints or None (one per input dimension), "
                        f"got {type(mask_shape).__name__} {mask_shape!r}")
    mask_shape = tuple(mask_shape)
    for dim, m in enumerate(mask_shape):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int)):
            raise TypeError(f"mask_shape entries must be ints or None, got mask_shape[{dim}] = {m!r} "
                            f"({type(m).__name__})")
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


# --- shared paths -------------------------------------------------------------------------------------

def _zeros_like_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like x whose gradient w.r.t. x is zero (x * 0 would give NaN for inf inputs)."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x, 0.0)


def _in_input_layout(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` with the strides torch's element-wise ops give an output of ``x`` (``empty_like``)."""
    if x.is_contiguous() or ops.transformed():
        return out
    like = torch.empty_like(x)
    if like.stride() == out.stride():
        return out
    return like.copy_(out)


def _finish(x: torch.Tensor, out: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The op's result for ``x``: in ``x``'s memory layout, or written into ``x`` with ``inplace``."""
    if out is x:
        return x
    if inplace:
        return x.copy_(out)
    return _in_input_layout(out, x)


def _apply(
    primitive,
    x: torch.Tensor,
    p: float,
    training: bool,
    inplace: bool,
    mask_shape: MaskShape | None,
    seed: int | None,
    generator: torch.Generator | None,
    op: str,
) -> torch.Tensor:
    """Shared path of every mask-based op: validate, settle eval/p=0/p=1, draw a seed, call."""
    p = _check_common(op, x, p, training, inplace, seed, generator)
    shape = resolve_mask_shape(x, mask_shape)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return _finish(x, _zeros_like_with_grad(x), inplace)
    if x.numel() == 0:
        return x if inplace else x.clone()
    return _finish(x, primitive(x, p, rng.resolve_seed(seed, generator), shape), inplace)


# --- the ops ------------------------------------------------------------------------------------------

def dropout(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = REQUIRED,
    inplace: bool = False,
    *,
    mask_shape: MaskShape | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Inverted dropout: zeroes each element with probability ``p`` and scales the kept ones by
    ``1 / (1 - p)``, so eval mode needs no rescaling (Srivastava et al. 2014).

    Args:
        x: input, any shape.
        p: probability of an element to be zeroed, in [0, 1]. Default: 0.5.
        training: apply dropout if True, return ``x`` if False. Required.
        inplace: write the result into ``x`` and return ``x``. Default: False.
        mask_shape: shape of the random mask, broadcast to ``x``; 1 shares one draw along that
            dimension, None keeps the input's size. Default: one draw per element.
        seed: fixes the mask (same seed, same mask).
        generator: draw the seed from this generator instead of torch's global one.

    Shape:
        - Input: :math:`(*)`. Output: :math:`(*)`, same shape and memory format as the input.

    Example:
        >>> y = dropout(torch.ones(4, 8), 0.5, True, seed=0)
        >>> sorted(set(y.flatten().tolist()))
        [0.0, 2.0]
    """
    return _apply(ops.dropout, x, p, training, inplace, mask_shape, seed, generator, "dropout")


def relu_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = REQUIRED,
    inplace: bool = False,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``dropout(relu(x))`` as one op: the same mask, values and gradients as the two ops in a row
    with the same seed, in one pass forward and one backward, keeping only the output for backward.

    In eval mode (or at p=0) it is ``torch.relu(x)``. :func:`dropkit.convert.fuse_relu_dropout`
    puts it in place of ``ReLU -> Dropout`` pairs of a model (dropout: Srivastava et al. 2014).

    Args:
        x: input, any shape.
        p: probability of an element to be zeroed, in [0, 1]. Default: 0.5.
        training: apply dropout after the ReLU if True, only the ReLU if False. Required.
        inplace: write the result into ``x`` and return ``x``. Default: False.
        seed: fixes the mask. generator: draw the seed from this generator.

    Shape:
        - Input: :math:`(*)`. Output: :math:`(*)`, same shape and memory format as the input.

    Example:
        >>> y = relu_dropout(torch.tensor([-1.0, 1.0, 2.0, 3.0]), 0.5, True, seed=0)
        >>> bool((y >= 0).all())
        True
    """
    p = _check_common("relu_dropout", x, p, training, inplace, seed, generator)
    if not training or p == 0.0:
        return torch.relu_(x) if inplace else torch.relu(x)
    if p == 1.0:
        return _finish(x, _zeros_like_with_grad(x), inplace)
    if x.numel() == 0:
        return x if inplace else x.clone()
    return _finish(x, ops.relu_dropout(x, p, rng.resolve_seed(seed, generator)), inplace)


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
    training: bool = REQUIRED,
    inplace: bool = False,
    *,
    spatial_dims: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Channel (spatial) dropout: zeroes whole feature maps of a (N, C, *spatial) or unbatched
    (C, *spatial) input and scales the kept ones by ``1 / (1 - p)``.

    Neighbouring pixels of a feature map are strongly correlated, so dropping single pixels barely
    regularises a CNN; dropping the whole map does (Tompson et al. 2015).

    Args:
        x: input with ``spatial_dims`` trailing spatial dimensions.
        p: probability of a channel to be zeroed, in [0, 1]. Default: 0.5.
        training: apply dropout if True, return ``x`` if False. Required.
        inplace: write the result into ``x`` and return ``x``. Default: False.
        spatial_dims: 1, 2 or 3.
        seed: fixes the mask. generator: draw the seed from this generator.

    Shape:
        - Input: :math:`(N, C, *S)` or :math:`(C, *S)` with ``len(S) == spatial_dims``.
        - Output: same shape and memory format as the input.

    Example:
        >>> y = channel_dropout(torch.ones(2, 3, 4), 0.5, True, spatial_dims=1, seed=0)
        >>> bool((y.amin(-1) == y.amax(-1)).all())
        True
    """
    _check_input(x)
    _check_training(training, f"dropout{spatial_dims}d" if spatial_dims in (1, 2, 3) else "channel_dropout")
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    shape = _channel_mask_shape(x, spatial_dims, f"dropout{spatial_dims}d")
    return dropout(x, p, training, inplace, mask_shape=shape, seed=seed, generator=generator)


def dropout1d(x: torch.Tensor, p: float = 0.5, training: bool = REQUIRED, inplace: bool = False, *,
              seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Channel dropout for sequences: zeroes whole channels of a (N, C, L) or (C, L) input
    (Tompson et al. 2015); see :func:`channel_dropout` for the arguments.

    Shape:
        - Input: :math:`(N, C, L)` or :math:`(C, L)`. Output: same shape as the input.

    Example:
        >>> y = dropout1d(torch.ones(8, 4, 16), 0.25, True, seed=1)
        >>> y.shape
        torch.Size([8, 4, 16])
    """
    return channel_dropout(x, p, training, inplace, spatial_dims=1, seed=seed, generator=generator)


def dropout2d(x: torch.Tensor, p: float = 0.5, training: bool = REQUIRED, inplace: bool = False, *,
              seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Channel dropout for images: zeroes whole feature maps of a (N, C, H, W) or (C, H, W) input
    (Tompson et al. 2015); see :func:`channel_dropout` for the arguments.

    Unlike ``torch.nn.functional.dropout2d``, a 3-D input is read as one unbatched (C, H, W) image,
    as its shape documents, not as (N, C, L). (:func:`dropkit.convert` keeps torch's reading for the
    modules it swaps, see :class:`dropkit.nn.Dropout2d`'s ``torch_ranks``.)

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(C, H, W)`. Output: same shape as the input.

    Example:
        >>> y = dropout2d(torch.ones(2, 16, 5, 5), 0.2, True, seed=0)
        >>> bool((y.amin((-2, -1)) == y.amax((-2, -1))).all())
        True
    """
    return channel_dropout(x, p, training, inplace, spatial_dims=2, seed=seed, generator=generator)


def dropout3d(x: torch.Tensor, p: float = 0.5, training: bool = REQUIRED, inplace: bool = False, *,
              seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Channel dropout for volumes: zeroes whole channels of a (N, C, D, H, W) or (C, D, H, W)
    input (Tompson et al. 2015); see :func:`channel_dropout` for the arguments.

    Shape:
        - Input: :math:`(N, C, D, H, W)` or :math:`(C, D, H, W)`. Output: same shape as the input.

    Example:
        >>> y = dropout3d(torch.ones(2, 4, 3, 3, 3), 0.5, True, seed=0)
        >>> y.shape
        torch.Size([2, 4, 3, 3, 3])
    """
    return channel_dropout(x, p, training, inplace, spatial_dims=3, seed=seed, generator=generator)


def alpha_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = REQUIRED,
    inplace: bool = False,
    *,
    mask_shape: MaskShape | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Alpha dropout for SELU networks: dropped elements take SELU's negative saturation value and
    an affine map keeps zero mean and unit variance (Klambauer et al. 2017).

    Args:
        x: input, any shape. p: drop probability in [0, 1]. Default: 0.5.
        training: apply dropout if True, return ``x`` if False. Required.
        inplace: write the result into ``x`` and return ``x``. Default: False.
        mask_shape: shape of the random mask (see :func:`dropout`).
        seed: fixes the mask. generator: draw the seed from this generator.

    Shape:
        - Input: :math:`(*)`. Output: :math:`(*)`, same shape and memory format as the input.

    Example:
        >>> y = alpha_dropout(torch.randn(1000), 0.2, True, seed=0)
        >>> abs(float(y.mean())) < 0.2
        True
    """
    return _apply(ops.alpha_dropout, x, p, training, inplace, mask_shape, seed, generator, "alpha_dropout")


def feature_alpha_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = REQUIRED,
    inplace: bool = False,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Alpha dropout with one draw per channel of a (N, C, *) input: a dropped channel takes SELU's
    saturation value everywhere (Klambauer et al. 2017); arguments as :func:`alpha_dropout`.

    Shape:
        - Input: :math:`(N, C, *)`. Output: same shape and memory format as the input.

    Example:
        >>> y = feature_alpha_dropout(torch.randn(4, 8, 5), 0.5, True, seed=0)
        >>> bool((y.amin(-1) < y.amax(-1)).any())
        True
    """
    _check_input(x)
    _check_training(training, "feature_alpha_dropout")
    if x.dim() < 2:
        raise ValueError(f"feature_alpha_dropout expects an input of at least 2 dims (N, C, ...), got {list(x.shape)}")
    shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
    return alpha_dropout(x, p, training, inplace, mask_shape=shape, seed=seed, generator=generator)


def gaussian_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = REQUIRED,
    inplace: bool = False,
    *,
    mask_shape: MaskShape | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian dropout: multiplies by N(1, p/(1-p)) noise, the same mean and variance as inverted
    Bernoulli dropout with rate p (Srivastava et al. 2014, section 10). p=1 gives zeros.

    Args:
        x: input, any shape. p: the equivalent drop rate in [0, 1]. Default: 0.5.
        training: apply noise if True, return ``x`` if False. Required.
        inplace: write the result into ``x`` and return ``x``. Default: False.
        mask_shape: shape of the noise, broadcast to ``x`` (see :func:`dropout`).
        seed: fixes the noise. generator: draw the seed from this generator.

    Shape:
        - Input: :math:`(*)`. Output: :math:`(*)`, same shape and memory format as the input.

    Example:
        >>> y = gaussian_dropout(torch.ones(10000), 0.5, True, seed=0)
        >>> abs(float(y.mean()) - 1.0) < 0.05
        True
    """
    return _apply(ops.gaussian_dropout, x, p, training, inplace, mask_shape, seed, generator, "gaussian_dropout")


def locked_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = REQUIRED,
    inplace: bool = False,
    *,
    batch_first: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Locked (variational) dropout for sequences: one mask per sequence, shared over all time
    steps (Gal & Ghahramani 2016; Merity et al. 2018).

    Args:
        x: a (T, N, *features) sequence, or (N, T, *features) with ``batch_first``.
        p: drop probability in [0, 1]. Default: 0.5.
        training: apply dropout if True, return ``x`` if False. Required.
        inplace: write the result into ``x`` and return ``x``. Default: False.
        batch_first: the batch is dimension 0 and time dimension 1. Default: False.
        seed: fixes the mask. generator: draw the seed from this generator.

    Shape:
        - Input: :math:`(T, N, *)` or :math:`(N, T, *)`. Output: same shape as the input.

    Example:
        >>> y = locked_dropout(torch.ones(5, 2, 3), 0.5, True, seed=0)
        >>> bool((y == y[0]).all())
        True
    """
    _check_input(x)
    _check_training(training, "locked_dropout")
    _check_bool(batch_first, "batch_first")
    if x.dim() < 2:
        raise ValueError(f"locked_dropout expects an input of at least 2 dims (time and batch), got {list(x.shape)}")
    shape = list(x.shape)
    shape[1 if batch_first else 0] = 1
    return dropout(x, p, training, inplace, mask_shape=shape, seed=seed, generator=generator)


#: the modes of :func:`drop_path` (torchvision's ``stochastic_depth`` names)
DROP_PATH_MODES = ("row", "batch")


def drop_path(
    x: torch.Tensor,
    p: float = 0.1,
    training: bool = REQUIRED,
    inplace: bool = False,
    *,
    scale_by_keep: bool = True,
    mode: Literal["row", "batch"] = "row",
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DropPath (stochastic depth): drops a residual branch for whole samples (Huang et al. 2016).

    Apply it to the branch output before the residual sum: ``x + drop_path(f(x), p, True)``.

    Args:
        x: the branch output, batch first.
        p: probability of a sample's branch to be dropped, in [0, 1]. Default: 0.1.
        training: apply it if True, return ``x`` if False. Required.
        inplace: write the result into ``x`` and return ``x``. Default: False.
        scale_by_keep: scale kept samples by ``1 / (1 - p)``. Default: True.
        mode: ``"row"`` draws per sample, ``"batch"`` once for the whole batch (torchvision's
            ``StochasticDepth`` modes). Default: ``"row"``.
        seed: fixes the mask. generator: draw the seed from this generator.

    Shape:
        - Input: :math:`(N, *)`. Output: same shape as the input.

    Example:
        >>> y = drop_path(torch.ones(6, 3), 0.5, True, seed=0)
        >>> bool((y.amin(1) == y.amax(1)).all())
        True
    """
    _check_input(x)
    _check_training(training, "drop_path")
    _check_bool(scale_by_keep, "scale_by_keep")
    if mode not in DROP_PATH_MODES:
        raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
    if x.dim() < 1:
        raise ValueError("drop_path expects an input with a batch dimension, got a 0-d tensor")
    shape = (x.shape[0] if mode == "row" else 1,) + (1,) * (x.dim() - 1)
    primitive = ops.dropout if scale_by_keep else _unscaled_dropout
    return _apply(primitive, x, p, training, inplace, shape, seed, generator, "drop_path")


def _unscaled_dropout(x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...]) -> torch.Tensor:
    """Zero dropped units and leave kept ones as they are (no 1/(1-p) rescaling)."""
    return torch.where(ops.keep_mask(seed, p, mask_shape, x.device), x, 0.0)


def drop_block2d(
    x: torch.Tensor,
    p: float = 0.1,
    block_size: int = 7,
    *,
    training: bool = REQUIRED,
    inplace: bool = False,
    couple_channels: bool = True,
    scale_by_keep: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DropBlock: drops contiguous ``block_size`` x ``block_size`` squares of feature maps
    (Ghiasi et al. 2018).

    On a feature map smaller than the block, the block is clipped to the map (``min(block_size, H)``
    by ``min(block_size, W)``), as timm's ``DropBlock2d`` does, so late, small stages never fail.
    Block corners are drawn with rate ``gamma = p * H * W / (bh * bw) / ((H - bh + 1)(W - bw + 1))``
    over the positions where a whole block fits, so that about a fraction ``p`` of units is dropped.

    Args:
        x: a (N, C, H, W) input.
        p: target fraction of dropped units, in [0, 1]. Default: 0.1.
        block_size: side of the square blocks (a positive int). Default: 7.
        training: apply DropBlock if True, return ``x`` if False. Required (keyword).
        inplace: write the result into ``x`` and return ``x``. Default: False.
        couple_channels: all channels of a sample share one block mask, as in the paper (timm's
            default); False draws each channel's blocks independently. Default: True.
        scale_by_keep: scale kept units by (number of units) / (number kept). Default: True.
        seed: fixes the mask. generator: draw the seed from this generator.

    Shape:
        - Input: :math:`(N, C, H, W)`. Output: same shape and memory format as the input.

    Example:
        >>> y = drop_block2d(torch.ones(2, 3, 9, 9), 0.2, 3, training=True, seed=0)
        >>> bool((y[:, 0] == y[:, 1]).all())  # channels share the blocks
        True
    """
    _check_input(x)
    p = check_p(p)
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be a positive int, got {type(block_size).__name__} {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    _check_training(training, "drop_block2d")
    _check_bool(inplace, "inplace")
    _check_bool(couple_channels, "couple_channels")
    _check_bool(scale_by_keep, "scale_by_keep")
    _check_seed(seed, generator)
    if x.dim() != 4:
        raise ValueError(f"drop_block2d expects a 4-D (N, C, H, W) input, got shape {list(x.shape)}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return _finish(x, _zeros_like_with_grad(x), inplace)
    if x.numel() == 0:
        return x if inplace else x.clone()
    height, width = x.shape[-2:]
    block_h, block_w = min(block_size, height), min(block_size, width)
    valid_h, valid_w = height - block_h + 1, width - block_w + 1
    gamma = min(1.0, p * height * width / (block_h * block_w) / (valid_h * valid_w))
    centre_shape = (x.shape[0], 1 if couple_channels else x.shape[1], valid_h, valid_w)
    centres = ~ops.keep_mask(rng.resolve_seed(seed, generator), gamma, centre_shape, x.device)
    padded = F.pad(centres.float(), (block_w - 1, block_w - 1, block_h - 1, block_h - 1))
    keep = 1.0 - F.max_pool2d(padded, kernel_size=(block_h, block_w), stride=1)
    if scale_by_keep:
        kept = keep.sum()
        keep = keep * torch.where(kept > 0, keep.numel() / kept.clamp_min(1.0), 0.0)
    return _finish(x, x * keep.to(x.dtype), inplace)


def dropconnect(
    weight: torch.Tensor,
    p: float = 0.5,
    training: bool = REQUIRED,
    *,
    mask_shape: MaskShape | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DropConnect: inverted dropout on a weight tensor (Wan et al. 2013); :func:`dropout` named
    for what it is applied to (the weight is never overwritten, so there is no ``inplace``).

    Args:
        weight: the weight, any shape. p: drop probability in [0, 1]. Default: 0.5.
        training: apply it if True, return ``weight`` if False. Required.
        mask_shape: e.g. ``(None, 1)`` drops whole rows (all inputs of a unit).
        seed: fixes the mask. generator: draw the seed from this generator.

    Shape:
        - Input: :math:`(*)`. Output: same shape as the input.

    Example:
        >>> w = torch.ones(4, 3)
        >>> y = dropconnect(w, 0.5, True, mask_shape=(None, 1), seed=0)
        >>> bool((y.amin(1) == y.amax(1)).all())
        True
    """
    return dropout(weight, p, training, mask_shape=mask_shape, seed=seed, generator=generator)


#: the activations :func:`bias_act_dropout` fuses
ACTIVATIONS = ("none", "relu", "gelu")


def bias_act_dropout(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    p: float = 0.1,
    training: bool = REQUIRED,
    *,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``residual + dropout(act(x + bias))`` as one op: the bias, activation, dropout and residual
    add that follow a matmul in a transformer block.

    On CUDA (the Triton path) forward and backward are one kernel pass each (in eval mode and at
    p = 0 too, without a mask), and backward keeps only the seed for the mask (plus ``x`` for ``relu`` and ``gelu``, whose gradient needs the
    pre-activation): fusing bias + dropout + add and bias + GeLU is what raised Megatron-LM's
    GPT-3 throughput from 113 to 135 TFLOP/s per GPU (Narayanan et al., "Efficient Large-Scale
    Language Model Training on GPU Clusters Using Megatron-LM", SC 2021, section 5.8). On the CPU
    it is the composition of dropkit's ops: the same mask as ``dropout(act(x + bias))`` with the
    same seed, values and gradients as those ops called one after the other.

    Args:
        x: input, e.g. a matmul's output, (..., features).
        bias: (features,) added to ``x`` before the activation, or None.
        p: drop probability of the activation's output, in [0, 1]. Default: 0.1.
        training: dropout is on only when True (eval: ``residual + act(x + bias)``). Required.
        activation: ``"none"``, ``"relu"`` or ``"gelu"`` (the exact erf form, ``F.gelu``'s default).
        residual: added after dropout, ``x``'s shape, or None.
        seed: fixes the mask. generator: draw the seed from this generator instead of torch's global one.

    Shape:
        - Input: :math:`(*, H)`, ``bias`` :math:`(H)`, ``residual`` :math:`(*, H)`. Output: :math:`(*, H)`.

    Example:
        >>> x, bias, skip = torch.randn(4, 8), torch.zeros(8), torch.randn(4, 8)
        >>> y = bias_act_dropout(x, bias, 0.1, True, activation="gelu", residual=skip)
        >>> y.shape
        torch.Size([4, 8])
    """
    p = _check_common("bias_act_dropout", x, p, training, False, seed, generator)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if x.dim() == 0:
        raise ValueError("bias_act_dropout expects an input with a features dimension, got a 0-d tensor")
    _check_operand("bias", bias, x, x.shape[-1:])
    _check_operand("residual", residual, x, x.shape)
    if training and 0.0 < p < 1.0 and x.numel():
        return ops.bias_act_dropout(x, bias, p, rng.resolve_seed(seed, generator), activation, residual)
    if (not training or p == 0.0) and x.numel() and ops.fused_kernel(x):
        # no dropout, but the Triton kernel still fuses the bias, activation and residual
        return ops.bias_act_dropout(x, bias, 0.0, torch.zeros((), dtype=torch.int64), activation, residual)
    h = x if bias is None else x + bias
    if training and p == 1.0:
        out = _zeros_like_with_grad(h)
    else:
        out = torch.relu(h) if activation == "relu" else F.gelu(h) if activation == "gelu" else h
    return out if residual is None else residual + out
