"""The dropout family as ``nn.Module`` layers: thin holders of settings over :mod:`dropkit.functional`.

Each layer validates its settings in the constructor, is active only in training mode
(``model.train()``) and is the identity in eval mode, and shows its settings in ``repr``. The
leading arguments follow torch's ``(p, inplace)``. ``p`` can be changed between steps (schedules
and controllers do) and is validated on every assignment; a compiled model keeps its graph when
``p`` changes.

``seed`` gives a layer its own ``torch.Generator`` seeded once: successive calls draw different
masks, and the sequence repeats from run to run (as a Keras layer's seed does). The generator's
state is part of the layer's ``state_dict`` (key ``generator_state``), so a run resumed from a
checkpoint continues the mask sequence exactly. Without a seed, the layer draws from torch's global
generator, which ``dropkit.manual_seed`` seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from dropkit import functional as DF
from dropkit.seeded import SeededRate
from dropkit.residual import DropPathResidual  # noqa: F401  (re-exported: the residual-block form of DropPath)

__all__ = [
    "AlphaDropout",
    "BiasActDropout",
    "DropBlock2d",
    "DropPath",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutLayer",
    "FeatureAlphaDropout",
    "GaussianDropout",
    "LockedDropout",
    "ReLUDropout",
    "WeightDropout",
]

#: torch's element-wise activation modules: a unit's output depends on that unit's input only, so
#: a dropout after one can be moved across it or skip the unit's arithmetic (:mod:`dropkit.structured`,
#: :mod:`dropkit.mc_thinned`)
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity,
)


def _check_bool(value: bool, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


class DropoutLayer(SeededRate, nn.Module):
    """Common settings of the dropout layers: the rate ``p``, ``inplace`` and the random source.

    Args:
        p: drop probability in [0, 1].
        inplace: write the result into the input and return it. Default: False.
        seed: seeds this layer's own generator; its state is saved in ``state_dict``.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, seed: int | None = None) -> None:
        super().__init__()
        self._init_rate_and_seed(p, seed)
        self.inplace = _check_bool(inplace, "inplace")

    def extra_repr(self) -> str:
        text = f"p={self.p}"
        if self.inplace:
            text += ", inplace=True"
        return self._seed_repr(text)


def _check_mask_shape(mask_shape: Sequence[int | None] | None) -> tuple[int | None, ...] | None:
    if mask_shape is None:
        return None
    if isinstance(mask_shape, (str, bytes)) or not isinstance(mask_shape, (Sequence, torch.Size)):
        raise TypeError(f"mask_shape must be a sequence of positive ints or None, got "
                        f"{type(mask_shape).__name__} {mask_shape!r}")
    for dim, m in enumerate(mask_shape):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int)):
            raise TypeError(f"mask_shape entries must be positive ints or None, got mask_shape[{dim}] = {m!r}")
        if m is not None and m < 1:
            raise ValueError(f"mask_shape entries must be positive ints or None, got {list(mask_shape)}")
    return tuple(mask_shape)


