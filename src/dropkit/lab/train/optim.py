"""How the weights move: the optimiser, the learning-rate schedule, the momentum ramp and max-norm."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dropkit.lab.models import output_layer
from dropkit.lab.train.config import TrainConfig

__all__ = ["apply_max_norm", "hidden_linears", "make_optimizer", "make_scheduler", "ramped_momentum"]


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser; weight decay applies to weights, never to Concrete Dropout's learnt rate logits."""
    named = list(model.named_parameters())
    rates = [p for name, p in named if name.endswith("p_logit")]
    params = [{"params": [p for name, p in named if not name.endswith("p_logit")]}]
    if rates:
        params.append({"params": rates, "weight_decay": 0.0})
    lr, wd = config.lr, config.weight_decay
    if config.optimizer in ("sgd", "nesterov"):
        nesterov = config.optimizer == "nesterov"
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd, nesterov=nesterov)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-epoch schedule: cosine from lr to 0 over ``config.span``, or x``step_gamma`` every ``step_epochs``."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.span)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_epochs, gamma=config.step_gamma)
    return None


def apply_max_norm(layers: Iterable[nn.Linear], max_norm: float) -> None:
    """Rescale each unit's incoming weights (each row of ``weight``) to L2 norm <= ``max_norm``.

    The max-norm constraint of Srivastava et al. 2014 (JMLR 15, sec. 5.1), applied as a projection
    after each optimiser step; rows already inside the ball are left as they are.
    """
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.renorm(layer.weight, 2, 0, max_norm))


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """Every ``nn.Linear`` except the output layer: the units that max-norm constrains."""
    out = output_layer(model)
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not out]


def ramped_momentum(config: TrainConfig, epoch: int) -> float:
    """SGD momentum in ``epoch`` (1-based): ``momentum_start`` rising linearly to ``momentum`` over
    the first ``momentum_ramp`` epochs, then constant.

    Dropout nets want 10-100x the learning rate of standard nets, or momentum 0.95-0.99
    (Srivastava et al. 2014, JMLR, appendix A.2); Hinton et al. 2012 (arXiv:1207.0580) started
    momentum at 0.5 and raised it linearly to 0.99, so that the first steps, far from any minimum,
    do not blow up. The value is a function of the epoch alone, so a resumed run sets the same one.
    """
    if config.momentum_ramp == 0:
        return config.momentum
    frac = min(1.0, (epoch - 1) / config.momentum_ramp)
    return config.momentum_start + (config.momentum - config.momentum_start) * frac
