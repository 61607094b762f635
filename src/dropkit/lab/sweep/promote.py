"""Promotion-based halving (``--pruner promote``): rungs, which configuration earns the next
rung, and how a promotion continues the run it promotes (see :mod:`dropkit.lab.sweep`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, Trial, TrialState

from dropkit.lab.sweep.config import SweepConfig
from dropkit.lab.sweep.study import MAX_RETRIES, retry_history
from dropkit.lab.train import CHECKPOINT

__all__ = [
    "DONE",
    "FINISHED",
    "LIVE",
    "NEW",
    "PROMOTE_FACTOR",
    "WAIT",
    "Jobs",
    "config_of",
    "epochs_trained",
    "next_job",
    "next_promotion",
    "next_rung",
    "promotion_attrs",
    "read_jobs",
    "resumes_from",
    "rungs",
    "start_from_source",
]

#: trial states that hold a slot of the budget
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: what a worker is told when it asks for a trial and gets none
WAIT, DONE = "wait", "done"
#: rungs are this factor apart, and the best 1 / PROMOTE_FACTOR of a rung go on
PROMOTE_FACTOR = 3
#: the next job is a new configuration
NEW = "new"


def rungs(epochs: int) -> list[int]:
    """The rungs of ``--pruner promote`` for runs of ``epochs`` epochs: every power of
    :data:`PROMOTE_FACTOR` below ``epochs``, then ``epochs`` (9 -> 1, 3, 9; 10 -> 1, 3, 9, 10)."""
    found, rung = [], 1
    while rung < epochs:
        found.append(rung)
        rung *= PROMOTE_FACTOR
    return [*found, epochs]


def next_rung(epoch: int, epochs: int) -> int:
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


def config_of(trial: FrozenTrial | Trial) -> int:
    """The configuration a job trains; a trial without the attribute (a new one) starts its own."""
    return trial.user_attrs.get("config", trial.number)


def resumes_from(trial: FrozenTrial | Trial) -> int:
    """The epoch a job starts at: 0 for a configuration's first job, a rung for a promotion."""
    return trial.user_attrs.get("resumes_from", 0)


def epochs_trained(trial: FrozenTrial) -> int:
    """Epochs a trial trained itself: those it reported minus those a promotion copied."""
    return max(0, len(trial.intermediate_values) - trial.user_attrs.get("trained_from", 0))


@dataclass
class Jobs:
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


def read_jobs(trials: Sequence[FrozenTrial], epochs: int) -> Jobs:
    """Sort a study's trials into :class:`Jobs` (failed ones count only as given-up promotions)."""
    jobs = Jobs({}, {}, set(), set(), set())
    for trial in trials:
        config, start = config_of(trial), resumes_from(trial)
        if start and (trial.state != TrialState.FAIL or _given_up(trial)):
            jobs.promoted.add((config, start))
        if not start and trial.state in LIVE:
            jobs.configs.add(config)
        if trial.state not in FINISHED:
            continue
        stop = next_rung(start, epochs)
        if not start:
            jobs.started.add(config)
        jobs.sources.setdefault((config, stop), trial)
        if stop < epochs:
            jobs.values.setdefault(stop, {}).setdefault(config, trial.value)
    return jobs


def _given_up(trial: FrozenTrial) -> bool:
    """A failed job that is not queued again: its worker died on its last retry (see
    :data:`dropkit.lab.sweep.study.RETRY`), not a duplicate that never trained."""
    return len(retry_history(trial)) >= MAX_RETRIES and not trial.user_attrs.get("duplicate")


def next_job(trials: Sequence[FrozenTrial], cfg: SweepConfig) -> FrozenTrial | str:
    """The job to run next by the rule of the module docstring: the finished job whose configuration
    to promote, :data:`NEW`, :data:`WAIT` or :data:`DONE`. Queued trials are not looked at (a
    worker takes those first)."""
    jobs = read_jobs(trials, cfg.base.epochs)
    pick = next_promotion(jobs.values, jobs.promoted)
    if pick is None and len(jobs.configs) < cfg.trials:
        return NEW
    running = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    if pick is None and not running and not any(t.state == TrialState.COMPLETE for t in trials):
        pick = _best_stopped(jobs.values, jobs.promoted)
    if pick is not None:
        return jobs.sources[pick]
    return WAIT if running else DONE


def promotion_attrs(source: FrozenTrial, epochs: int) -> dict[str, Any]:
    """The user attributes of the promotion that continues job ``source``."""
    return {"config": config_of(source), "resumes_from": next_rung(resumes_from(source), epochs),
            "source": source.number, "source_dir": source.user_attrs.get("run_dir")}


def start_from_source(trial: Trial, run_dir: Path, log: Callable[[str], None]) -> None:
    """Copy the run a promotion continues into its own fresh folder, and record in ``trained_from``
    the epoch its training starts at. A run trained on another machine is not here: the promotion
    then trains its configuration from the first epoch (same figures, more epochs)."""
    source, start = trial.user_attrs.get("source_dir"), 0
    if source is not None and (Path(source) / CHECKPOINT).exists():
        shutil.copytree(source, run_dir)
        start = trial.user_attrs["resumes_from"]
    elif source is not None:
        log(f"trial {trial.number}: the run it continues is not in {source} (trained on another machine?): "
            f"training configuration {config_of(trial)} from the first epoch")
    trial.set_user_attr("trained_from", start)
