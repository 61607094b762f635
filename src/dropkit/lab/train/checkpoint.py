"""A run's checkpoint: everything a resumed run needs, written atomically after every epoch.

Files are sealed with checksums and the last two kept (:mod:`dropkit.lab.sealed_files`), so a
damaged newest checkpoint is named and the run resumes from the one before it.

The file holds the config, the epochs done and their metrics, the model, optimiser and
learning-rate scheduler, the batch-shuffling generator, the rate controller's state and the
weight average. torch's global generator is not saved: the loop reseeds it from (seed, rank,
epoch) at each epoch, which also keeps every rank's masks apart. Reading never unpickles
arbitrary objects (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dropkit.lab import sealed_files
from dropkit.lab.sealed_files import CHECKPOINT
from dropkit.lab.train.averaging import WeightAverage
from dropkit.lab.train.config import TrainConfig, check_resumable

__all__ = ["CHECKPOINT", "RunState", "clear_checkpoints", "finished_history", "load_checkpoint", "save_checkpoint"]


@dataclass
class RunState:
    """The objects of a run whose state a checkpoint carries; ``controller`` is any rate callback
    with ``state_dict``/``load_state_dict`` (the overfitting controller), else None."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    shuffle: torch.Generator
    controller: Any = None
    average: WeightAverage | None = None


def save_checkpoint(folder: Path, config: TrainConfig, run: RunState, history: list[dict[str, Any]]) -> None:
    """Write ``run``'s state after ``len(history)`` epochs as ``folder``'s newest checkpoint, atomically."""
    state = {
        "config": config.to_dict(),
        "epoch": len(history),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "shuffle": run.shuffle.get_state(),
        "rate_controller": run.controller.state_dict() if run.controller is not None else None,
        "average": run.average.state_dict() if run.average is not None else None,
        "history": history,
    }
    sealed_files.save(folder, state)


def clear_checkpoints(folder: Path) -> None:
    """Remove ``folder``'s checkpoints: a fresh run never falls back to the run it overwrites."""
    sealed_files.clear(folder)


def load_checkpoint(folder: Path, config: TrainConfig, run: RunState) -> list[dict[str, Any]]:
    """Restore ``run`` from ``folder``'s newest good checkpoint (refusing one made with other
    settings, see :func:`~dropkit.lab.train.config.check_resumable`); returns the metrics of the
    epochs done, none when the folder holds no checkpoint.

    Raises:
        dropkit.lab.sealed_files.CheckpointError: every checkpoint in the folder is damaged.
    """
    state = sealed_files.load_latest(folder)
    if state is None:
        return []
    check_resumable(state["config"], state["epoch"], config)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    run.shuffle.set_state(state["shuffle"])
    if run.controller is not None:
        run.controller.load_state_dict(state["rate_controller"])
    if run.average is not None:
        run.average.load_state_dict(state["average"])
    return state["history"]


def finished_history(folder: Path, config: TrainConfig) -> list[dict[str, Any]] | None:
    """The metrics of the run in ``folder`` when its newest good checkpoint holds every epoch of
    ``config`` and may be continued with it: what resuming that run would return, read without
    training and without taking the run's lock (a checkpoint is replaced atomically, so a reader
    never sees half of one). None when the folder holds no such run: no checkpoint, fewer
    epochs, other settings, or only damaged checkpoints (resuming then trains, or names the
    problem)."""
    try:
        state = sealed_files.load_latest(folder)
        if state is None:
            return None
        check_resumable(state["config"], state["epoch"], config)
    except ValueError:  # CheckpointError included
        return None
    return state["history"] if state["epoch"] == config.epochs else None
