"""Workers of a sweep: claiming trials within the budget, training them, recovering the trials
of dead workers, and the sweep as a whole (see :mod:`dropkit.lab.sweep` for the rules)."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
import socket
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, Trial, TrialState

from dropkit.lab.storage import StorageUnreachable
from dropkit.lab.sweep.config import SweepConfig, search_space
from dropkit.lab.sweep.promote import (
    DONE,
    FINISHED,
    LIVE,
    WAIT,
    config_of,
    next_job,
    promotion_attrs,
    read_jobs,
    resumes_from,
    start_from_source,
)
from dropkit.lab.sweep.study import (
    MAX_RETRIES,
    RETRY,
    heartbeat_storage,
    open_study,
    retry_history,
)
from dropkit.lab.sweep.summary import (
    PLOT_FILE,
    SUMMARY_FILE,
    TRIALS_DIR,
    Log,
    fmt,
    plot_sweep,
    say,
    summarise,
)
from dropkit.lab.sweep.trial import TrainFn, run_trial
from dropkit.lab.train import train

__all__ = ["LOCK_FILE", "WAIT_POLL", "run_sweep", "run_worker"]

LOCK_FILE = "sweep.lock"
#: seconds between looks at the study while every remaining slot is held by a running trial
WAIT_POLL = 1.0


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


def _is_dead(trial: FrozenTrial, stale_after: float, optuna_heartbeat: bool = False) -> bool:
    """A RUNNING trial whose worker is gone: its process, when it ran on this machine; else a
    heartbeat (or, before the first one, a start) older than ``stale_after`` seconds. With
    ``optuna_heartbeat`` (a database storage) the trials of other machines are Optuna's to judge,
    except one without an owner: no worker took it (its worker died between creating and taking
    it, or a create retried after a lost reply made it twice), so it has no heartbeat either."""
    owner = trial.user_attrs.get("owner")
    if owner is not None and owner["host"] == socket.gethostname():
        return _process_start(owner["pid"]) != owner["started"]
    if optuna_heartbeat and owner is not None:
        return False
    last = trial.user_attrs.get("heartbeat") or trial.datetime_start.timestamp()
    return time.time() - last > stale_after


def _fail_dead_trials(study: optuna.Study, cfg: SweepConfig, log: Log) -> None:
    """Mark the trials of dead workers failed and queue them again with Optuna's retry callback
    (:data:`~dropkit.lab.sweep.study.RETRY`: same parameters, or those it was queued with if it
    died before suggesting them, and same user attributes, so that a job of ``--pruner promote``
    comes back as the same promotion or configuration). A database storage's own heartbeat fails
    the trials of other machines (``optuna.storages.fail_stale_trials``); the process check here
    catches those of this machine at once, and with a journal file the heartbeat attribute those
    of other machines. When two workers race for one trial, the storage lets only the first mark
    it, and only that one queues it again."""
    if heartbeat_storage(cfg) is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_dead(trial, cfg.stale_after, heartbeat_storage(cfg) is not None):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        retries = len(retry_history(trial))
        RETRY(study, trial)
        log(f"trial {trial.number}: its worker is gone; marked FAIL"
            + (", parameters queued again" if retries < MAX_RETRIES
               else f", not retried (already retried {retries} times)"))


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
        trial = _ask(study)
        ahead = sum(1 for t in study.get_trials(deepcopy=False, states=LIVE) if t.number < trial.number)
        if ahead >= cfg.trials:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            return WAIT
        return _take(trial, cfg)


def _ask(study: optuna.Study) -> Trial:
    """``study.ask()``; the heartbeat a database storage keeps is recorded by :class:`_Heartbeat`
    for trials run this way too, so Optuna's note that it expects ``optimize`` does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask()


def _take(trial: Trial, cfg: SweepConfig) -> Trial:
    """Record in a claimed trial who runs it (for dead-worker recovery) and where."""
    run_dir = cfg.out_dir / TRIALS_DIR / f"{cfg.study_name}-{trial.number:04d}"
    trial.set_user_attr("owner", _owner())
    trial.set_user_attr("run_dir", str(run_dir.resolve()))
    trial.set_user_attr("heartbeat", time.time())
    return trial


