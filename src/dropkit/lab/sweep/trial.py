"""One trial of a sweep: a training run that reports its validation accuracy to Optuna every epoch.

The report comes from the training loop's epoch hook (:class:`EpochReport`), so a trial is one
:func:`dropkit.lab.train.train` call however it ends: at its last epoch, at a rung of
``--pruner promote``, or when the pruner stops it (the run then ends after that epoch, with its
checkpoint written).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import Trial
from torch import nn

from dropkit.lab import distributed
from dropkit.lab.sweep.config import SweepConfig, search_space, trial_config
from dropkit.lab.sweep.promote import next_rung, resumes_from
from dropkit.lab.sweep.study import reopen_trial
from dropkit.lab.train import Callback, TrainConfig, train

__all__ = ["DataParallelTrain", "EpochReport", "RunHistory", "TrainFn", "run_trial"]

#: ``train_fn(config, out_dir, *, resume, quiet, callbacks)`` -> an object with ``history``, as train
TrainFn = Callable[..., Any]


class EpochReport(Callback):
    """Reports every epoch's validation accuracy to an Optuna trial and, with ``prune``, asks the
    study's pruner after each epoch before the last and ends the run when it says so.

    In a data-parallel run it reports from rank 0 only, where it reopens the trial by its id (a
    callback travels to the ranks' processes pickled, the live trial stays behind).

    Args:
        trial: the running trial.
        cfg: the sweep (its storage and pruner, and the full epochs of a trial).
        prune: whether the pruner may stop the run.
    """

    def __init__(self, trial: Trial, cfg: SweepConfig, prune: bool) -> None:
        self.trial: Trial | None = trial
        self.trial_id = trial._trial_id
        self.cfg, self.prune = cfg, prune
        self.stop_requested = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "trial": None}

    def on_epoch_end(self, model: nn.Module, epoch: int, row: dict[str, Any]) -> None:
        """Report ``row["val_acc"]`` at step ``row["epoch"]``; request a stop if the trial is pruned."""
        if not distributed.is_main():
            return
        if self.trial is None:
            self.trial = reopen_trial(self.cfg, self.trial_id)
        self.trial.report(row["val_acc"], row["epoch"])
        if self.prune and row["epoch"] < self.cfg.base.epochs and self.trial.should_prune():
            self.stop_requested = True


@dataclass(frozen=True)
class RunHistory:
    """What a sweep reads of a finished training call: its metrics, one dict per epoch."""

    history: list[dict[str, Any]]


def _history_of(config: TrainConfig, out_dir: str, resume: bool, callbacks: Sequence[Any]) -> list[dict[str, Any]]:
    return train(config, out_dir, resume=resume, quiet=True, callbacks=callbacks).history


@dataclass(frozen=True)
class DataParallelTrain:
    """A ``train_fn`` that runs every job of a sweep as a data-parallel run of ``nproc`` local
    processes (``dropkit sweep --nproc``; see :mod:`dropkit.lab.distributed`): each rank draws its own
    masks, rank 0 writes the run folder and runs the callbacks' reports, and the sweep reads rank
    0's metrics. A module-level, frozen class, so spawned sweep workers can take it along."""

    nproc: int

    def __call__(self, config: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 quiet: bool = False, callbacks: Sequence[Any] = ()) -> RunHistory:
        return RunHistory(distributed.launch(self.nproc, _history_of, config, str(out_dir), resume, list(callbacks)))


def run_trial(trial: Trial, cfg: SweepConfig, run_dir: Path, train_fn: TrainFn = train) -> float:
    """Train one trial in ``run_dir`` and return its last validation accuracy.

    Every epoch is reported as it ends (a promotion first reports the epochs its run copied, from
    the job it continues, so that the trial holds the whole learning curve). Raises
    ``optuna.TrialPruned`` when the run ends before the full epochs: stopped by the pruner
    (``--pruner halving`` or ``median``), or, with ``--pruner promote``, at the next rung of the
    job, which is the run's length (the run folder already holds the checkpoint a promotion
    continues).
    """
    space = search_space(cfg)
    params = {name: trial.suggest_float(name, low, high, log=kind == "log", step=step)
              for name, (kind, low, high, step) in space.items()}
    full = cfg.base.epochs
    stop = next_rung(resumes_from(trial), full) if cfg.pruner == "promote" else full
    copied = trial.user_attrs.get("trained_from", 0)
    if copied:  # a promotion's run starts as a copy of its source's: the same values, reported first
        (source,) = [t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.user_attrs["source"]]
        for epoch in range(1, copied + 1):
            trial.report(source.intermediate_values[epoch], epoch)
    report = EpochReport(trial, cfg, prune=cfg.pruner in ("halving", "median"))
    history = train_fn(trial_config(cfg.base, params, stop), run_dir, resume=True, quiet=True,
                       callbacks=[report]).history
    last = history[-1]
    if last["epoch"] < stop:
        raise optuna.TrialPruned(f"validation accuracy {last['val_acc']:.4f} after {last['epoch']} of {full} epochs")
    if stop < full:
        raise optuna.TrialPruned(f"stopped at rung {stop} of {full} epochs")
    return last["val_acc"]
