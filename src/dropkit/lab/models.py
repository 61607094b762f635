"""Reference networks for 28x28 grey-scale images (MNIST, Fashion-MNIST), each with dropout where
the literature puts it, and a registry (:func:`build_model`) that the CLI and the trainer use.

Conventions every model here keeps, because the trainer and the tests rely on them:

* input is a float batch ``(N, 28, 28)`` (``(N, 1, 28, 28)`` and ``(N, 784)`` also work);
  output is ``(N, num_classes)`` logits;
* the output layer is the model's last ``nn.Linear`` (in ``model.modules()`` order) and nothing
  follows it: dropout is never applied to the logits. Every other ``nn.Linear`` is a hidden
  layer, which is what the max-norm constraint of the trainer acts on;
* with ``batchnorm=True`` each hidden block is ``Linear/Conv -> BatchNorm -> ReLU -> Dropout``:
  dropout after normalisation, so that BN's running statistics are not computed on dropped-out
  activations whose variance differs between training and test (Li et al., "Understanding the
  Disharmony between Dropout and Batch Normalization by Variance Shift", CVPR 2019).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dropkit.nn import Dropout, Dropout2d, LockedDropout, WeightDropout

__all__ = [
    "MODELS",
    "RowLSTM",
    "build_model",
    "check_model_args",
    "cnn",
    "lstm",
    "main_rate",
    "output_layer",
    "srivastava_mlp",
    "tutorial_mlp",
]

IMAGE_SIDE = 28
NUM_CLASSES = 10


def _dense_block(n_in: int, n_out: int, p: float, batchnorm: bool) -> list[nn.Module]:
    """``Linear -> [BatchNorm1d] -> ReLU -> Dropout(p)``; the Linear has no bias when BN follows it."""
    layers: list[nn.Module] = [nn.Linear(n_in, n_out, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(n_out))
    layers += [nn.ReLU(), Dropout(p)]
    return layers


def tutorial_mlp(p: float = 0.5, *, hidden: int = 128, batchnorm: bool = False) -> nn.Sequential:
    """The network of the classic dropout tutorials: 784 - 128 ReLU - Dropout(p) - 10.

    One hidden layer, dropout on it and not on the logits. Small enough that at p=0.5 it
    underfits MNIST within 10 epochs: a useful counter-example to "more dropout is better".
    """
    return nn.Sequential(
        nn.Flatten(),
        *_dense_block(IMAGE_SIDE * IMAGE_SIDE, hidden, p, batchnorm),
        nn.Linear(hidden, NUM_CLASSES),
    )


def srivastava_mlp(
    p_input: float = 0.2, p_hidden: float = 0.5, width: int = 1024, depth: int = 3, *, batchnorm: bool = False
) -> nn.Sequential:
    """The dropout MLP of Srivastava et al. 2014 (JMLR 15, Table 2): 784 - depth x width ReLU - 10.

    Inputs are dropped with ``p_input`` (the paper's retention 0.8) and every hidden layer with
    ``p_hidden`` (retention 0.5). The paper pairs this with a max-norm constraint on each hidden
    unit's incoming weights (1.06 % test error with it, 1.25 % without); that constraint acts on
    the weights after each step, so the trainer applies it (``TrainConfig.max_norm``).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    layers: list[nn.Module] = [nn.Flatten(), Dropout(p_input)]
    n_in = IMAGE_SIDE * IMAGE_SIDE
    for _ in range(depth):
        layers += _dense_block(n_in, width, p_hidden, batchnorm)
        n_in = width
    layers.append(nn.Linear(n_in, NUM_CLASSES))
    return nn.Sequential(*layers)


def _conv_stage(c_in: int, c_out: int, p: float, batchnorm: bool) -> list[nn.Module]:
    """``Conv3x3 -> [BatchNorm2d] -> ReLU -> MaxPool2 -> Dropout2d(p)``: halves the map, drops whole channels.

    Channel dropout rather than unit dropout because neighbouring pixels of a feature map are
    strongly correlated, so dropping single pixels barely removes information (Tompson et al.,
    "Efficient Object Localization Using Convolutional Networks", CVPR 2015).
    """
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers += [nn.ReLU(), nn.MaxPool2d(2), Dropout2d(p)]
    return layers


class _Image(nn.Module):
    """Reshape any ``(N, ...)`` batch of 784 pixels to ``(N, 1, 28, 28)`` for the convolutions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 1, IMAGE_SIDE, IMAGE_SIDE)


def cnn(
    p: float = 0.5,
    p_channel: float = 0.1,
    channels: tuple[int, int] = (32, 64),
    hidden: int = 256,
    *,
    batchnorm: bool = False,
) -> nn.Sequential:
    """Two conv-pool stages with channel dropout (``p_channel``), then a dense head with dropout ``p``.

    28x28 -> conv 3x3 (``channels[0]``) -> pool -> 14x14 -> conv 3x3 (``channels[1]``) -> pool -> 7x7
    -> ``hidden`` ReLU units -> Dropout(p) -> 10 logits.
    """
    c1, c2 = channels
    side = IMAGE_SIDE // 4
    return nn.Sequential(
        _Image(),
        *_conv_stage(1, c1, p_channel, batchnorm),
        *_conv_stage(c1, c2, p_channel, batchnorm),
        nn.Flatten(),
        *_dense_block(c2 * side * side, hidden, p, batchnorm),
        nn.Linear(hidden, NUM_CLASSES),
    )


class RowLSTM(nn.Module):
    """An LSTM that reads an image one row at a time (28 steps of 28 pixels) and classifies the last state.

    Dropout the AWD-LSTM way (Merity et al., "Regularizing and Optimizing LSTM Language Models",
    ICLR 2018): ``LockedDropout`` draws one mask per sequence and reuses it at every time step, on
    the input rows (``p_input``) and on each layer's output (``p``), so the recurrence sees the same
    units missing throughout; ``p_weight > 0`` adds DropConnect on each layer's hidden-to-hidden
    matrix ``weight_hh_l0`` (``WeightDropout``), regularising the recurrent connections themselves.
    Layers are separate one-layer LSTMs so that dropout can sit between them.
    """

    def __init__(
        self, p: float = 0.25, p_input: float = 0.1, p_weight: float = 0.0, hidden: int = 128, layers: int = 2
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.input_dropout = LockedDropout(p_input, batch_first=True)
        self.lstms = nn.ModuleList(
            self._layer(IMAGE_SIDE if i == 0 else hidden, hidden, p_weight) for i in range(layers)
        )
        self.dropouts = nn.ModuleList(LockedDropout(p, batch_first=True) for _ in range(layers))
        self.head = nn.Linear(hidden, NUM_CLASSES)

    @staticmethod
    def _layer(n_in: int, hidden: int, p_weight: float) -> nn.Module:
        lstm = nn.LSTM(n_in, hidden, batch_first=True)
        return WeightDropout(lstm, ["weight_hh_l0"], p_weight) if p_weight > 0 else lstm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(x.reshape(x.shape[0], IMAGE_SIDE, IMAGE_SIDE))
        for lstm, dropout in zip(self.lstms, self.dropouts):
            x, _ = lstm(x)
            x = dropout(x)
        return self.head(x[:, -1])


def lstm(p: float = 0.25, p_input: float = 0.1, p_weight: float = 0.0, hidden: int = 128, layers: int = 2) -> RowLSTM:
    """A :class:`RowLSTM` (registered as ``lstm``)."""
    return RowLSTM(p=p, p_input=p_input, p_weight=p_weight, hidden=hidden, layers=layers)


#: name -> (builder, the builder's argument that the main dropout rate ``p`` sets)
MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "tutorial_mlp": (tutorial_mlp, "p"),
    "srivastava_mlp": (srivastava_mlp, "p_hidden"),
    "cnn": (cnn, "p"),
    "lstm": (lstm, "p"),
}


def check_model_args(name: str, p: float | None = None, /, **kwargs: Any) -> dict[str, Any]:
    """Check the arguments of ``build_model(name, p, **kwargs)`` without building; returns the
    builder's keyword arguments (the main rate under its own name).

    The builders here take four kinds of argument, told apart by their defaults: flags (bool),
    sizes and counts (int, at least 1), dropout rates (float, in [0, 1]) and tuples of sizes.
    A value of the wrong kind (``True`` for a size, ``"abc"`` for a rate) is refused like one out
    of range. ``p`` may come positionally or as the keyword ``p``; the main rate may be given once.

    Raises:
        ValueError: naming the model, the argument and what it accepts.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    builder, rate_arg = MODELS[name]
    kwargs = dict(kwargs)
    if "p" in kwargs and (rate_arg != "p" or p is not None):
        given = kwargs.pop("p")
        if p is not None:
            raise ValueError(f"model {name!r}: the main dropout rate is given twice (p={p!r} and p={given!r})")
        p = given
    if p is not None:
        if rate_arg in kwargs:
            raise ValueError(f"model {name!r}: pass p or {rate_arg}, not both (both set the main dropout rate)")
        kwargs[rate_arg] = p
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} has no argument {', '.join(unknown)} (it takes: {', '.join(accepted)})")
    for arg, value in kwargs.items():
        problem = _argument_problem(accepted[arg].default, value)
        if problem:
            raise ValueError(f"model {name!r}: {arg} must be {problem}, got {value!r}")
    return kwargs


