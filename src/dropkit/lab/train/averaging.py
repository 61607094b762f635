"""Stochastic weight averaging: the running mean of a run's weights, kept and scored every epoch.

Izmailov et al. 2018 (UAI), "Averaging weights leads to wider optima and better generalization":
the uniform average of the weights at the end of every epoch from ``average_from`` on is an
ensemble of the late iterates at the cost of one model copy. Buffers such as batch-norm
statistics are averaged too, not recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["WeightAverage"]

#: scores a model: eval-mode figures by name, with the seconds it took under ``eval_seconds``
Scorer = Callable[[nn.Module], dict[str, Any]]


class WeightAverage:
    """The uniform average of ``model``'s weights (and buffers) at the end of each epoch from
    ``start`` (1-based) on.

    Args:
        model: the network being trained; the average starts as a copy of it.
        start: the first epoch whose weights enter the average.

    Example::

        average = WeightAverage(model, start=3)
        for epoch in range(1, epochs + 1):
            ...  # train one epoch
            row.update(average.update(model, epoch, score))   # avg_* figures from epoch 3 on
    """

    def __init__(self, model: nn.Module, start: int) -> None:
        self.start = start
        self.averaged = AveragedModel(model, use_buffers=True)

    def update(self, model: nn.Module, epoch: int, score: Scorer) -> dict[str, Any]:
        """Add the weights of ``epoch`` when it is ``start`` or later, and return the average's
        scores as ``avg_<name>`` (its ``eval_seconds`` unprefixed); nothing before ``start``."""
        if epoch < self.start:
            return {}
        self.averaged.update_parameters(model)
        scores = score(self.averaged.module)
        seconds = scores.pop("eval_seconds")
        return {"eval_seconds": seconds, **{f"avg_{key}": value for key, value in scores.items()}}

    def reached(self, epochs_done: int) -> bool:
        """Whether the average holds any epoch's weights after ``epochs_done`` epochs."""
        return epochs_done >= self.start

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the count of epochs averaged, for a checkpoint."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.averaged.load_state_dict(state)
