"""Concrete Dropout: a drop probability learnt by gradient descent, one per layer.

Gal, Hron & Kendall, "Concrete Dropout", NIPS 2017. Searching p by grid costs a training run per
value; Concrete Dropout instead makes p a parameter. The Bernoulli mask has no gradient with
respect to p, so it is replaced by its Concrete (relaxed Bernoulli) version, a smooth function of
p and of uniform noise ``u``:

    z = sigmoid((log p - log(1 - p) + log u - log(1 - u)) / temperature)

``z`` is close to 1 (drop) with probability about p and close to 0 otherwise, and the smaller the
temperature, the closer it gets to a real Bernoulli draw. The layer multiplies its input by the
keep mask ``1 - z`` and by ``1 / (1 - p)``, as inverted dropout does.

Left alone, training would drive p to 0, since noise only hurts the fit. The variational
objective of the paper adds, per layer, a regulariser with two terms:

    weight_regularizer * ||W||^2 / (1 - p)                          (W: the next layer's weights)
  + dropout_regularizer * K * (p log p + (1 - p) log(1 - p))        (K: the layer's input size)

The first grows with p and holds the weights small; the second is minus K times the entropy of
a Bernoulli(p), which pulls p towards 1/2. With ``N`` training examples, prior length-scale ``l``
and model precision ``tau``, the paper sets ``weight_regularizer = l^2 / (tau N)`` and
``dropout_regularizer = 2 / (tau N)`` (:func:`regularizer_weights`); the loss to minimise is the
mean data loss plus :func:`concrete_regularisation` of the model.

A ConcreteDropout layer wraps the layer that follows it (``layer=``), as in the paper's code:
the regulariser needs that layer's weights. :func:`to_concrete` does this for a whole model.

Example::

    reg_w, reg_d = regularizer_weights(n_train=50_000)
    model = nn.Sequential(nn.Flatten(), ConcreteDropout(784, nn.Linear(784, 10),
                          weight_regularizer=reg_w, dropout_regularizer=reg_d))
    loss = F.cross_entropy(model(x), y) + concrete_regularisation(model)

Keep the ``p_logit`` parameters out of the optimiser's weight decay, which would pull every p
towards the middle of its bounds. :func:`concrete_rates` gives the learnt rates for the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from dropkit.functional import check_p
from dropkit.nn import Dropout
from dropkit.rng import check_seed

__all__ = ["ConcreteDropout", "concrete_rates", "concrete_regularisation", "regularizer_weights", "to_concrete"]

#: keeps log u and log(1 - u) finite when torch.rand returns exactly 0
_U_EPS = 1e-7


def regularizer_weights(n_train: int, length_scale: float = 1e-4, precision: float = 1.0) -> tuple[float, float]:
    """``(weight_regularizer, dropout_regularizer)`` as Gal et al. set them: ``l^2 / (tau N)`` and
    ``2 / (tau N)`` for ``N = n_train`` examples, length-scale ``l`` and precision ``tau``."""
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be a positive int, got {n_train!r}")
    if not length_scale > 0 or not precision > 0:
        raise ValueError(f"length_scale and precision must be positive, got {length_scale}, {precision}")
    scale = precision * n_train
    return length_scale**2 / scale, 2.0 / scale


class ConcreteDropout(nn.Module):
    """Dropout with a learnt rate through a relaxed Bernoulli mask (Gal, Hron & Kendall 2017).

    One learnt rate per layer: ``p = p_min + (p_max - p_min) * sigmoid(p_logit)``. The squashing
    keeps p strictly inside ``(0, 1)`` however far an optimiser pushes ``p_logit`` (the scale
    ``1 / (1 - p)`` stays finite), while p's gradient never vanishes inside the bounds.

    In eval mode the mask is off: the layer returns its input (or ``layer(input)``).

    Args:
        in_features: size of the input's trailing dimension(s), an int or a shape such as
            ``(C, H, W)``; the inputs are checked against it and its product is ``K`` of the
            regulariser.
        layer: the layer that follows the dropout, called on the masked input; its ``weight``
            enters the regulariser.
        init_p: starting rate, inside ``p_bounds``.
        temperature: of the relaxation; smaller is closer to a Bernoulli mask (0.1 in the paper).
        weight_regularizer, dropout_regularizer: the two coefficients of the regulariser.
        p_bounds: ``(p_min, p_max)``, with ``0 < p_min < p_max < 1``.
        seed: seeds this layer's own generator; without it the noise comes from torch's global
            generator, which ``dropkit.manual_seed`` seeds.

    Shape: ``(*, *in_features)``; output ``(*, *in_features)``, or whatever ``layer`` returns.
    """

    def __init__(self, in_features: int | Sequence[int], layer: nn.Module | None = None, *, init_p: float = 0.1,
                 temperature: float = 0.1, weight_regularizer: float, dropout_regularizer: float,
                 p_bounds: tuple[float, float] = (1e-3, 0.999), seed: int | None = None) -> None:
        super().__init__()
        if isinstance(in_features, (str, bytes)) or not isinstance(in_features, (int, Sequence)):
            raise TypeError(f"in_features must be a positive int or a shape of them, got {in_features!r}")
        shape = (in_features,) if isinstance(in_features, int) else tuple(in_features)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"in_features must be a positive int or a shape of them, got {in_features!r}")
        if layer is not None and not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be an nn.Module or None, got {type(layer).__name__}")
        for name, value in (("temperature", temperature), ("weight_regularizer", weight_regularizer),
                            ("dropout_regularizer", dropout_regularizer)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
        if isinstance(p_bounds, (str, bytes)) or not isinstance(p_bounds, Sequence) or len(p_bounds) != 2:
            raise TypeError(f"p_bounds must be a pair (p_min, p_max), got {p_bounds!r}")
        p_min, p_max = (check_p(b, "p_bounds") for b in p_bounds)
        if not 0.0 < p_min < p_max < 1.0:
            raise ValueError(f"p_bounds must satisfy 0 < p_min < p_max < 1, got {p_bounds}")
        init_p = check_p(init_p, "init_p")
        if not p_min < init_p < p_max:
            raise ValueError(f"init_p must lie inside p_bounds {p_bounds}, got {init_p}")
        if not temperature > 0 or math.isinf(temperature):
            raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
        if not weight_regularizer >= 0 or not dropout_regularizer >= 0:
            raise ValueError(f"regularizers must be >= 0, got {weight_regularizer}, {dropout_regularizer}")
        self.in_features = shape
        self.layer = layer
        self.temperature = float(temperature)
        self.weight_regularizer = float(weight_regularizer)
        self.dropout_regularizer = float(dropout_regularizer)
        self.p_bounds = (p_min, p_max)
        fraction = (init_p - p_min) / (p_max - p_min)
        self.p_logit = nn.Parameter(torch.tensor(math.log(fraction) - math.log1p(-fraction)))
        self.seed = seed
        self.generator: torch.Generator | None = None
        if seed is not None:
            check_seed(seed)
            self.generator = torch.Generator().manual_seed(seed)

    def drop_probability(self) -> torch.Tensor:
        """The current rate as a 0-dim tensor that carries gradient to ``p_logit``."""
        p_min, p_max = self.p_bounds
        return p_min + (p_max - p_min) * torch.sigmoid(self.p_logit)

    @property
    def p(self) -> float:
        """The current rate as a float (for reports; it is learnt, so it cannot be assigned)."""
        return self.drop_probability().item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.in_features)
        if x.dim() < n or tuple(x.shape[-n:]) != self.in_features:
            raise ValueError(f"expected input of shape (*, {', '.join(map(str, self.in_features))}), "
                             f"got {list(x.shape)}")
        if self.training:
            # the mask is computed in float32 at least: 1 - 1e-7 is 1 in half precision
            p = self.drop_probability()
            device = x.device if self.generator is None else self.generator.device
            u = torch.rand(x.shape, generator=self.generator, dtype=torch.float32, device=device).to(x.device)
            z = torch.sigmoid((torch.log(p) - torch.log1p(-p) + torch.logit(u, eps=_U_EPS)) / self.temperature)
            x = x * ((1 - z) / (1 - p)).to(x.dtype)
        return x if self.layer is None else self.layer(x)

    def regularisation(self, weight: torch.Tensor | Iterable[torch.Tensor] | None = None) -> torch.Tensor:
        """This layer's regulariser (see the module docstring), a 0-dim tensor to add to the loss.

        ``weight``: the following layer's weight(s); defaults to ``layer.weight``.
        """
        if weight is None:
            if self.layer is None or not isinstance(getattr(self.layer, "weight", None), torch.Tensor):
                raise ValueError("pass the following layer's weight, or build the layer with layer= "
                                 "wrapping a module that has a .weight")
            weight = self.layer.weight
        weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
        p = self.drop_probability()
        squares = sum(w.pow(2).sum() for w in weights)
        weight_term = self.weight_regularizer * squares / (1 - p)
        negative_entropy = p * torch.log(p) + (1 - p) * torch.log1p(-p)
        return weight_term + self.dropout_regularizer * math.prod(self.in_features) * negative_entropy

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, p={self.p:.4g}, temperature={self.temperature}, "
                f"weight_regularizer={self.weight_regularizer:g}, dropout_regularizer={self.dropout_regularizer:g}")


def _concrete_layers(model: nn.Module) -> list[tuple[str, ConcreteDropout]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ConcreteDropout)]


def concrete_regularisation(model: nn.Module) -> torch.Tensor:
    """The sum of the regularisers of every :class:`ConcreteDropout` in ``model``: add it to the
    mean data loss. Each layer must wrap the layer that follows it (``layer=``)."""
    layers = _concrete_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no ConcreteDropout layers")
    unbound = [name for name, m in layers if m.layer is None]
    if unbound:
        raise ValueError(f"ConcreteDropout layers {unbound} wrap no layer, so their weight term is unknown: "
                         "build them with layer=, or call .regularisation(weight) on each yourself")
    return sum(m.regularisation() for _, m in layers)


def concrete_rates(model: nn.Module) -> dict[str, float]:
    """The learnt rate of every :class:`ConcreteDropout` in ``model``, by module name (for metrics)."""
    return {name: m.p for name, m in _concrete_layers(model)}


def _inside(p: float, bounds: tuple[float, float]) -> float:
    """``p`` moved to at least 1 % of the bounds' width inside them."""
    margin = 0.01 * (bounds[1] - bounds[0])
    return min(max(p, bounds[0] + margin), bounds[1] - margin)


