"""Monte Carlo dropout passes of an MLP as thinned networks: the dropped units' work is skipped.

A pass of Monte Carlo dropout samples a network: dropping unit ``u`` of a layer removes row ``u``
of that layer's weight and column ``u`` of the next one (the ``W diag(z)`` weights of Gal &
Ghahramani, ICML 2016). Here each pass draws one such thinned network, keeping each unit with
probability ``1 - p`` as dropout does, and runs the whole batch through it, so only the kept rows
and columns enter the products: at p = 0.5 a hidden-to-hidden product shrinks to about a quarter.

Each input still gets passes with independent Bernoulli masks, so its predictive mean and
uncertainty have the same distribution as with per-element masks (:func:`dropkit.mc.mc_samples`'s
default); what changes is that the inputs of one batch share each pass's network. Pass ``t``
draws the kept units of the input of Linear ``i`` with dropkit's keep-mask kernel from
``derive_seed(seed, 5, t, i)``: the same seed gives the same passes whatever the batch.

It applies to an ``nn.Sequential`` of the form ``[Flatten] [Dropout] Linear (activation [Dropout]
Linear)*`` with element-wise activations (including dropkit's fused ``ReLUDropout``), the shape
of the lab's MLPs. The gathers cost about one copy of the kept weights per pass, so it pays once
the batch is large enough for the products to dominate (BENCHMARKS.md, Monte Carlo dropout).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from dropkit import kernels, rng
from dropkit import nn as dnn

__all__ = ["ThinnedMLP", "parse_mlp", "thinned_samples"]

#: stream of :func:`dropkit.rng.derive_seed` that the thinned passes' kept units come from
_THINNED_STREAM = 5

#: rough cost of one weight element gathered from strided columns, in multiply-adds of a matrix
#: product: a load that misses the cache against vectorised, cache-blocked multiply-adds. It only
#: decides how a pass is computed, never its result (beyond rounding)
_MULTIPLY_ADDS_PER_GATHERED_WEIGHT = 32

#: unit dropout modules; a ``mask_shape`` (shared masks) is refused
_DROPOUTS: tuple[type[nn.Module], ...] = (nn.Dropout, dnn.Dropout)


@dataclass(frozen=True)
class ThinnedMLP:
    """An MLP read from an ``nn.Sequential``: ``linears[i]`` gets its input dropped at ``rates[i]``
    and is followed by ``activations[i]`` (applied in order; none after the last Linear)."""

    flatten: bool
    linears: tuple[nn.Linear, ...]
    rates: tuple[float, ...]
    activations: tuple[tuple[nn.Module, ...], ...]


def _unit_rate(module: nn.Module) -> float | None:
    if type(module) not in _DROPOUTS:
        return None
    if getattr(module, "mask_shape", None) is not None:
        raise ValueError(f"{module} shares its mask across dimensions; thinned passes drop single units")
    return float(module.p)


def parse_mlp(model: nn.Module) -> ThinnedMLP:
    """Read ``model`` as ``[Flatten] [Dropout] Linear (activation [Dropout] Linear)*``.

    Raises ``TypeError`` if ``model`` is not an ``nn.Sequential``, and ``ValueError`` naming the
    first module that does not fit: anything but Linear, element-wise activations, unit dropout,
    ``Identity`` and a leading ``Flatten(1, -1)``; a dropout before an activation; two dropouts in
    a row; a dropout after the last Linear.

    Example:
        >>> mlp = parse_mlp(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), dnn.Dropout(0.5), nn.Linear(8, 2)))
        >>> mlp.rates
        (0.0, 0.5)
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"thinned passes need an nn.Sequential MLP, got {type(model).__name__}")
    mods = list(model)
    flatten = bool(mods) and isinstance(mods[0], nn.Flatten)
    if flatten and (mods[0].start_dim, mods[0].end_dim) != (1, -1):
        raise ValueError(f"only Flatten(1, -1) can lead a thinned MLP, got {mods[0]}")
    linears: list[nn.Linear] = []
    rates: list[float] = []
    activations: list[list[nn.Module]] = []
    pending: float | None = None  # the rate of a dropout waiting for the next Linear
    for position, module in enumerate(mods[1:] if flatten else mods, start=int(flatten)):
        if isinstance(module, nn.Identity):  # e.g. the place holders fuse_relu_dropout leaves
            continue
        if type(module) is nn.Linear:
            linears.append(module)
            rates.append(pending or 0.0)
            activations.append([])
            pending = None
            continue
        if isinstance(module, dnn.ReLUDropout):
            activation, rate = nn.ReLU(), float(module.p)
        else:
            rate = _unit_rate(module)
            activation = module if rate is None and isinstance(module, dnn.ELEMENTWISE_ACTIVATIONS) else None
        if activation is None and rate is None:
            raise ValueError(f"thinned passes take Linear, element-wise activations and unit dropout; "
                             f"position {position} holds {module}")
        if activation is not None:
            if not linears:
                raise ValueError(f"position {position}: {module} comes before the first Linear")
            if pending is not None:
                raise ValueError(f"position {position}: an activation after a dropout ({module}); dropout must "
                                 "come after the activation, so that a dropped unit stays zero")
            activations[-1].append(activation)
        if rate is not None:
            if pending is not None:
                raise ValueError(f"position {position}: two dropouts in a row ({module})")
            pending = rate
    if not linears:
        raise ValueError("thinned passes need at least one nn.Linear")
    if pending is not None:
        raise ValueError("a dropout after the last Linear drops outputs, not units of a product; "
                         "thinned passes need the model to end with Linear (or an activation)")
    for a, b in pairwise(linears):
        if a.out_features != b.in_features:
            raise ValueError(f"layer widths do not chain: {a} then {b}")
    return ThinnedMLP(flatten, tuple(linears), tuple(rates), tuple(tuple(a) for a in activations))


