"""Choosing dropout rates by search: ``dropkit sweep`` on Optuna.

The classic advice ("try several keep probabilities, keep the best") costs one full training run
per value. A sweep searches every dropout rate of a model at once (each ``p*`` argument of its
builder in :mod:`dropkit.lab.models`, e.g. ``p_input`` and ``p_hidden``; optionally the learning rate
and weight decay, log-uniform) with Optuna's TPE sampler (Akiba et al., "Optuna: A
Next-generation Hyperparameter Optimization Framework", KDD 2019), and stops bad settings early.

How a trial runs
    A trial is one :func:`dropkit.lab.train.train` run in its own folder. ``train`` has no per-epoch
    hook, so the trial trains one epoch at a time: ``train(config with epochs=e, resume=True)``
    continues the checkpoint of epoch ``e - 1`` and, by train's contract, ends with exactly the
    figures of an uninterrupted run. After each epoch the trial reports its validation accuracy,
    and the pruner may stop it: successive halving (Jamieson & Talwalkar, AISTATS 2016) in the
    asynchronous form Optuna implements (Li et al., "Massively Parallel Hyperparameter Tuning",
    arXiv:1810.05934, 2018), or the median rule. The trial's value is the validation accuracy of
    its last epoch, i.e. of the model its checkpoint holds.

Promotion-based halving (``--pruner promote``, the default)
    Stopping-based halving lets a trial go on whenever it ranks in the top third of the trials
    seen so far at a rung; with few trials that is often, so the first trial and every new best
    run to the end. ``--pruner promote`` follows Algorithm 2 of Li et al. (MLSys 2020) instead:
    training is cut into jobs, and a configuration trains further only once it has earned a
    place in the top third of a rung. It is the default because it keeps the budget where a small
    sweep needs it: on the Srivastava MLP on MNIST (BENCHMARKS.md), 9 configurations trained 21-23
    epochs, against 31-55 for 7 trials of stopping-based halving or the median rule.

    Rungs are at 1, 3, 9, ... epochs, every power of 3 below the full ``epochs`` followed by
    ``epochs`` itself (9 epochs: 1, 3, 9; 10 epochs: 1, 3, 9, 10). ``--trials N`` counts the
    configurations TPE samples. A job trains one configuration from its rung to the next one and
    stops there: its Optuna trial ends PRUNED, or COMPLETE when it reaches the full epochs. A free
    worker picks its next job under the machine lock, in this order:

    1. a promotion: scanning from the highest rung down, a configuration that is among the best
       floor(n / 3) of the n configurations that reached that rung (ranked by validation accuracy
       at the rung's epoch, the lower configuration number first on ties) and that has not been
       promoted from it yet; the best such one;
    2. a new configuration at rung 0, while the study holds fewer than N;
    3. when no trial is COMPLETE and none is running, a promotion of the best configuration at the
       highest rung reached, so that every sweep ends with a full-length run to pick;
    4. otherwise nothing: wait while jobs run (they may make a configuration promotable), else
       the study is complete.

    A configuration is named by the number of its first trial. A promotion is a queued trial with
    the configuration's parameters and the user attributes ``config``, ``resumes_from`` (the
    rung's epoch), ``source`` and ``source_dir`` (the job it continues). Its worker copies that
    job's run folder into the promotion's own and resumes there, so no two jobs write one folder.
    It reports every epoch of the run, the copied ones too, so that its intermediate values are a
    whole learning curve; only the epochs it trained itself count as spent. A configuration
    counts as promoted from a rung while a trial of that promotion is in any state but FAIL, or
    once the last retry of a dead one failed. Promotions are never taken back: a configuration
    promoted early that later drops out of the top third has been trained further all the same,
    the price of never waiting for a rung to fill. With N = 9 and 9 epochs: 9 jobs to epoch 1,
    3 promotions to epoch 3 and 1 to epoch 9 train 9 + 6 + 6 = 21 epochs, 26 % of a 9-run grid.

Validation selects, test reports once
    Trials are compared on the validation split only. ``train`` measures the test set every
    epoch (that is its contract), but the sweep never reads a trial's test figure except the
    winner's, after the study is complete: nothing in the study, the table or the plot depends
    on test data.

Storage, resumption and workers
    By default the study lives in an Optuna journal file (``JournalFileBackend``) in the sweep
    folder: an append-only log that several local processes may write at once, which SQLite is
    not good at (optuna#4002). Running the same command again continues the study of that name.
    ``--storage URL`` takes any Optuna storage URL (e.g. ``postgresql://...``) so that workers on
    several machines share one study.

    Every worker pulls trials until the study holds exactly ``trials`` finished ones (complete or
    pruned). Optuna's ``MaxTrialsCallback`` is not enough for that: it checks the count after a
    trial ends, so each worker that is mid-trial at that moment adds one more. Here a worker
    claims a slot before training: under a lock file shared by the processes of one machine it
    counts the trials finished, running and queued, and creates a trial only if the count is
    below the budget. Across machines the lock does not reach, so after creating its trial a
    worker also checks the trial numbers (which the storage hands out atomically): a trial with
    ``trials`` or more live trials numbered below it is surplus, is recorded as failed with
    ``surplus=True`` before it suggests any parameter, and is never trained.

    With ``--pruner promote`` the lock also covers the choice of the next job, and the budget is
    one of configurations: a new configuration with ``trials`` or more configurations numbered
    below it is surplus, and a promotion with an unfailed twin (same ``config`` and
    ``resumes_from``) numbered below it is recorded as failed with ``duplicate=True``, untrained.

    A trial whose worker died stays RUNNING in the storage. Workers mark it failed and queue its
    parameters again (at most :data:`MAX_RETRIES` times): on the same machine as soon as its
    process is gone (pid and start time recorded in the trial), on another machine when its
    heartbeat (written every ``stale_after / 4`` seconds) is older than ``stale_after``. A
    killed worker therefore loses at most the trial it was running. A dead promotion is queued
    again as the same promotion, a dead first job as the same configuration.
"""

