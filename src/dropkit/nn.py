"""The dropout family as ``nn.Module`` layers: thin holders of settings over :mod:`dropkit.functional`.

Each layer validates its settings in the constructor, is active only in training mode
(``model.train()``) and is the identity in eval mode, and shows its settings in ``repr``. ``p`` can
be changed between steps (schedules and controllers do) and is validated on every assignment.

``seed`` gives a layer its own ``torch.Generator`` seeded once: successive calls draw different
masks, and the sequence repeats from run to run (as a Keras layer's seed does). Without it, the
layer draws from torch's global generator, which ``dropkit.manual_seed`` seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dropkit import functional as DF
from dropkit.rng import check_seed


class DropoutLayer(nn.Module):
    """Common settings of the dropout layers: the rate ``p`` and the random source."""

    def __init__(self, p: float = 0.5, *, seed: int | None = None) -> None:
        super().__init__()
        self.p = p
        self.seed = seed
        self.generator: torch.Generator | None = None
        if seed is not None:
            check_seed(seed)
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = DF.check_p(value)

    def extra_repr(self) -> str:
        text = f"p={self.p}"
        return text if self.seed is None else f"{text}, seed={self.seed}"


class _MaskShapeLayer(DropoutLayer):
    """A layer whose mask shape can be set (Keras's ``noise_shape``)."""

    def __init__(self, p: float = 0.5, *, mask_shape: Sequence[int | None] | None = None,
                 seed: int | None = None) -> None:
        super().__init__(p, seed=seed)
        if mask_shape is not None and any(m is not None and (not isinstance(m, int) or m < 1) for m in mask_shape):
            raise ValueError(f"mask_shape entries must be positive ints or None, got {list(mask_shape)}")
        self.mask_shape = None if mask_shape is None else tuple(mask_shape)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.mask_shape is None else f"{text}, mask_shape={self.mask_shape}"


class Dropout(_MaskShapeLayer):
    """Inverted dropout (Srivastava et al. 2014): zeroes each unit with probability ``p`` in
    training and scales the kept ones by 1/(1-p), so eval mode needs no rescaling.

    Args:
        p: drop probability in [0, 1].
        mask_shape: shape of the random mask, broadcast to the input; 1 shares a draw along a
            dimension (e.g. ``(None, 1, None)`` drops the same features at every time step).
        seed: seeds this layer's own generator.

    Shape: any; output has the input's shape.

    Example:
        >>> layer = Dropout(0.5)
        >>> y = layer(torch.randn(32, 128))
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.dropout(x, self.p, training=self.training, mask_shape=self.mask_shape, generator=self.generator)


class ReLUDropout(DropoutLayer):
    """``ReLU`` then :class:`Dropout` as one layer (:func:`dropkit.functional.relu_dropout`): the same
    outputs and gradients as the pair, one memory pass each way, and no mask or ReLU output kept
    for backward beyond the output itself, which the next layer keeps anyway.

    In eval mode it is a ReLU. :func:`dropkit.convert.fuse_relu_dropout` swaps it in for the pairs
    of an existing model.

    Example:
        >>> layer = ReLUDropout(0.5)
        >>> y = layer(torch.randn(32, 128))
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.relu_dropout(x, self.p, training=self.training, generator=self.generator)


class _ChannelDropout(DropoutLayer):
    spatial_dims: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.channel_dropout(x, self.p, training=self.training, spatial_dims=self.spatial_dims,
                                  generator=self.generator)


class Dropout1d(_ChannelDropout):
    """Channel dropout for (N, C, L) or (C, L) inputs: zeroes whole channels (Tompson et al. 2015)."""

    spatial_dims = 1


class Dropout2d(_ChannelDropout):
    """Channel dropout for (N, C, H, W) or (C, H, W) inputs: zeroes whole feature maps.

    Example:
        >>> layer = Dropout2d(0.2)
        >>> y = layer(torch.randn(8, 16, 14, 14))
    """

    spatial_dims = 2


class Dropout3d(_ChannelDropout):
    """Channel dropout for (N, C, D, H, W) or (C, D, H, W) inputs."""

    spatial_dims = 3


class AlphaDropout(_MaskShapeLayer):
    """Alpha dropout for SELU networks (Klambauer et al. 2017): keeps zero mean and unit variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.alpha_dropout(x, self.p, training=self.training, mask_shape=self.mask_shape,
                                generator=self.generator)


class FeatureAlphaDropout(DropoutLayer):
    """Alpha dropout with one draw per channel of a (N, C, ...) input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.feature_alpha_dropout(x, self.p, training=self.training, generator=self.generator)


class GaussianDropout(_MaskShapeLayer):
    """Gaussian dropout: multiplies by N(1, p/(1-p)) noise (Srivastava et al. 2014, section 10)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.gaussian_dropout(x, self.p, training=self.training, mask_shape=self.mask_shape,
                                   generator=self.generator)


class LockedDropout(DropoutLayer):
    """Locked (variational) dropout for RNNs: one mask per sequence, the same at every time step
    (Gal & Ghahramani 2016; AWD-LSTM). Input (T, N, F), or (N, T, F) with ``batch_first``.

    Example:
        >>> layer = LockedDropout(0.3, batch_first=True)
        >>> y = layer(torch.randn(4, 28, 64))
    """

    def __init__(self, p: float = 0.5, *, batch_first: bool = False, seed: int | None = None) -> None:
        super().__init__(p, seed=seed)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.locked_dropout(x, self.p, training=self.training, batch_first=self.batch_first,
                                 generator=self.generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_first={self.batch_first}"


class DropPath(DropoutLayer):
    """DropPath / stochastic depth (Huang et al. 2016): drops a residual branch per sample.

    Example:
        >>> branch = nn.Linear(16, 16); drop = DropPath(0.1)
        >>> x = torch.randn(8, 16); y = x + drop(branch(x))
    """

    def __init__(self, p: float = 0.1, *, scale_by_keep: bool = True, seed: int | None = None) -> None:
        super().__init__(p, seed=seed)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.drop_path(x, self.p, training=self.training, scale_by_keep=self.scale_by_keep,
                            generator=self.generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_by_keep={self.scale_by_keep}"


class DropBlock2d(DropoutLayer):
    """DropBlock (Ghiasi et al. 2018): drops contiguous square blocks of each feature map.

    ``block_size`` is checked against the feature map when the layer runs.
    """

    def __init__(self, p: float = 0.1, block_size: int = 7, *, seed: int | None = None) -> None:
        super().__init__(p, seed=seed)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DF.drop_block2d(x, self.p, self.block_size, training=self.training, generator=self.generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"


class WeightDropout(_MaskShapeLayer):
    """DropConnect on named weights of a wrapped module (Wan et al. 2013; AWD-LSTM's WeightDrop).

    Each forward call in training mode draws a fresh mask over each named weight and runs the
    wrapped module with the dropped weights in their place (via ``torch.func.functional_call``);
    the parameters themselves are never overwritten, so the state dict is the wrapped module's.

    Args:
        module: the module to wrap, e.g. an ``nn.LSTM``.
        weights: names of its parameters to drop, e.g. ``["weight_hh_l0"]``.
        p: drop probability in [0, 1].
        mask_shape: e.g. ``(None, 1)`` drops whole rows (all inputs of a unit).

    Example:
        >>> lstm = WeightDropout(nn.LSTM(28, 64), ["weight_hh_l0"], p=0.5)
        >>> out, _ = lstm(torch.randn(28, 4, 28))
    """

    def __init__(self, module: nn.Module, weights: Sequence[str], p: float = 0.5, *,
                 mask_shape: Sequence[int | None] | None = None, seed: int | None = None) -> None:
        super().__init__(p, mask_shape=mask_shape, seed=seed)
        names = dict(module.named_parameters())
        if isinstance(weights, str) or not weights:
            raise ValueError(f"weights must be a non-empty list of parameter names, got {weights!r}")
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
            name: DF.dropconnect(params[name], self.p, training=True, mask_shape=self.mask_shape,
                                 generator=self.generator)
            for name in self.weights
        }
        return torch.func.functional_call(self.module, dropped, args, kwargs)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, {super().extra_repr()}"