def _kept_units(mlp: ThinnedMLP, seed: int, t: int, device: torch.device) -> list[torch.Tensor | None]:
    """Indices of the kept input units of each Linear in pass ``t`` (None: all, no dropout)."""
    kept: list[torch.Tensor | None] = []
    for i, (linear, p) in enumerate(zip(mlp.linears, mlp.rates)):
        if not p:
            kept.append(None)
            continue
        mask = kernels.keep_mask(rng.derive_seed(seed, _THINNED_STREAM, t, i), p, (linear.in_features,),
                                 device=device)
        kept.append(mask.nonzero().squeeze(1))
    return kept


def _scale(p: float) -> float:
    """The inverted-dropout scale of the kept units (no unit is kept at p = 1)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _columns_pay(rows: int, width: int, kept: int) -> bool:
    """Whether gathering a weight's ``kept`` of ``width`` columns costs less than the products it
    skips, ``rows * (width - kept)`` multiply-adds a kept output; else the input is spread back to
    full width with zeros (see :data:`_MULTIPLY_ADDS_PER_GATHERED_WEIGHT`)."""
    return rows * (width - kept) >= _MULTIPLY_ADDS_PER_GATHERED_WEIGHT * kept


def _thinned_pass(mlp: ThinnedMLP, x: torch.Tensor, kept: list[torch.Tensor | None]) -> torch.Tensor:
    h, units = x, None  # h holds the input columns ``units`` of the next Linear (None: all of them)
    if kept[0] is not None:
        h, units = x.index_select(1, kept[0]).mul_(_scale(mlp.rates[0])), kept[0]
    last = len(mlp.linears) - 1
    for i, linear in enumerate(mlp.linears):
        rows = kept[i + 1] if i < last else None
        weight, bias = linear.weight, linear.bias
        if rows is not None:  # a contiguous copy of the kept rows: always worth it
            weight = weight.index_select(0, rows)
            bias = None if bias is None else bias.index_select(0, rows)
        if units is not None:
            if _columns_pay(h.shape[0], linear.in_features, units.numel()):
                weight = weight.index_select(1, units)
            else:
                h = h.new_zeros(h.shape[0], linear.in_features).index_copy_(1, units, h)
        h = F.linear(h, weight, bias)
        for activation in mlp.activations[i]:
            h = activation(h)
        if rows is not None:
            h = h.mul_(_scale(mlp.rates[i + 1]))
        units = rows
    return h


@torch.no_grad()
def thinned_samples(model: nn.Module, x: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """``samples`` passes of the MLP ``model`` on ``x``, each through its own thinned network.

    See the module docstring; :func:`dropkit.mc.mc_samples` with ``shared_masks=True`` calls this
    after checking its arguments.

    Shape: ``x``: (N, in) (or (N, *) with a leading ``Flatten``); output: (samples, N, out).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), dnn.Dropout(0.5), nn.Linear(8, 3))
        >>> thinned_samples(net, torch.randn(2, 4), samples=5, seed=0).shape
        torch.Size([5, 2, 3])
    """
    mlp = parse_mlp(model)
    if not any(mlp.rates):
        raise ValueError(f"model ({type(model).__name__}) has no dropout: Monte Carlo dropout would return "
                         "T identical passes")
    h = x.flatten(1) if mlp.flatten else x
    if h.dim() != 2 or h.shape[1] != mlp.linears[0].in_features:
        raise ValueError(f"x must be (N, {mlp.linears[0].in_features}) for this MLP"
                         f"{' after flattening' if mlp.flatten else ''}, got shape {list(x.shape)}")
    return torch.stack([_thinned_pass(mlp, h, _kept_units(mlp, seed, t, h.device)) for t in range(samples)])