from __future__ import annotations

import dataclasses
import fcntl
import inspect
import json
import math
import multiprocessing
import os
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import optuna  # noqa: E402
import torch  # noqa: E402
from optuna.exceptions import UpdateFinishedTrialError  # noqa: E402
from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402
from optuna.trial import FrozenTrial, Trial, TrialState  # noqa: E402

from dropkit import rng  # noqa: E402
from dropkit.lab import distributed  # noqa: E402
from dropkit.lab.models import MODELS  # noqa: E402
from dropkit.lab.train import CHECKPOINT, TrainConfig, train  # noqa: E402

__all__ = [
    "PRUNERS",
    "DataParallelTrain",
    "RunHistory",
    "SweepConfig",
    "format_table",
    "next_promotion",
    "open_study",
    "plot_sweep",
    "rate_arguments",
    "rungs",
    "run_sweep",
    "run_trial",
    "run_worker",
    "search_space",
    "summarise",
    "trial_config",
]

PRUNERS = ("halving", "median", "none", "promote")
STORAGE_FILE = "study.journal"
LOCK_FILE = "sweep.lock"
TRIALS_DIR = "trials"
SUMMARY_FILE = "sweep.json"
PLOT_FILE = "sweep.png"
#: sub-stream of the run seed (dropkit.rng.derive_seed) that seeds each worker's sampler
SAMPLER_STREAM = 11
#: how many times a trial whose worker died is queued again
MAX_RETRIES = 2
#: seconds between looks at the study while every remaining slot is held by a running trial
WAIT_POLL = 1.0
#: trial states that hold a slot of the budget
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: what a worker is told when it asks for a trial and gets none
WAIT, DONE = "wait", "done"
#: --pruner promote: rungs are this factor apart, and the best 1 / PROMOTE_FACTOR of a rung go on
PROMOTE_FACTOR = 3
#: --pruner promote: the user attributes that make a trial a job of a configuration (see the docstring)
JOB_ATTRS = ("config", "resumes_from", "source", "source_dir")
#: --pruner promote: the next job is a new configuration
NEW = "new"

TrainFn = Callable[..., Any]
Log = Callable[[str], None]


def _say(line: str) -> None:
    """The default log: one line to stdout, flushed so that progress shows when piped to a file."""
    print(line, flush=True)