def to_concrete(model: nn.Module, *, weight_regularizer: float, dropout_regularizer: float,
                init_p: float | None = None, temperature: float = 0.1,
                p_bounds: tuple[float, float] = (1e-3, 0.999)) -> int:
    """Replace, in place, each ``dropkit.nn.Dropout`` that an ``nn.Linear`` directly follows in an
    ``nn.Sequential`` by a :class:`ConcreteDropout` wrapping that Linear; returns how many.

    ``init_p=None`` starts each new layer at the old layer's rate, moved inside ``p_bounds``. A
    Dropout with a ``mask_shape`` is left alone: Concrete Dropout draws one value per element.
    """
    count = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq)
        rebuilt: list[nn.Module] = []
        i = 0
        while i < len(children):
            here, after = children[i], children[i + 1] if i + 1 < len(children) else None
            if type(here) is Dropout and here.mask_shape is None and isinstance(after, nn.Linear):
                start = init_p if init_p is not None else _inside(here.p, p_bounds)
                rebuilt.append(ConcreteDropout(after.in_features, after, init_p=start, temperature=temperature,
                                               weight_regularizer=weight_regularizer,
                                               dropout_regularizer=dropout_regularizer, p_bounds=p_bounds))
                count += 1
                i += 2
            else:
                rebuilt.append(here)
                i += 1
        if len(rebuilt) != len(children):
            for key in list(seq._modules):
                del seq._modules[key]
            for j, module in enumerate(rebuilt):
                seq.add_module(str(j), module)
    return count