class _MaskShapeLayer(DropoutLayer):
    """A layer whose mask shape can be set (Keras's ``noise_shape``)."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *,
                 mask_shape: Sequence[int | None] | None = None, seed: int | None = None) -> None:
        super().__init__(p, inplace, seed=seed)
        self.mask_shape = _check_mask_shape(mask_shape)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.mask_shape is None else f"{text}, mask_shape={self.mask_shape}"


class Dropout(_MaskShapeLayer):
    r"""During training, zeroes each element of the input with probability ``p`` and scales the
    kept ones by :math:`\frac{1}{1-p}`, so that eval mode (the identity) needs no rescaling.

    Dropout prevents co-adaptation of units (Srivastava et al., "Dropout: A Simple Way to Prevent
    Neural Networks from Overfitting", JMLR 2014). The mask is drawn by dropkit's counter-based
    generator: backward regenerates it from an 8-byte seed instead of keeping it.

    ``layer(x, residual=r)`` returns ``r + dropout(x)``, the residual add that follows dropout in a
    residual block: on CUDA one pass of the fused kernel of :func:`dropkit.functional.bias_act_dropout`
    for the dropout and the add, elsewhere the two ops; the same mask as ``layer(x)`` from the same
    seed either way. The sum is a new tensor (``inplace`` does not apply). A module that calls its
    dropout this way tells :func:`dropkit.convert.fuse` where the residual add is: an activation
    module whose output goes straight into it (``self.drop(self.act(h), residual=x)``) is fused with it.

    Args:
        p: probability of an element to be zeroed. Default: 0.5.
        inplace: do the operation in place. Default: False.
        mask_shape: shape of the random mask, broadcast to the input; 1 shares a draw along a
            dimension (e.g. ``(None, 1, None)`` drops the same features at every time step).
        seed: seeds this layer's own generator (its state is saved in ``state_dict``).

    Shape:
        - Input: :math:`(*)`. Output: :math:`(*)`, same shape and memory format as the input.
        - ``residual`` (optional, in ``forward``): the input's shape and dtype.

    Example:
        >>> layer = Dropout(0.5)
        >>> y = layer(torch.randn(32, 128))
        >>> y.shape
        torch.Size([32, 128])
        >>> skip = torch.randn(32, 128)
        >>> layer.eval()(torch.ones(32, 128), residual=skip).equal(skip + 1)
        True
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return DF.dropout(x, self.p, self.training, self.inplace, mask_shape=self.mask_shape,
                              generator=self.generator)
        DF._check_input(x)
        DF._check_operand("residual", residual, x, x.shape)
        if self.mask_shape is None and x.dim():
            return DF.bias_act_dropout(x, None, self.p, self.training, residual=residual, generator=self.generator)
        return residual + DF.dropout(x, self.p, self.training, mask_shape=self.mask_shape, generator=self.generator)


class ReLUDropout(DropoutLayer):
    """``ReLU`` then :class:`Dropout` as one layer (:func:`dropkit.functional.relu_dropout`): the same
    outputs and gradients as the pair, one memory pass each way, and no mask or ReLU output kept
    for backward beyond the output itself, which the next layer keeps anyway.

    In eval mode it is a ReLU. :func:`dropkit.convert.fuse_relu_dropout` swaps it in for the pairs
    of an existing model (Srivastava et al. 2014 for dropout).

    Args:
        p: probability of an element to be zeroed. Default: 0.5.
        inplace: do the operation in place. Default: False.
        seed: seeds this layer's own generator.

    Shape:
        - Input: :math:`(*)`. Output: :math:`(*)`, same shape as the input.

    Example:
        >>> layer = ReLUDropout(0.5)
        >>> y = layer(torch.randn(32, 128))
        >>> bool((y >= 0).all())
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.relu_dropout(x, self.p, self.training, self.inplace, generator=self.generator)


class _ChannelDropout(DropoutLayer):
    spatial_dims: int

    def __init__(self, p: float = 0.5, inplace: bool = False, *, seed: int | None = None,
                 torch_ranks: bool = False) -> None:
        super().__init__(p, inplace, seed=seed)
        self.torch_ranks = _check_bool(torch_ranks, "torch_ranks")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.torch_ranks:
            # like torch, the rank is checked only where a mask is drawn (and always by Dropout1d)
            drawn = self.training and self.p > 0.0 and isinstance(x, torch.Tensor) and x.numel() > 0
            shape = self._torch_mask_shape(x) if drawn or self.spatial_dims == 1 else None
            return DF.dropout(x, self.p, self.training, self.inplace, mask_shape=shape if drawn else None,
                              generator=self.generator)
        return DF.channel_dropout(x, self.p, self.training, self.inplace, spatial_dims=self.spatial_dims,
                                  generator=self.generator)

    def _torch_mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """The mask torch's ``nn.Dropout{1,2,3}d`` draws for an input of this rank."""
        DF._check_input(x)
        rank, batched = x.dim(), {1: 3, 2: None, 3: 5}[self.spatial_dims]
        if self.spatial_dims == 1 and rank not in (2, 3):
            raise ValueError(f"dropout1d expects a 2-D (C, L) or 3-D (N, C, L) input, got shape {list(x.shape)}")
        if batched is not None and rank != batched:  # unbatched: torch adds a batch of one
            if rank < 1:
                raise ValueError(f"dropout{self.spatial_dims}d expects at least 1 dim, got a 0-d tensor")
            return (x.shape[0],) + (1,) * (rank - 1) if rank > 1 else tuple(x.shape)
        if rank < 2:
            raise ValueError(f"dropout{self.spatial_dims}d expects at least 2 dims (N, C, ...), got {list(x.shape)}")
        return tuple(x.shape[:2]) + (1,) * (rank - 2)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return f"{text}, torch_ranks=True" if self.torch_ranks else text


_CHANNEL_ARGS = """
    Args:
        p: probability of a channel to be zeroed. Default: 0.5.
        inplace: do the operation in place. Default: False.
        seed: seeds this layer's own generator (its state is saved in ``state_dict``).
        torch_ranks: read input ranks exactly as torch's ``nn.Dropout{n}d`` does, e.g. a 3-D input
            to ``Dropout2d`` as (N, C, L), and inputs of other ranks the way torch reads them
            (what :func:`dropkit.convert` uses). Default: False.
"""


class Dropout1d(_ChannelDropout):
    __doc__ = r"""During training, zeroes whole channels of a (N, C, L) or (C, L) input with probability
    ``p`` and scales the kept ones by :math:`\frac{1}{1-p}` (Tompson et al., "Efficient Object
    Localization Using Convolutional Networks", CVPR 2015).
    """ + _CHANNEL_ARGS + r"""
    Shape:
        - Input: :math:`(N, C, L)` or :math:`(C, L)`. Output: same shape as the input.

    Example:
        >>> layer = Dropout1d(0.2)
        >>> layer(torch.randn(20, 16, 32)).shape
        torch.Size([20, 16, 32])
    """

    spatial_dims = 1


class Dropout2d(_ChannelDropout):
    __doc__ = r"""During training, zeroes whole feature maps of a (N, C, H, W) or (C, H, W) input with
    probability ``p`` and scales the kept ones by :math:`\frac{1}{1-p}` (Tompson et al., CVPR 2015).

    A 3-D input is one unbatched (C, H, W) image, as the shape says; torch's ``nn.Dropout2d`` reads
    it as (N, C, L) (``torch_ranks=True`` does the same).
    """ + _CHANNEL_ARGS + r"""
    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(C, H, W)`. Output: same shape as the input.

    Example:
        >>> layer = Dropout2d(0.2)
        >>> layer(torch.randn(8, 16, 14, 14)).shape
        torch.Size([8, 16, 14, 14])
    """

    spatial_dims = 2


class Dropout3d(_ChannelDropout):
    __doc__ = r"""During training, zeroes whole channels of a (N, C, D, H, W) or (C, D, H, W) input with
    probability ``p`` and scales the kept ones by :math:`\frac{1}{1-p}` (Tompson et al., CVPR 2015).
    """ + _CHANNEL_ARGS + r"""
    Shape:
        - Input: :math:`(N, C, D, H, W)` or :math:`(C, D, H, W)`. Output: same shape as the input.

    Example:
        >>> layer = Dropout3d(0.2)
        >>> layer(torch.randn(2, 4, 3, 8, 8)).shape
        torch.Size([2, 4, 3, 8, 8])
    """

    spatial_dims = 3


class AlphaDropout(_MaskShapeLayer):
    """Alpha dropout for self-normalising (SELU) networks: dropped elements take SELU's negative
    saturation value and an affine map keeps zero mean and unit variance (Klambauer et al.,
    "Self-Normalizing Neural Networks", NIPS 2017).

    Args:
        p: probability of an element to be dropped. Default: 0.5.
        inplace: do the operation in place. Default: False.
        mask_shape: shape of the random mask, broadcast to the input.
        seed: seeds this layer's own generator.

    Shape:
        - Input: :math:`(*)`. Output: :math:`(*)`, same shape as the input.

    Example:
        >>> layer = AlphaDropout(0.2)
        >>> layer(torch.randn(20, 16)).shape
        torch.Size([20, 16])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.alpha_dropout(x, self.p, self.training, self.inplace, mask_shape=self.mask_shape,
                                generator=self.generator)


class FeatureAlphaDropout(DropoutLayer):
    """Alpha dropout with one draw per channel of a (N, C, *) input: a dropped channel takes SELU's
    saturation value everywhere (Klambauer et al., NIPS 2017).

    Args:
        p: probability of a channel to be dropped. Default: 0.5.
        inplace: do the operation in place. Default: False.
        seed: seeds this layer's own generator.
        torch_ranks: check the rank only where a mask is drawn, as torch's ``nn.FeatureAlphaDropout``
            does (in eval mode it takes any input; what :func:`dropkit.convert` uses). Default: False.

    Shape:
        - Input: :math:`(N, C, *)`. Output: same shape as the input.

    Example:
        >>> layer = FeatureAlphaDropout(0.2)
        >>> layer(torch.randn(20, 16, 4, 4)).shape
        torch.Size([20, 16, 4, 4])
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, seed: int | None = None,
                 torch_ranks: bool = False) -> None:
        super().__init__(p, inplace, seed=seed)
        self.torch_ranks = _check_bool(torch_ranks, "torch_ranks")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.torch_ranks and not (self.training and self.p > 0.0):
            return DF.alpha_dropout(x, self.p, self.training, self.inplace)
        return DF.feature_alpha_dropout(x, self.p, self.training, self.inplace, generator=self.generator)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return f"{text}, torch_ranks=True" if self.torch_ranks else text


