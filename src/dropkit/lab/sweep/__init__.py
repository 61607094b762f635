"""Choosing dropout rates by search: ``dropkit sweep`` on Optuna.

The classic advice ("try several keep probabilities, keep the best") costs one full training run
per value. A sweep searches every dropout rate of a model at once (each ``p*`` argument of its
builder in :mod:`dropkit.lab.models`, e.g. ``p_input`` and ``p_hidden``; optionally the learning rate
and weight decay, log-uniform) with Optuna's TPE sampler (Akiba et al., "Optuna: A
Next-generation Hyperparameter Optimization Framework", KDD 2019), and stops bad settings early.

How a trial runs
    A trial is one :func:`dropkit.lab.train.train` run in its own folder. At the end of every
    epoch the training loop's epoch hook (:class:`~dropkit.lab.sweep.trial.EpochReport`) reports
    the validation accuracy to the trial, and the pruner may stop it after that epoch:
    successive halving (Jamieson & Talwalkar, AISTATS 2016) in the asynchronous form Optuna
    implements (Li et al., "Massively Parallel Hyperparameter Tuning", arXiv:1810.05934, 2018),
    or the median rule. The trial's value is the validation accuracy of
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
    on test data. Every worker that sees the study complete writes the summary: it reads the
    winner's figure from the finished run's checkpoint without the run folder's lock, so workers
    that end together never clash over it; a winner trained on another machine (its run is not
    here) is trained again, by one worker of this machine at a time (under the machine lock),
    and the next one reads that run.

Storage, resumption and workers
    By default the study lives in an Optuna journal file (``JournalFileBackend``) in the sweep
    folder: an append-only log that several local processes may write at once, which SQLite is
    not good at (optuna#4002). Running the same command again continues the study of that name.
    ``--storage URL`` takes any Optuna storage URL (e.g. ``postgresql://...``) so that workers on
    several machines share one study; :mod:`dropkit.lab.storage` opens it, retrying while other
    workers create its schema and while the server is unreachable (for at most
    ``--storage-timeout`` seconds, then the worker fails with an error naming the storage).

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

    A trial whose worker died stays RUNNING in the storage. Workers mark it failed and Optuna's
    retry callback (``RetryHeartbeatStaleTrialCallback``) queues it again with the same
    parameters and user attributes, at most :data:`~dropkit.lab.sweep.study.MAX_RETRIES` times.
    A dead trial is found on the same machine as soon as its process is gone (pid and start
    time recorded in the trial); on another machine, with a database storage, by Optuna's own
    heartbeat (``heartbeat_interval`` of ``stale_after / 4`` seconds, ``grace_period`` of
    ``stale_after``), and with a journal file, which has no heartbeat in Optuna, by a heartbeat
    attribute the worker writes into the trial at the same interval. A killed worker therefore
    loses at most the trial it was running. A dead promotion is queued again as the same
    promotion, a dead first job as the same configuration.

Modules
    :mod:`~dropkit.lab.sweep.config` (what is searched), :mod:`~dropkit.lab.sweep.study` (the
    Optuna study, storage and retries), :mod:`~dropkit.lab.sweep.trial` (one trial's run),
    :mod:`~dropkit.lab.sweep.promote` (promotion-based halving), :mod:`~dropkit.lab.sweep.worker`
    (claiming trials, recovering dead ones, the sweep), :mod:`~dropkit.lab.sweep.summary`
    (sweep.json, the table, the plot).
"""

from dropkit.lab.sweep.config import (
    PRUNERS,
    SweepConfig,
    rate_arguments,
    search_space,
    trial_config,
)
from dropkit.lab.sweep.promote import next_promotion, rungs
from dropkit.lab.sweep.study import STORAGE_FILE, open_study
from dropkit.lab.sweep.summary import (
    PLOT_FILE,
    SUMMARY_FILE,
    format_table,
    plot_sweep,
    summarise,
)
from dropkit.lab.sweep.trial import (
    DataParallelTrain,
    EpochReport,
    RunHistory,
    run_trial,
)
from dropkit.lab.sweep.worker import run_sweep, run_worker

__all__ = [
    "PLOT_FILE",
    "PRUNERS",
    "STORAGE_FILE",
    "SUMMARY_FILE",
    "DataParallelTrain",
    "EpochReport",
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
