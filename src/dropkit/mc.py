"""Monte Carlo dropout: predictive uncertainty from a network trained with dropout.

Gal & Ghahramani ("Dropout as a Bayesian Approximation", ICML 2016) show that keeping dropout on
at test time and averaging T stochastic forward passes approximates the predictive distribution
of a Bayesian network. The spread of the T passes measures the model's uncertainty: for a
classifier, the entropy of the mean prediction (total) splits into the mean entropy of the passes
(aleatoric: noise in the data) and their mutual information with the weights (epistemic: what
more data would fix; BALD, Houlsby et al. 2011). The original work used T = 10,000; 30 to 100
passes are the usual practice.

Only the dropout layers are switched to training mode; batch norm and everything else stay in
eval mode, and every module's mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dropkit.convert import TWINS
from dropkit.nn import DropoutLayer

__all__ = ["DROPOUT_TYPES", "ClassUncertainty", "dropout_active", "mc_classify", "mc_regress", "mc_samples"]

#: module types that MC dropout switches on: dropkit's layers and torch's own dropout modules
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (DropoutLayer, *TWINS)


@contextmanager
def dropout_active(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with only its dropout layers in training mode; restore on exit.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), dnn.Dropout(0.5))
        >>> with dropout_active(net):
        ...     net[1].training, net[0].training
        (True, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    if not layers:
        raise ValueError("model has no dropout layer: Monte Carlo dropout would return T identical passes")
    for layer in layers:
        layer.train()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.train(training)


@torch.no_grad()
def mc_samples(model: nn.Module, x: torch.Tensor, samples: int = 30) -> torch.Tensor:
    """``samples`` stochastic forward passes of ``model`` on ``x``, stacked: (samples, *output).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), dnn.Dropout(0.5))
        >>> mc_samples(net, torch.randn(2, 4), samples=5).shape
        torch.Size([5, 2, 4])
    """
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise TypeError(f"samples must be an int >= 1, got {type(samples).__name__} {samples!r}")
    if samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    with dropout_active(model):
        return torch.stack([model(x) for _ in range(samples)])


@dataclass(frozen=True)
class ClassUncertainty:
    """MC-dropout prediction for a classifier, one row per input.

    Attributes:
        probs: mean class probabilities over the passes, (N, classes).
        total: entropy of ``probs`` (nats), the predictive uncertainty.
        aleatoric: mean entropy of the individual passes.
        epistemic: ``total - aleatoric``, the mutual information between prediction and weights.
    """

    probs: torch.Tensor
    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def mc_classify(model: nn.Module, x: torch.Tensor, samples: int = 30) -> ClassUncertainty:
    """Mean prediction and its uncertainty split for a model that outputs class logits.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), dnn.Dropout(0.5), nn.Linear(16, 3))
        >>> out = mc_classify(net, torch.randn(4, 8), samples=50)
        >>> flagged = out.epistemic > 0.2   # inputs the model has not learned to handle
        >>> out.probs.shape, flagged.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """
    probs = mc_samples(model, x, samples).softmax(-1)
    mean = probs.mean(0)
    total = _entropy(mean)
    aleatoric = _entropy(probs).mean(0)
    return ClassUncertainty(mean, total, aleatoric, (total - aleatoric).clamp_min(0.0))


def mc_regress(model: nn.Module, x: torch.Tensor, samples: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance over the passes for a model with real-valued outputs.

    The variance is the model (epistemic) part only; add the data noise variance (e.g. tau^-1 in
    Gal & Ghahramani 2016) for a full predictive variance.
    """
    outputs = mc_samples(model, x, samples)
    return outputs.mean(0), outputs.var(0, unbiased=False)