class GaussianDropout(_MaskShapeLayer):
    """Gaussian dropout: multiplies by N(1, p/(1-p)) noise, the mean and variance of inverted
    dropout at rate ``p`` (Srivastava et al., JMLR 2014, section 10).

    Args:
        p: the equivalent drop rate in [0, 1]. Default: 0.5.
        inplace: do the operation in place. Default: False.
        mask_shape: shape of the noise, broadcast to the input.
        seed: seeds this layer's own generator.

    Shape:
        - Input: :math:`(*)`. Output: :math:`(*)`, same shape as the input.

    Example:
        >>> layer = GaussianDropout(0.1)
        >>> layer(torch.randn(20, 16)).shape
        torch.Size([20, 16])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.gaussian_dropout(x, self.p, self.training, self.inplace, mask_shape=self.mask_shape,
                                   generator=self.generator)


class LockedDropout(DropoutLayer):
    """Locked (variational) dropout for RNNs: one mask per sequence, the same at every time step
    (Gal & Ghahramani, NIPS 2016; Merity et al., AWD-LSTM, ICLR 2018).

    Args:
        p: probability of a feature to be zeroed for the whole sequence. Default: 0.5.
        inplace: do the operation in place. Default: False.
        batch_first: input is (N, T, *) rather than (T, N, *). Default: False.
        seed: seeds this layer's own generator.

    Shape:
        - Input: :math:`(T, N, *)`, or :math:`(N, T, *)` with ``batch_first``. Output: same shape.

    Example:
        >>> layer = LockedDropout(0.3, batch_first=True)
        >>> layer(torch.randn(4, 28, 64)).shape
        torch.Size([4, 28, 64])
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, batch_first: bool = False,
                 seed: int | None = None) -> None:
        super().__init__(p, inplace, seed=seed)
        self.batch_first = _check_bool(batch_first, "batch_first")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.locked_dropout(x, self.p, self.training, self.inplace, batch_first=self.batch_first,
                                 generator=self.generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_first={self.batch_first}"


class DropPath(DropoutLayer):
    """DropPath / stochastic depth: drops a residual branch for whole samples (Huang et al., "Deep
    Networks with Stochastic Depth", ECCV 2016). Put it on the branch: ``x + drop(branch(x))``.

    Args:
        p: probability of a sample's branch to be dropped. Default: 0.1.
        inplace: do the operation in place. Default: False.
        scale_by_keep: scale kept samples by ``1 / (1 - p)``. Default: True.
        mode: ``"row"`` draws per sample, ``"batch"`` once for the whole batch (torchvision's
            ``StochasticDepth`` modes). Default: ``"row"``.
        seed: seeds this layer's own generator.

    Shape:
        - Input: :math:`(N, *)`. Output: same shape as the input.

    Example:
        >>> branch = nn.Linear(16, 16); drop = DropPath(0.1)
        >>> x = torch.randn(8, 16); y = x + drop(branch(x))
        >>> y.shape
        torch.Size([8, 16])
    """

    def __init__(self, p: float = 0.1, inplace: bool = False, *, scale_by_keep: bool = True,
                 mode: Literal["row", "batch"] = "row", seed: int | None = None) -> None:
        super().__init__(p, inplace, seed=seed)
        self.scale_by_keep = _check_bool(scale_by_keep, "scale_by_keep")
        if mode not in DF.DROP_PATH_MODES:
            raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.drop_path(x, self.p, self.training, self.inplace, scale_by_keep=self.scale_by_keep,
                            mode=self.mode, generator=self.generator)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, scale_by_keep={self.scale_by_keep}"
        return text if self.mode == "row" else f"{text}, mode={self.mode!r}"


class DropBlock2d(DropoutLayer):
    """DropBlock: drops contiguous square blocks of feature maps (Ghiasi et al., "DropBlock: A
    regularization method for convolutional networks", NeurIPS 2018).

    A block larger than a feature map is clipped to it, as timm's ``DropBlock2d`` does, so the
    same layer works on every stage of a network, in training and in eval mode.

    Args:
        p: target fraction of dropped units. Default: 0.1.
        block_size: side of the square blocks. Default: 7.
        inplace: do the operation in place. Default: False.
        couple_channels: all channels of a sample share one block mask, as in the paper (timm's
            default); False draws each channel independently. Default: True.
        scale_by_keep: scale kept units by (number of units) / (number kept). Default: True.
        seed: seeds this layer's own generator.

    Shape:
        - Input: :math:`(N, C, H, W)`. Output: same shape as the input.

    Example:
        >>> layer = DropBlock2d(0.1, block_size=3)
        >>> layer(torch.randn(2, 8, 14, 14)).shape
        torch.Size([2, 8, 14, 14])
    """

    def __init__(self, p: float = 0.1, block_size: int = 7, inplace: bool = False, *,
                 couple_channels: bool = True, scale_by_keep: bool = True, seed: int | None = None) -> None:
        super().__init__(p, inplace, seed=seed)
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be a positive int, got {type(block_size).__name__} {block_size!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.couple_channels = _check_bool(couple_channels, "couple_channels")
        self.scale_by_keep = _check_bool(scale_by_keep, "scale_by_keep")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.drop_block2d(x, self.p, self.block_size, training=self.training, inplace=self.inplace,
                               couple_channels=self.couple_channels, scale_by_keep=self.scale_by_keep,
                               generator=self.generator)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, block_size={self.block_size}"
        if not self.couple_channels:
            text += ", couple_channels=False"
        return text if self.scale_by_keep else f"{text}, scale_by_keep=False"


class WeightDropout(_MaskShapeLayer):
    """DropConnect on named weights of a wrapped module (Wan et al., "Regularization of Neural
    Networks using DropConnect", ICML 2013; AWD-LSTM's WeightDrop).

    Each forward call in training mode draws a fresh mask over each named weight and runs the
    wrapped module with the dropped weights in their place (via ``torch.func.functional_call``);
    the parameters themselves are never overwritten, so the state dict is the wrapped module's.

    Args:
        module: the module to wrap, e.g. an ``nn.LSTM``.
        weights: names of its parameters to drop, e.g. ``["weight_hh_l0"]``.
        p: drop probability in [0, 1]. Default: 0.5.
        mask_shape: e.g. ``(None, 1)`` drops whole rows (all inputs of a unit).
        seed: seeds this layer's own generator.

    Shape:
        - Input and output: those of the wrapped module.

    Example:
        >>> lstm = WeightDropout(nn.LSTM(28, 64), ["weight_hh_l0"], p=0.5)
        >>> out, _ = lstm(torch.randn(28, 4, 28))
        >>> out.shape
        torch.Size([28, 4, 64])
    """

    def __init__(self, module: nn.Module, weights: Sequence[str], p: float = 0.5, *,
                 mask_shape: Sequence[int | None] | None = None, seed: int | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(weights, str) or not isinstance(weights, Sequence) or not weights:
            raise ValueError(f"weights must be a non-empty list of parameter names, got {weights!r}")
        if not all(isinstance(w, str) for w in weights):
            raise TypeError(f"weights must be parameter names (str), got {list(weights)!r}")
        super().__init__(p, mask_shape=mask_shape, seed=seed)
        names = dict(module.named_parameters())
        missing = [w for w in weights if w not in names]
        if missing:
            raise ValueError(f"weights {missing} are not parameters of {type(module).__name__}; it has {sorted(names)}")
        self.module = module
        self.weights = list(weights)

    def forward(self, *args, **kwargs):
        if not self.training or self.p == 0.0:
            return self.module(*args, **kwargs)
        params = dict(self.module.named_parameters())
        dropped = {
            name: DF.dropconnect(params[name], self.p, True, mask_shape=self.mask_shape, generator=self.generator)
            for name in self.weights
        }
        return torch.func.functional_call(self.module, dropped, args, kwargs)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, {super().extra_repr()}"


class BiasActDropout(DropoutLayer):
    """``residual + dropout(act(x + bias))`` as one layer (:func:`dropkit.functional.bias_act_dropout`):
    the epilogue of a transformer block's matmuls in one pass each way on CUDA, keeping only the
    seed for the mask (and the input for ``relu`` and ``gelu``).

    In eval mode it is ``residual + act(x + bias)``. :func:`dropkit.convert.fuse` puts it in place
    of ``GELU -> Dropout`` pairs of an existing model. Fusing these epilogues is what raised
    Megatron-LM's GPT-3 throughput from 113 to 135 TFLOP/s per GPU (Narayanan et al. 2021).

    Args:
        p: drop probability in [0, 1].
        activation: ``"none"``, ``"relu"`` or ``"gelu"``.
        features: size of the last input dimension, to hold a learnable bias (zeros at first); None
            for no bias (e.g. after a ``Linear`` that has its own).
        seed: seeds this layer's own generator.

    Shape: input (..., features); ``residual`` (optional, in ``forward``) and output the input's shape.

    Example:
        >>> layer = BiasActDropout(0.1, activation="gelu", features=64)
        >>> y = layer(torch.randn(8, 64), residual=torch.randn(8, 64))
    """

    def __init__(self, p: float = 0.1, *, activation: str = "none", features: int | None = None,
                 seed: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(p, seed=seed)
        if not isinstance(activation, str) or activation not in DF.ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(DF.ACTIVATIONS)}, got {activation!r}")
        if features is not None and (isinstance(features, bool) or not isinstance(features, int) or features < 1):
            raise ValueError(f"features must be a positive int or None, got {features!r}")
        self.activation = activation
        self.bias = None if features is None else nn.Parameter(torch.zeros(features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return DF.bias_act_dropout(x, self.bias, self.p, activation=self.activation, residual=residual,
                                   training=self.training, generator=self.generator)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, activation={self.activation!r}"
        return text if self.bias is None else f"{text}, features={self.bias.numel()}"
