"""Training runs: :func:`train` and everything it is made of, one module per job.

* :mod:`~dropkit.lab.train.config`: :class:`TrainConfig`, the settings of a run and their ranges;
* :mod:`~dropkit.lab.train.loop`: :func:`train`, the loop itself, and the data splits it loads;
* :mod:`~dropkit.lab.train.hooks`: :class:`Callback`, the points where code may join the loop;
* :mod:`~dropkit.lab.train.metrics`: what is measured every epoch and ``metrics.jsonl``;
* :mod:`~dropkit.lab.train.optim`: optimiser, learning-rate schedule, momentum ramp, max-norm;
* :mod:`~dropkit.lab.train.averaging`: the running average of the weights (SWA);
* :mod:`~dropkit.lab.train.checkpoint`: the checkpoint a run is resumed from.

Example::

    from dropkit.lab.train import TrainConfig, train
    result = train(TrainConfig(model="tutorial_mlp", p=0.2, epochs=2), "runs/p=0.2")
    print(result.final["test_acc"])
"""

from dropkit.lab.train.checkpoint import CHECKPOINT, finished_history
from dropkit.lab.train.config import (
    ADAPTIVE_START_P,
    DROP_SCHEDULES,
    INPUTS,
    OPTIMIZERS,
    RATES,
    SCHEDULES,
    TrainConfig,
    model_p,
)
from dropkit.lab.train.hooks import Callback
from dropkit.lab.train.loop import (
    MASK_STREAM,
    SHUFFLE_STREAM,
    TrainResult,
    load_splits,
    train,
)
from dropkit.lab.train.metrics import METRICS, evaluate, iter_metrics, peak_rss_mib
from dropkit.lab.train.optim import apply_max_norm, hidden_linears, ramped_momentum

__all__ = [
    "ADAPTIVE_START_P",
    "CHECKPOINT",
    "DROP_SCHEDULES",
    "INPUTS",
    "MASK_STREAM",
    "METRICS",
    "OPTIMIZERS",
    "RATES",
    "SCHEDULES",
    "SHUFFLE_STREAM",
    "Callback",
    "TrainConfig",
    "TrainResult",
    "apply_max_norm",
    "evaluate",
    "finished_history",
    "hidden_linears",
    "iter_metrics",
    "load_splits",
    "model_p",
    "peak_rss_mib",
    "ramped_momentum",
    "train",
]