def _argument_problem(default: Any, value: Any) -> str | None:
    """What ``value`` should be, judged by the kind of the argument's default; None when it is fine."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "True or False"
    if isinstance(default, int):
        return None if _is_size(value) else "an integer >= 1"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
        return None if ok else "a dropout rate: a number in [0, 1]"
    if isinstance(default, tuple):
        ok = isinstance(value, (tuple, list)) and len(value) == len(default) and all(map(_is_size, value))
        return None if ok else f"a tuple of {len(default)} integers >= 1"
    return None


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def build_model(name: str, p: float | None = None, /, **kwargs: Any) -> nn.Module:
    """Build a registered model; ``p``, when given, sets its main dropout rate.

    The main rate is the hidden-layer rate (``p_hidden`` for ``srivastava_mlp``, the dense head's
    for ``cnn``, between LSTM layers for ``lstm``); the other rates are keyword arguments. Every
    argument is checked first (see :func:`check_model_args`).
    """
    kwargs = check_model_args(name, p, **kwargs)
    return MODELS[name][0](**kwargs)


def main_rate(name: str, p: float | None = None, /, **kwargs: Any) -> float:
    """The main dropout rate that ``build_model(name, p, **kwargs)`` gives the model (its default if unset)."""
    kwargs = check_model_args(name, p, **kwargs)
    builder, rate_arg = MODELS[name]
    return kwargs.get(rate_arg, inspect.signature(builder).parameters[rate_arg].default)


def output_layer(model: nn.Module) -> nn.Linear:
    """The model's output layer: its last ``nn.Linear``, by the convention of this module."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer")
    return linears[-1]
