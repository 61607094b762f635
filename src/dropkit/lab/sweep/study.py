"""The Optuna study behind a sweep: its storage, pruner and sampler, the settings it keeps, and
retries of trials whose worker died."""

from __future__ import annotations

import functools
import json
import os
import socket
import warnings
import zlib
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial

from dropkit import rng
from dropkit.lab.storage import PatientStorage, open_database
from dropkit.lab.sweep.config import SweepConfig, search_space

__all__ = [
    "MAX_RETRIES",
    "RETRY",
    "STORAGE_FILE",
    "heartbeat_storage",
    "make_storage",
    "open_study",
    "reopen_trial",
    "retry_history",
    "settings_record",
]

STORAGE_FILE = "study.journal"
#: sub-stream of the run seed (dropkit.rng.derive_seed) that seeds each worker's sampler
SAMPLER_STREAM = 11
#: how many times a trial whose worker died is queued again
MAX_RETRIES = 2

with warnings.catch_warnings():
    warnings.simplefilter("ignore", ExperimentalWarning)
    #: queues a dead trial again (same parameters, user attributes and queued values) until it has
    #: been retried MAX_RETRIES times; Optuna records the line of retries in ``retry_history``
    RETRY = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def retry_history(trial: FrozenTrial) -> list[int]:
    """The numbers of the failed trials that ``trial`` retries, the first one first ([] for none)."""
    return list(trial.system_attrs.get("retry_history", []))


def settings_record(cfg: SweepConfig) -> dict[str, Any]:
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


def make_storage(cfg: SweepConfig) -> optuna.storages.BaseStorage:
    """The study's storage: a journal file in the sweep folder, or the database at ``cfg.storage``
    with Optuna's heartbeat (see :func:`heartbeat_storage`)."""
    if cfg.storage is None:
        return JournalStorage(JournalFileBackend(str(cfg.out_dir / STORAGE_FILE)))
    return _database(cfg.storage, cfg.stale_after, cfg.storage_timeout)


def heartbeat_storage(cfg: SweepConfig) -> PatientStorage | None:
    """The storage whose heartbeat Optuna keeps, or None for a journal file, which has none.

    A database study records a heartbeat for every running trial every ``stale_after / 4``
    seconds; a trial without one for ``stale_after`` seconds is failed by
    :func:`optuna.storages.fail_stale_trials` and queued again by :data:`RETRY`."""
    return None if cfg.storage is None else _database(cfg.storage, cfg.stale_after, cfg.storage_timeout)


@functools.lru_cache(maxsize=None)
def _database(url: str, stale_after: float, timeout: float) -> PatientStorage:
    """One storage object per database and process, so that heartbeats go through the one the
    study uses; it waits up to ``timeout`` seconds for a server it cannot reach
    (:mod:`dropkit.lab.storage`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return open_database(url, timeout, heartbeat_interval=max(1, round(stale_after / 4)),
                             grace_period=max(1, round(stale_after)), heartbeat_stale_trial_callback=RETRY)


def open_study(cfg: SweepConfig, *, worker: int = 0) -> optuna.Study:
    """Create the study or continue the one of that name, refusing to continue it with other settings.

    Each opening gets its own TPE sampler seed, derived from the run seed, ``worker`` and the number
    of trials already in the study, so that workers and resumed runs do not replay each other's
    random draws; with a database storage also from the host name and process id, since commands
    on several machines open the study with the same worker numbers, often when it holds the same
    number of trials. TPE's random start-up is a third of the budget, at most Optuna's default of 10.
    """
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    storage = make_storage(cfg)
    study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction="maximize",
                                load_if_exists=True)
    record = settings_record(cfg)
    saved = study.user_attrs.get("dropkit")
    if saved is None:
        study.set_user_attr("dropkit", record)
    else:
        _check_same_settings(cfg, saved, record)
    opener = () if cfg.storage is None else (zlib.crc32(f"{socket.gethostname()} {os.getpid()}".encode()),)
    seed = rng.derive_seed(cfg.base.seed, SAMPLER_STREAM, worker, len(study.get_trials(deepcopy=False)), *opener)
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


def reopen_trial(cfg: SweepConfig, trial_id: int) -> Trial:
    """A running trial of the study, opened again in another process (a data-parallel rank) so
    that it can report to it and ask the study's pruner."""
    study = optuna.load_study(study_name=cfg.study_name, storage=make_storage(cfg), pruner=_pruner(cfg))
    return Trial(study, trial_id)