def _claim_job(study: optuna.Study, cfg: SweepConfig) -> Trial | str:
    """``_claim`` for ``--pruner promote`` (called under the machine lock): a queued trial (a retry,
    or a promotion queued by another machine) if there is one, else the job :func:`next_job`
    picks (a promotion is queued, then taken), ``WAIT`` or ``DONE``. A trial that turns out to be
    one too many (see :func:`_is_extra_job`) is failed untrained, and the worker waits."""
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.WAITING for t in trials):
        job = next_job(trials, cfg)
        if job in (WAIT, DONE):
            return job
        if isinstance(job, FrozenTrial):
            study.enqueue_trial(job.params, user_attrs=promotion_attrs(job, cfg.base.epochs))
    trial = _ask(study)
    if _is_extra_job(study, trial, cfg.trials):
        return WAIT
    trial.set_user_attr("config", config_of(trial))
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
                    and (config_of(t), resumes_from(t)) == key for t in trials)
    elif "config" not in attrs:
        mark = "surplus"
        extra = len({config_of(t) for t in trials if t.state in LIVE and not resumes_from(t)
                     and config_of(t) < trial.number}) >= budget
    else:
        return False  # a configuration's first job queued again: only one worker queues it
    if extra:
        trial.set_user_attr(mark, True)
        study.tell(trial, state=TrialState.FAIL)
    return extra


class _Heartbeat:
    """Records every ``interval`` seconds, while a trial trains, that its worker is alive: through
    Optuna's heartbeat on a database storage, else as the trial's ``heartbeat`` attribute, so that
    workers on other machines can tell a live trial from one whose worker died."""

    def __init__(self, trial: Trial, cfg: SweepConfig) -> None:
        self.trial, self.interval = trial, cfg.stale_after / 4
        self.storage = heartbeat_storage(cfg)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                if self.storage is not None:
                    self.storage.record_heartbeat(self.trial._trial_id)
                else:
                    self.trial.set_user_attr("heartbeat", time.time())
            except UpdateFinishedTrialError:  # another worker took it for dead (see run_worker)
                return
            except StorageUnreachable:  # the training thread's next call to the storage fails the same way
                return

    def __enter__(self) -> _Heartbeat:
        if self.storage is not None:
            self.storage.record_heartbeat(self.trial._trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def run_worker(cfg: SweepConfig, worker: int = 0, train_fn: TrainFn = train, log: Log = say) -> int:
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
            with _Heartbeat(trial, cfg):
                if cfg.pruner == "promote":
                    start_from_source(trial, run_dir, log)
                value = run_trial(trial, cfg, run_dir, train_fn)
            frozen = study.tell(trial, value)
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        except UpdateFinishedTrialError:
            log(f"trial {trial.number} was marked FAIL by a worker that took it for dead (no heartbeat for "
                f"{cfg.stale_after:g} s): its result is dropped")
            continue
        except StorageUnreachable:
            raise  # the trial cannot be marked failed; another worker retries it once it looks dead
        except BaseException:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        done += 1
        log(f"[{_progress(study, cfg)}] {_describe(frozen, cfg.base.epochs)} ({time.perf_counter() - start:.0f} s)")


def _progress(study: optuna.Study, cfg: SweepConfig) -> str:
    """How much of the budget is done: finished trials, or configurations whose first job finished."""
    trials = study.get_trials(deepcopy=False)
    if cfg.pruner == "promote":
        started = len(read_jobs(trials, cfg.base.epochs).started)
        return f"{started}/{cfg.trials} configurations"
    return f"{sum(t.state in FINISHED for t in trials)}/{cfg.trials}"


def _describe(trial: FrozenTrial, epochs: int) -> str:
    params = " ".join(f"{k}={fmt(v)}" for k, v in trial.params.items())
    who = f"trial {trial.number}"
    if "config" in trial.user_attrs:
        who += f" (configuration {config_of(trial)}, from epoch {resumes_from(trial)})"
    return (f"{who} {trial.state.name.lower()} after {len(trial.intermediate_values)}/{epochs} epochs: "
            f"val acc {100 * trial.value:.2f}%  {params}")


def _worker_main(cfg: SweepConfig, worker: int, train_fn: TrainFn) -> None:
    """Entry point of a spawned worker: share the machine's cores with the other workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // cfg.workers))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        run_worker(cfg, worker, train_fn, lambda line: print(f"worker {worker}: {line}", flush=True))
    except StorageUnreachable as err:
        print(f"worker {worker}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_sweep(cfg: SweepConfig, train_fn: TrainFn = train, log: Log = say) -> dict[str, Any]:
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
    # the workers of this machine summarise one at a time: a winner trained on another machine
    # is trained here once, and the next worker reads that finished run
    with _machine_lock(cfg.out_dir):
        summary = summarise(study, cfg, train_fn, log)
        (cfg.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        plot_sweep(summary, cfg.out_dir / PLOT_FILE)
    return summary