@dataclass
class SweepConfig:
    """A sweep: the base run, what to search, how many trials, where the study lives.

    ``base`` is every trial's config except the searched values; its ``epochs`` is the full
    length of a trial. ``p_step`` puts the searched dropout rates on a lattice (``low``,
    ``low + p_step``, ... up to ``high``); None searches them continuously. Rates closer than a few
    hundredths give the same accuracy within a run's noise, and a lattice lets the sampler land
    exactly on the values a person would try (0 among them, which a continuous search only
    approaches). Error messages name the command-line flag of the setting at fault.
    """

    base: TrainConfig
    out_dir: Path
    trials: int = 20
    workers: int = 1
    pruner: str = "promote"
    storage: str | None = None
    study_name: str = "sweep"
    p_range: tuple[float, float] = (0.0, 0.8)
    p_step: float | None = 0.05
    lr_range: tuple[float, float] | None = None
    weight_decay_range: tuple[float, float] | None = None
    stale_after: float = 120.0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    def validate(self) -> None:
        """Raise ValueError naming the first flag outside its range (the base config included)."""
        self.base.validate()
        if self.base.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {self.base.model!r}")
        accepted = inspect.signature(MODELS[self.base.model][0]).parameters
        unknown = sorted(set(self.base.model_kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"--model-arg: model {self.base.model!r} has no argument {', '.join(unknown)} "
                             f"(it takes: {', '.join(accepted)})")
        if self.base.val_size < 1:
            raise ValueError(f"--val-size must be >= 1: the sweep selects on validation accuracy, "
                             f"got {self.base.val_size}")
        if self.base.rate != "fixed":
            raise ValueError(f"a sweep searches fixed rates, not rate={self.base.rate!r}")
        for name, value in (("--trials", self.trials), ("--workers", self.workers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        low, high = self.p_range
        if not 0.0 <= low < high < 1.0:
            raise ValueError(f"--p-range must satisfy 0 <= LOW < HIGH < 1, got {low:g} {high:g}")
        if self.p_step is not None and not 0.0 < self.p_step <= high - low:
            raise ValueError(f"--p-step must be in (0, HIGH - LOW] = (0, {high - low:g}] (or 0 to search "
                             f"continuously), got {self.p_step:g}")
        for flag, bounds in (("--lr-range", self.lr_range), ("--weight-decay-range", self.weight_decay_range)):
            if bounds is not None and not (0.0 < bounds[0] < bounds[1] and math.isfinite(bounds[1])):
                raise ValueError(f"{flag} must satisfy 0 < LOW < HIGH (searched log-uniform), "
                                 f"got {bounds[0]:g} {bounds[1]:g}")
        if not (self.stale_after > 0 and math.isfinite(self.stale_after)):
            raise ValueError(f"--stale-after must be a number of seconds > 0, got {self.stale_after}")
        if not self.study_name:
            raise ValueError("--study must be a non-empty name")
        if not search_space(self):
            raise ValueError(f"nothing to search: every dropout rate of {self.base.model!r} is fixed by --model-arg "
                             f"and neither --search-lr nor --search-weight-decay is given")


def rate_arguments(config: TrainConfig) -> list[str]:
    """The model's dropout-rate arguments (those starting with ``p``) that ``config`` leaves free:
    a rate given in ``model_kwargs``, or the main rate when ``config.p`` is set, stays fixed."""
    builder, main = MODELS[config.model]
    fixed = set(config.model_kwargs) | ({main} if config.p is not None else set())
    return [name for name in inspect.signature(builder).parameters if name.startswith("p") and name not in fixed]


def search_space(cfg: SweepConfig) -> dict[str, tuple[str, float, float, float | None]]:
    """Name -> (``"uniform"`` or ``"log"``, low, high, step) for every searched value.

    ``step`` is None for a continuous value; with a lattice, ``high`` is its last point (the given
    high rounded down to ``low`` plus a whole number of steps)."""
    low, high = cfg.p_range
    step = cfg.p_step
    if step is not None:
        high = round(low + math.floor((high - low) / step + 1e-9) * step, 12)
    space: dict[str, tuple[str, float, float, float | None]] = {
        name: ("uniform", low, high, step) for name in rate_arguments(cfg.base)}
    if cfg.lr_range is not None:
        space["lr"] = ("log", *cfg.lr_range, None)
    if cfg.weight_decay_range is not None:
        space["weight_decay"] = ("log", *cfg.weight_decay_range, None)
    return space


def trial_config(base: TrainConfig, params: dict[str, float], epochs: int | None = None) -> TrainConfig:
    """``base`` with a trial's values: the main rate goes to ``p``, other rates to ``model_kwargs``.

    ``epochs`` stops the run early (a rung). Every job of a trial plans ``base.epochs``
    (``planned_epochs``), so the learning-rate and dropout schedules span the full trial whatever
    rung a job stops at, and a job resumes the previous one's checkpoint exactly.
    """
    main = MODELS[base.model][1]
    changes: dict[str, Any] = {k: params[k] for k in ("lr", "weight_decay") if k in params}
    # a lattice point such as 0.15000000000000002 (low + 3 * 0.05 in floating point) trains as 0.15
    rates = {k: round(v, 12) for k, v in params.items() if k not in changes}
    if main in rates:
        changes["p"] = rates.pop(main)
    changes["model_kwargs"] = {**base.model_kwargs, **rates}
    changes["planned_epochs"] = base.epochs
    if epochs is not None:
        changes["epochs"] = epochs
    return dataclasses.replace(base, **changes)


def _record(cfg: SweepConfig) -> dict[str, Any]:
    """What a study must keep between runs: the base config (minus searched values) and the space."""
    space = search_space(cfg)
    config = {k: v for k, v in cfg.base.to_dict().items() if k not in space}
    return json.loads(json.dumps({"config": config, "space": space, "promote": cfg.pruner == "promote"}))


def _pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    """Successive halving with rungs at 1, 3, 9, ... epochs (reduction factor 3, Hyperband's usual
    choice), or the median rule after 2 unpruned trials and from epoch 2 on (Optuna's default of 5
    startup trials would spend most of a small budget unpruned). Steps are epochs, counted from 1."""
    if cfg.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    return optuna.pruners.NopPruner()  # --pruner promote: a job stops at its rung by itself


def _storage(cfg: SweepConfig) -> str | optuna.storages.BaseStorage:
    if cfg.storage is not None:
        return cfg.storage
    return JournalStorage(JournalFileBackend(str(cfg.out_dir / STORAGE_FILE)))


def open_study(cfg: SweepConfig, *, worker: int = 0) -> optuna.Study:
    """Create the study or continue the one of that name, refusing to continue it with other settings.

    Each opening gets its own TPE sampler seed, derived from the run seed, ``worker`` and the number
    of trials already in the study, so that workers and resumed runs do not replay each other's
    random draws. TPE's random start-up is a third of the budget, at most Optuna's default of 10.
    """
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    storage = _storage(cfg)
    study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction="maximize",
                                load_if_exists=True)
    record = _record(cfg)
    saved = study.user_attrs.get("dropkit")
    if saved is None:
        study.set_user_attr("dropkit", record)
    else:
        _check_same_settings(cfg, saved, record)
    seed = rng.derive_seed(cfg.base.seed, SAMPLER_STREAM, worker, len(study.get_trials(deepcopy=False)))
    sampler = optuna.samplers.TPESampler(seed=seed % 2**32, n_startup_trials=min(10, max(1, cfg.trials // 3)),
                                         constant_liar=True)
    return optuna.load_study(study_name=cfg.study_name, storage=storage, sampler=sampler, pruner=_pruner(cfg))


def _check_same_settings(cfg: SweepConfig, saved: dict[str, Any], record: dict[str, Any]) -> None:
    """Settings saved by an older dropkit may lack newer config fields; only those saved are compared.
    A study of promotion jobs cannot go on as one of whole trials or back (its trials mean other
    things); a study saved before ``--pruner promote`` existed is one of whole trials."""
    differ = [f"search space: {saved['space']} -> {record['space']}"] if saved["space"] != record["space"] else []
    if saved.get("promote", False) != record["promote"]:
        differ.append(f"--pruner: {'promote' if saved.get('promote') else 'halving, median or none'} -> {cfg.pruner}")
    differ += [f"{k}: {v!r} -> {record['config'].get(k)!r}"
               for k, v in saved["config"].items() if record["config"].get(k) != v]
    if differ:
        raise ValueError(f"study {cfg.study_name!r} was made with other settings ({'; '.join(differ)}): "
                         f"use another --study name or --out folder, or the same settings")


# ---------------------------------------------------------------------------------------- a trial

@dataclass(frozen=True)
class RunHistory:
    """What a sweep reads of a finished training call: its metrics, one dict per epoch."""

    history: list[dict[str, Any]]


def _history_of(config: TrainConfig, out_dir: str, resume: bool) -> list[dict[str, Any]]:
    return train(config, out_dir, resume=resume, quiet=True).history


@dataclass(frozen=True)
class DataParallelTrain:
    """A ``train_fn`` that runs every job of a sweep as a data-parallel run of ``nproc`` local
    processes (``dropkit sweep --nproc``; see :mod:`dropkit.lab.distributed`): each rank draws its own
    masks, rank 0 writes the run folder, and the sweep reads rank 0's metrics. A module-level,
    frozen class, so spawned sweep workers can take it along."""

    nproc: int

    def __call__(self, config: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 quiet: bool = False) -> RunHistory:
        return RunHistory(distributed.launch(self.nproc, _history_of, config, str(out_dir), resume))


def run_trial(trial: Trial, cfg: SweepConfig, run_dir: Path, train_fn: TrainFn = train) -> float:
    """Train one trial in ``run_dir`` and return its last validation accuracy.

    Raises ``optuna.TrialPruned`` when the pruner stops it; with ``--pruner none`` the run is
    trained in one call and its epochs are reported afterwards, for the record. With
    ``--pruner promote`` the trial is one job (see :func:`_run_job`).
    """
    space = search_space(cfg)
    params = {name: trial.suggest_float(name, low, high, log=kind == "log", step=step)
              for name, (kind, low, high, step) in space.items()}
    if cfg.pruner == "promote":
        return _run_job(trial, cfg, run_dir, params, train_fn)
    full = cfg.base.epochs
    if cfg.pruner == "none":
        history = train_fn(trial_config(cfg.base, params), run_dir, resume=True, quiet=True).history
        for row in history:
            trial.report(row["val_acc"], row["epoch"])
        return history[-1]["val_acc"]
    for epoch in range(1, full + 1):
        result = train_fn(trial_config(cfg.base, params, epoch), run_dir, resume=True, quiet=True)
        val_acc = result.history[-1]["val_acc"]
        trial.report(val_acc, epoch)
        if epoch < full and trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {val_acc:.4f} after {epoch} of {full} epochs")
    return val_acc


# ------------------------------------------------------------------ promotion-based halving

def rungs(epochs: int) -> list[int]:
    """The rungs of ``--pruner promote`` for runs of ``epochs`` epochs: every power of
    :data:`PROMOTE_FACTOR` below ``epochs``, then ``epochs`` (9 -> 1, 3, 9; 10 -> 1, 3, 9, 10)."""
    found, rung = [], 1
    while rung < epochs:
        found.append(rung)
        rung *= PROMOTE_FACTOR
    return [*found, epochs]


def _next_rung(epoch: int, epochs: int) -> int:
    """The epoch a job that starts at ``epoch`` (0 or a rung) trains to."""
    return next(rung for rung in rungs(epochs) if rung > epoch)


def _ranked(values: Mapping[int, float]) -> list[int]:
    """Configurations best first; on equal accuracy the earlier one (lower number) first."""
    return sorted(values, key=lambda config: (-values[config], config))


def next_promotion(rung_values: Mapping[int, Mapping[int, float]],
                   promoted: Collection[tuple[int, int]]) -> tuple[int, int] | None:
    """The (configuration, rung epoch) to promote next, or None when no configuration has earned it.

    ``rung_values[r][c]`` is configuration ``c``'s validation accuracy at the epoch ``r`` of a rung
    it reached (the last rung left out: nothing goes past it); ``promoted`` holds the pairs already
    promoted. From the highest rung down, a configuration is promotable when it ranks among the
    best ``n // 3`` of the ``n`` at its rung and was not promoted from there; the best one is taken.
    """
    for rung in sorted(rung_values, reverse=True):
        ranked = _ranked(rung_values[rung])
        for config in ranked[:len(ranked) // PROMOTE_FACTOR]:
            if (config, rung) not in promoted:
                return config, rung
    return None


def _best_stopped(rung_values: Mapping[int, Mapping[int, float]],
                  promoted: Collection[tuple[int, int]]) -> tuple[int, int] | None:
    """The best configuration at the highest rung that one stopped at (not promoted from it):
    what is promoted when nothing has earned it and no run has reached the full epochs."""
    for rung in sorted(rung_values, reverse=True):
        stopped = [config for config in _ranked(rung_values[rung]) if (config, rung) not in promoted]
        if stopped:
            return stopped[0], rung
    return None


def _config_of(trial: FrozenTrial | Trial) -> int:
    """The configuration a job trains; a trial without the attribute (a new one) starts its own."""
    return trial.user_attrs.get("config", trial.number)


def _resumes_from(trial: FrozenTrial | Trial) -> int:
    """The epoch a job starts at: 0 for a configuration's first job, a rung for a promotion."""
    return trial.user_attrs.get("resumes_from", 0)


def _epochs_trained(trial: FrozenTrial) -> int:
    """Epochs a trial trained itself: those it reported minus those a promotion copied."""
    return max(0, len(trial.intermediate_values) - trial.user_attrs.get("trained_from", 0))


@dataclass
class _Jobs:
    """What the jobs of a study say about its configurations (``--pruner promote``).

    ``values[r][c]``: configuration ``c``'s validation accuracy at rung epoch ``r`` (rungs below the
    last); ``sources[(c, r)]``: the finished job that took ``c`` to ``r``; ``promoted``: the (c, r)
    promoted from ``r``; ``configs``: configurations with a first job that is finished, running or
    queued; ``started``: those whose first job finished.
    """

    values: dict[int, dict[int, float]]
    sources: dict[tuple[int, int], FrozenTrial]
    promoted: set[tuple[int, int]]
    configs: set[int]
    started: set[int]


def _read_jobs(trials: Sequence[FrozenTrial], epochs: int) -> _Jobs:
    """Sort a study's trials into :class:`_Jobs` (failed ones count only as given-up promotions)."""
    jobs = _Jobs({}, {}, set(), set(), set())
    for trial in trials:
        config, start = _config_of(trial), _resumes_from(trial)
        if start and (trial.state != TrialState.FAIL or _given_up(trial)):
            jobs.promoted.add((config, start))
        if not start and trial.state in LIVE:
            jobs.configs.add(config)
        if trial.state not in FINISHED:
            continue
        stop = _next_rung(start, epochs)
        if not start:
            jobs.started.add(config)
        jobs.sources.setdefault((config, stop), trial)
        if stop < epochs:
            jobs.values.setdefault(stop, {}).setdefault(config, trial.value)
    return jobs


def _given_up(trial: FrozenTrial) -> bool:
    """A failed job that is not queued again: its worker died on its last retry (see
    :func:`_fail_dead_trials`), not a duplicate that never trained."""
    return trial.user_attrs.get("retries", 0) >= MAX_RETRIES and not trial.user_attrs.get("duplicate")


def _next_job(trials: Sequence[FrozenTrial], cfg: SweepConfig) -> FrozenTrial | str:
    """The job to run next by the rule of the module docstring: the finished job whose configuration
    to promote, :data:`NEW`, :data:`WAIT` or :data:`DONE`. Queued trials are not looked at (a
    worker takes those first)."""
    jobs = _read_jobs(trials, cfg.base.epochs)
    pick = next_promotion(jobs.values, jobs.promoted)
    if pick is None and len(jobs.configs) < cfg.trials:
        return NEW
    running = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    if pick is None and not running and not any(t.state == TrialState.COMPLETE for t in trials):
        pick = _best_stopped(jobs.values, jobs.promoted)
    if pick is not None:
        return jobs.sources[pick]
    return WAIT if running else DONE


def _promotion_attrs(source: FrozenTrial, epochs: int) -> dict[str, Any]:
    """The user attributes of the promotion that continues job ``source``."""
    return {"config": _config_of(source), "resumes_from": _next_rung(_resumes_from(source), epochs),
            "source": source.number, "source_dir": source.user_attrs.get("run_dir")}


def _run_job(trial: Trial, cfg: SweepConfig, run_dir: Path, params: dict[str, float], train_fn: TrainFn) -> float:
    """Train the job's configuration from its epoch to the next rung in one call (the run folder
    already holds the checkpoint it continues), report every epoch of the run, and stop there:
    ``optuna.TrialPruned`` below the full epochs, the last validation accuracy at them."""
    full = cfg.base.epochs
    stop = _next_rung(_resumes_from(trial), full)
    history = train_fn(trial_config(cfg.base, params, stop), run_dir, resume=True, quiet=True).history
    for row in history:
        trial.report(row["val_acc"], row["epoch"])
    if stop < full:
        raise optuna.TrialPruned(f"stopped at rung {stop} of {full} epochs")
    return history[-1]["val_acc"]


# ------------------------------------------------------------------------------------ a worker

def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of Linux's /proc/PID/stat, which tells a
    reused pid from the original), or None when it is gone or a zombie (a killed child not yet
    reaped still answers ``os.kill(pid, 0)``). Without /proc, '' for any existing pid."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return None
    state, *rest = stat.rsplit(")", 1)[1].split()
    return None if state in ("Z", "X") else rest[18]


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _is_dead(trial: FrozenTrial, stale_after: float) -> bool:
    """A RUNNING trial whose worker is gone: its process, when it ran on this machine; else a
    heartbeat (or, before the first one, a start) older than ``stale_after`` seconds."""
    owner = trial.user_attrs.get("owner")
    if owner is not None and owner["host"] == socket.gethostname():
        return _process_start(owner["pid"]) != owner["started"]
    last = trial.user_attrs.get("heartbeat") or trial.datetime_start.timestamp()
    return time.time() - last > stale_after


def _fail_dead_trials(study: optuna.Study, cfg: SweepConfig, log: Log) -> None:
    """Mark the trials of dead workers failed and queue their parameters again; when two workers
    race for the same trial, the storage lets only the first mark it, and only that one re-queues.
    A job of ``--pruner promote`` is queued with its :data:`JOB_ATTRS`, so that it comes back as
    the same promotion or the same configuration; a trial that died before suggesting its values
    keeps those it was queued with."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_dead(trial, cfg.stale_after):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        retries = trial.user_attrs.get("retries", 0)
        again = retries < MAX_RETRIES
        if again:
            job = {k: trial.user_attrs[k] for k in JOB_ATTRS if k in trial.user_attrs}
            if cfg.pruner == "promote":
                job.setdefault("config", trial.number)
            params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
            study.enqueue_trial(params, user_attrs={**job, "retry_of": trial.number, "retries": retries + 1})
        log(f"trial {trial.number}: its worker is gone; marked FAIL"
            + (", parameters queued again" if again else f", not retried (already retried {retries} times)"))


@contextmanager
def _machine_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive lock among the processes of this machine (released by the OS if one dies)."""
    with open(out_dir / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _claim(study: optuna.Study, cfg: SweepConfig, log: Log) -> Trial | str:
    """A trial this worker may run, ``WAIT`` when every free slot is held by a running trial (one
    that may yet die), or ``DONE`` when the study holds ``cfg.trials`` finished trials (with
    ``--pruner promote``: see :func:`_claim_job`)."""
    with _machine_lock(cfg.out_dir):
        _fail_dead_trials(study, cfg, log)
        if cfg.pruner == "promote":
            return _claim_job(study, cfg)
        states = Counter(t.state for t in study.get_trials(deepcopy=False))
        finished = sum(states[s] for s in FINISHED)
        if finished >= cfg.trials:
            return DONE
        if finished + states[TrialState.RUNNING] >= cfg.trials and not states[TrialState.WAITING]:
            return WAIT
        trial = study.ask()
        ahead = sum(1 for t in study.get_trials(deepcopy=False, states=LIVE) if t.number < trial.number)
        if ahead >= cfg.trials:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            return WAIT
        return _take(trial, cfg)


def _take(trial: Trial, cfg: SweepConfig) -> Trial:
    """Record in a claimed trial who runs it (for dead-worker recovery) and where."""
    run_dir = cfg.out_dir / TRIALS_DIR / f"{cfg.study_name}-{trial.number:04d}"
    trial.set_user_attr("owner", _owner())
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    trial.set_user_attr("heartbeat", time.time())
    return trial


def _claim_job(study: optuna.Study, cfg: SweepConfig) -> Trial | str:
    """``_claim`` for ``--pruner promote`` (called under the machine lock): a queued trial (a retry,
    or a promotion queued by another machine) if there is one, else the job :func:`_next_job`
    picks (a promotion is queued, then taken), ``WAIT`` or ``DONE``. A trial that turns out to be
    one too many (see :func:`_is_extra_job`) is failed untrained, and the worker waits."""
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.WAITING for t in trials):
        job = _next_job(trials, cfg)
        if job in (WAIT, DONE):
            return job
        if isinstance(job, FrozenTrial):
            study.enqueue_trial(job.params, user_attrs=_promotion_attrs(job, cfg.base.epochs))
    trial = study.ask()
    if _is_extra_job(study, trial, cfg.trials):
        return WAIT
    trial.set_user_attr("config", _config_of(trial))
    return _take(trial, cfg)


def _is_extra_job(study: optuna.Study, trial: Trial, budget: int) -> bool:
    """Whether a trial just taken is one too many, which only workers on other machines (outside
    the lock) can cause: a new configuration with ``budget`` configurations numbered below it
    (``surplus``), or a promotion with an unfailed twin numbered below it (``duplicate``). Such a
    trial is marked with that attribute and failed before it suggests any value."""
    attrs, trials = trial.user_attrs, study.get_trials(deepcopy=False)
    if attrs.get("resumes_from"):
        key, mark = (attrs["config"], attrs["resumes_from"]), "duplicate"
        extra = any(t.number < trial.number and t.state != TrialState.FAIL
                    and (_config_of(t), _resumes_from(t)) == key for t in trials)
    elif "config" not in attrs:
        mark = "surplus"
        extra = len({_config_of(t) for t in trials if t.state in LIVE and not _resumes_from(t)
                     and _config_of(t) < trial.number}) >= budget
    else:
        return False  # a configuration's first job queued again: only one worker queues it
    if extra:
        trial.set_user_attr(mark, True)
        study.tell(trial, state=TrialState.FAIL)
    return extra


def _start_from_source(trial: Trial, run_dir: Path, log: Log) -> None:
    """Copy the run a promotion continues into its own fresh folder, and record in ``trained_from``
    the epoch its training starts at. A run trained on another machine is not here: the promotion
    then trains its configuration from the first epoch (same figures, more epochs)."""
    source, start = trial.user_attrs.get("source_dir"), 0
    if source is not None and (Path(source) / CHECKPOINT).exists():
        shutil.copytree(source, run_dir)
        start = trial.user_attrs["resumes_from"]
    elif source is not None:
        log(f"trial {trial.number}: the run it continues is not in {source} (trained on another machine?): "
            f"training configuration {_config_of(trial)} from the first epoch")
    trial.set_user_attr("trained_from", start)


class _Heartbeat:
    """Writes the time into the trial every ``interval`` seconds while it trains, so that workers
    on other machines can tell a live trial from one whose worker died."""

    def __init__(self, trial: Trial, interval: float) -> None:
        self.trial, self.interval = trial, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except UpdateFinishedTrialError:  # another worker took it for dead (see run_worker)
                return

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def run_worker(cfg: SweepConfig, worker: int = 0, train_fn: TrainFn = train, log: Log = _say) -> int:
    """Run trials until the study holds ``cfg.trials`` finished ones; return how many this worker
    finished. One line per finished trial goes to ``log``."""
    study = open_study(cfg, worker=worker)
    done = 0
    while True:
        trial = _claim(study, cfg, log)
        if trial == DONE:
            return done
        if trial == WAIT:
            time.sleep(WAIT_POLL)
            continue
        run_dir = Path(trial.user_attrs["run_dir"])
        shutil.rmtree(run_dir, ignore_errors=True)  # a leftover of a deleted study of the same name
        start = time.perf_counter()
        try:
            with _Heartbeat(trial, cfg.stale_after / 4):
                if cfg.pruner == "promote":
                    _start_from_source(trial, run_dir, log)
                value = run_trial(trial, cfg, run_dir, train_fn)
            frozen = study.tell(trial, value)
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        except UpdateFinishedTrialError:
            log(f"trial {trial.number} was marked FAIL by a worker that took it for dead (no heartbeat for "
                f"{cfg.stale_after:g} s): its result is dropped")
            continue
        except BaseException:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        done += 1
        log(f"[{_progress(study, cfg)}] {_describe(frozen, cfg.base.epochs)} ({time.perf_counter() - start:.0f} s)")


def _progress(study: optuna.Study, cfg: SweepConfig) -> str:
    """How much of the budget is done: finished trials, or configurations whose first job finished."""
    trials = study.get_trials(deepcopy=False)
    if cfg.pruner == "promote":
        started = len(_read_jobs(trials, cfg.base.epochs).started)
        return f"{started}/{cfg.trials} configurations"
    return f"{sum(t.state in FINISHED for t in trials)}/{cfg.trials}"


def _describe(trial: FrozenTrial, epochs: int) -> str:
    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    who = f"trial {trial.number}"
    if "config" in trial.user_attrs:
        who += f" (configuration {_config_of(trial)}, from epoch {_resumes_from(trial)})"
    return (f"{who} {trial.state.name.lower()} after {len(trial.intermediate_values)}/{epochs} epochs: "
            f"val acc {100 * trial.value:.2f}%  {params}")


def _fmt(value: float) -> str:
    return f"{value:.3f}" if 1e-3 <= abs(value) < 1e3 or value == 0 else f"{value:.2e}"


def _worker_main(cfg: SweepConfig, worker: int, train_fn: TrainFn) -> None:
    """Entry point of a spawned worker: share the machine's cores with the other workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // cfg.workers))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_worker(cfg, worker, train_fn, lambda line: print(f"worker {worker}: {line}", flush=True))


# ---------------------------------------------------------------------------------- the sweep

def run_sweep(cfg: SweepConfig, train_fn: TrainFn = train, log: Log = _say) -> dict[str, Any]:
    """Run (or continue) the sweep, then write ``sweep.json`` and ``sweep.png``; returns the summary.

    With ``cfg.workers > 1`` the workers are fresh processes (spawned, so ``train_fn`` must be a
    module-level function); a worker that dies leaves the rest running, and running the sweep
    again finishes what it left.
    """
    cfg.validate()
    study = open_study(cfg, worker=cfg.workers)
    before = len(study.get_trials(deepcopy=False, states=FINISHED))
    counted = "started" if cfg.pruner == "promote" else "trials finished"
    log(f"study {cfg.study_name!r}: {_progress(study, cfg)} {counted}"
        + (", continuing" if before else "") + f"; searching {', '.join(search_space(cfg))}")
    if cfg.workers == 1:
        run_worker(cfg, 0, train_fn, log)
    else:
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=_worker_main, args=(cfg, i, train_fn)) for i in range(cfg.workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        for i, proc in enumerate(procs):
            if proc.exitcode != 0:
                log(f"worker {i} exited with code {proc.exitcode}")
        _fail_dead_trials(study, cfg, log)
    summary = summarise(study, cfg, train_fn, log)
    (cfg.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plot_sweep(summary, cfg.out_dir / PLOT_FILE)
    return summary


def _trial_row(trial: FrozenTrial, promote: bool) -> dict[str, Any]:
    """A trial's line of sweep.json; with ``--pruner promote`` also its job: the configuration, the
    epoch it resumed from and the epochs it trained (its curve includes the copied epochs)."""
    values = list(trial.intermediate_values.values())
    note = "surplus: created past the budget, never trained" if trial.user_attrs.get("surplus") else None
    if trial.user_attrs.get("duplicate"):
        note = "duplicate: the same promotion was made first by another worker; never trained"
    job = {"config": _config_of(trial), "resumes_from": _resumes_from(trial),
           "epochs_trained": _epochs_trained(trial)} if promote else {}
    return {
        "trial": trial.number,
        **job,
        "state": trial.state.name,
        "params": trial.params,
        "val_acc": trial.value,
        "best_val_acc": max(values) if values else None,
        "epochs": len(values),
        "val_acc_per_epoch": values,
        "retry_of": trial.user_attrs.get("retry_of"),
        "note": note,
        "run_dir": trial.user_attrs.get("run_dir"),
    }


def summarise(study: optuna.Study, cfg: SweepConfig, train_fn: TrainFn = train, log: Log = _say) -> dict[str, Any]:
    """Every trial, the best on validation and, once the study is complete, that trial's test accuracy.

    ``val_acc`` is a trial's value (its last epoch's validation accuracy); ``best_val_acc`` the best
    epoch's. The epoch count compares the epochs trained with a full grid: the same number of
    settings, each trained for every epoch. With ``--pruner promote`` a row is one job, the
    settings are the configurations whose first job finished (``cfg.trials`` once complete), and
    a promotion's copied epochs are not counted as spent.
    """
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    promote = cfg.pruner == "promote"
    spent = sum(_epochs_trained(t) for t in trials)
    settings = len(_read_jobs(trials, cfg.base.epochs).started) if promote else len(finished)
    full_grid = settings * cfg.base.epochs
    summary: dict[str, Any] = {
        "study": cfg.study_name,
        "storage": cfg.storage or str(cfg.out_dir / STORAGE_FILE),
        "model": cfg.base.model,
        "dataset": cfg.base.dataset,
        "search_space": search_space(cfg),
        "pruner": cfg.pruner,
        "trials_requested": cfg.trials,
        "trials_finished": len(finished),
        "complete": _next_job(trials, cfg) == DONE if promote else len(finished) >= cfg.trials,
        "epochs": {"spent": spent, "per_full_run": cfg.base.epochs, "full_grid": full_grid,
                   "fraction_of_full_grid": spent / full_grid if full_grid else None},
        "config": cfg.base.to_dict(),
        "trials": [_trial_row(t, promote) for t in trials],
        "best": None,
    }
    if promote:
        summary["configurations"] = {"requested": cfg.trials, "started": settings}
    if complete:
        best = max(complete, key=lambda t: (t.value, -t.number))
        summary["best"] = {"trial": best.number, **({"config": _config_of(best)} if promote else {}),
                           "params": best.params, "val_acc": best.value,
                           "epochs": len(best.intermediate_values), "run_dir": best.user_attrs.get("run_dir"),
                           "test_acc": None}
        if summary["complete"]:
            summary["best"]["test_acc"] = _winner_test_accuracy(cfg, best, train_fn, log)
    return summary


def _winner_test_accuracy(cfg: SweepConfig, best: FrozenTrial, train_fn: TrainFn, log: Log) -> float:
    """The winner's test accuracy at its last epoch, read from its finished run (resuming a run that
    holds every epoch trains nothing). A winner trained on another machine is trained again here."""
    run_dir = Path(best.user_attrs.get("run_dir") or cfg.out_dir / TRIALS_DIR / f"{cfg.study_name}-{best.number:04d}")
    if not (run_dir / CHECKPOINT).exists():
        host = best.user_attrs.get("owner", {}).get("host")
        log(f"trial {best.number}'s run is not in {run_dir} (trained on {host}?): "
            f"training it again there for its test accuracy")
    result = train_fn(trial_config(cfg.base, best.params), run_dir, resume=True, quiet=True)
    return result.history[-1]["test_acc"]


# ------------------------------------------------------------------------------------- output

def format_table(summary: dict[str, Any]) -> str:
    """One line per trial: number, searched values, validation accuracy, epochs, state; * = best.
    With ``--pruner promote`` a line is one job: its configuration comes after the trial number,
    and ``epochs`` shows the epochs it trained (e.g. ``4-9`` for a promotion from rung 3)."""
    names = list(summary["search_space"])
    best = summary["best"]["trial"] if summary["best"] else None
    promote = summary["pruner"] == "promote"
    header = (f"{'trial':>6}  " + (f"{'config':>7}" if promote else "") + "".join(f"{n:>13}" for n in names)
              + f"{'val acc':>9}{'best val':>10}{'epochs':>8}  state")
    lines = [header, "-" * len(header)]
    for row in summary["trials"]:
        if row["note"]:
            continue
        config = f"{row['config']:>7}" if promote else ""
        params = "".join(f"{_fmt(row['params'][n]) if n in row['params'] else '-':>13}" for n in names)
        val = f"{100 * row['val_acc']:.2f}%" if row["val_acc"] is not None else "-"
        best_val = f"{100 * row['best_val_acc']:.2f}%" if row["best_val_acc"] is not None else "-"
        epochs = _job_epochs(row) if promote else row["epochs"]
        mark = "*" if row["trial"] == best else " "
        lines.append(f"{row['trial']:>5}{mark}  {config}{params}{val:>9}{best_val:>10}{epochs:>8}  "
                     f"{row['state'].lower()}")
    return "\n".join(lines)


def _job_epochs(row: dict[str, Any]) -> str:
    """The epochs a job trained, as ``first-last`` (one number for one epoch, ``-`` for none)."""
    last, trained = row["epochs"], row["epochs_trained"]
    if not trained:
        return "-"
    return str(last) if trained == 1 else f"{last - trained + 1}-{last}"


def _plotted_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows with a value; with ``--pruner promote`` only each configuration's furthest job, so
    that a point is a configuration at the last rung it reached."""
    rows = [r for r in summary["trials"] if r["val_acc"] is not None]
    if summary["pruner"] != "promote":
        return rows
    furthest: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["config"] not in furthest or row["epochs"] > furthest[row["config"]]["epochs"]:
            furthest[row["config"]] = row
    return list(furthest.values())


def plot_sweep(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    """Validation accuracy (each trial's value) against each searched value, one panel each;
    pruned trials hollow (their value is from the epoch they stopped at), the best starred.
    With ``--pruner promote`` a point is a configuration (see :func:`_plotted_rows`)."""
    space = summary["search_space"]
    fig, axes = plt.subplots(1, len(space), figsize=(4.2 * len(space), 3.6), squeeze=False)
    rows = _plotted_rows(summary)
    best = summary["best"]
    for ax, (name, (kind, low, high, _step)) in zip(axes[0], space.items(), strict=True):
        for state, style in (("COMPLETE", {"color": "C0"}), ("PRUNED", {"facecolors": "none", "edgecolors": "C1"})):
            points = [(r["params"][name], 100 * r["val_acc"]) for r in rows if r["state"] == state]
            if points:
                ax.scatter([x for x, _ in points], [y for _, y in points], label=state.lower(), **style)
        if best is not None:
            ax.scatter([best["params"][name]], [100 * best["val_acc"]], marker="*", s=220, color="C3",
                       label=f"best (trial {best['trial']})", zorder=3)
        ax.set_xscale("log" if kind == "log" else "linear")
        ax.set(xlabel=name, ylabel="validation accuracy (%)", xlim=(low, high))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"dropkit sweep: {summary['model']} on {summary['dataset']}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
