"""dropkit sweep: exact trial budgets across workers, recovery from a killed worker, resumption,
pruning, promotion-based halving (its rule, its epoch budget, its jobs across workers and kills),
test accuracy read for the winner only (and read while another worker holds its run folder),
and argument errors that name the flag.

Most tests use a fake training function (validation accuracy a known function of p and the
epoch) so that they check the study's bookkeeping in milliseconds; a few run real training on a
tiny slice of MNIST (through the command line with two worker processes, as data-parallel jobs,
and for the winner's test accuracy). The tests that start processes of their own are marked slow.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from dropkit.lab import distributed, run_lock
from dropkit.lab.cli import build_parser, main
from dropkit.lab.commands.sweep import sweep_config
from dropkit.lab.sweep import (
    STORAGE_FILE,
    SweepConfig,
    next_promotion,
    open_study,
    rate_arguments,
    rungs,
    run_sweep,
    search_space,
    summarise,
    trial_config,
)
from dropkit.lab.sweep.promote import WAIT
from dropkit.lab.sweep.study import heartbeat_storage, retry_history
from dropkit.lab.sweep.worker import LOCK_FILE, _claim, _fail_dead_trials, _is_dead
from dropkit.lab.train import CHECKPOINT, TrainConfig, train

#: run folders whose test accuracy was read, in order (the fake's rows record it)
TEST_READS: list[str] = []
#: set in a child process: the fake then hangs after touching this file, where HANG_AT_ENV says
HANG_ENV = "DROPKIT_SWEEP_TEST_HANG"
#: "RUN_SUFFIX EPOCH": the fake hangs before training that epoch (1-based) in the run folder whose
#: name ends so (default: trial 1's second epoch)
HANG_AT_ENV = "DROPKIT_SWEEP_TEST_HANG_AT"
#: the fake's log, in the folder above the run folders: one line "RUN DONE EPOCHS" per call
CALLS = "fake_calls.txt"
#: seconds each fake call sleeps (so that two worker processes overlap), 0 when unset
SLOW_ENV = "DROPKIT_SWEEP_TEST_SLOW"


class _Row(dict):
    """A metrics row that records every read of its test accuracy."""

    run: str = ""

    def __getitem__(self, key: str):
        if key == "test_acc":
            TEST_READS.append(self.run)
        return super().__getitem__(key)


@dataclass
class _Result:
    history: list[_Row]


def fake_train(config: TrainConfig, out_dir, *, resume: bool = False, quiet: bool = False, callbacks=()) -> _Result:
    """Validation accuracy 0.9 - (p - 0.3)^2 + 0.01 * epoch: best at p = 0.3, better every epoch.

    Like train, it resumes from its checkpoint (which holds p and the epochs done) and refuses one
    made with another p, calls the callbacks' ``on_epoch_end`` with each epoch it trains, writes
    its checkpoint after each, and stops early when a callback requests it; each call appends
    the epochs it starts from and is given to :data:`CALLS`.
    """
    out = Path(out_dir)
    hang = os.environ.get(HANG_ENV)
    run, hang_epoch = os.environ.get(HANG_AT_ENV, "-0001 2").split()
    time.sleep(float(os.environ.get(SLOW_ENV, 0)))
    done = 0
    if resume and (out / CHECKPOINT).exists():
        saved = json.loads((out / CHECKPOINT).read_text())
        if saved["p"] != config.p or saved["epochs"] > config.epochs:
            raise ValueError(f"cannot resume {out}: checkpoint {saved}, config p={config.p} epochs={config.epochs}")
        done = saved["epochs"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / CALLS, "a") as log:
        log.write(f"{out.name} {done} {config.epochs}\n")

    def row_of(epoch: int) -> _Row:
        val = 0.9 - (config.p - 0.3) ** 2 + 0.01 * epoch
        row = _Row(epoch=epoch, val_acc=val, test_acc=val - 0.002)
        row.run = str(out)
        return row

    rows = [row_of(epoch) for epoch in range(1, done + 1)]
    for epoch in range(done + 1, config.epochs + 1):
        if hang and out.name.endswith(run) and epoch == int(hang_epoch):
            Path(hang).write_text(f"in {out.name}, training epoch {epoch}")
            time.sleep(120)
        rows.append(row_of(epoch))
        for callback in callbacks:
            callback.on_epoch_end(None, epoch - 1, rows[-1])
        (out / CHECKPOINT).write_text(json.dumps({"p": config.p, "epochs": epoch}))
        if any(callback.stop_requested for callback in callbacks):
            break
    return _Result(rows)


def fake_cfg(out, *, trials: int = 4, epochs: int = 3, pruner: str = "none", p_step: float | None = None,
             **kwargs) -> SweepConfig:
    """A sweep of tutorial_mlp's single rate p over the fake training function (continuous unless
    ``p_step`` is given, so that enqueued rates off the default lattice stay as they are)."""
    base = TrainConfig(model="tutorial_mlp", epochs=epochs, val_size=100)
    return SweepConfig(base=base, out_dir=Path(out), trials=trials, pruner=pruner, p_step=p_step, **kwargs)


def _load(out: Path, name: str = "sweep") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(out / STORAGE_FILE))))


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_rates_are_every_free_p_argument_and_the_main_one_goes_to_p():
    assert rate_arguments(TrainConfig(model="srivastava_mlp")) == ["p_input", "p_hidden"]
    assert rate_arguments(TrainConfig(model="srivastava_mlp", model_kwargs={"p_input": 0.2})) == ["p_hidden"]
    assert rate_arguments(TrainConfig(model="lstm", p=0.3)) == ["p_input", "p_weight"]
    config = trial_config(TrainConfig(model="srivastava_mlp", model_kwargs={"width": 64}),
                          {"p_input": 0.1, "p_hidden": 0.4, "lr": 0.01}, epochs=2)
    assert (config.p, config.model_kwargs, config.lr, config.epochs) == (0.4, {"width": 64, "p_input": 0.1}, 0.01, 2)
    assert trial_config(TrainConfig(model="srivastava_mlp"), {"p_hidden": 0.0 + 3 * 0.05}).p == 0.15


def test_rates_are_searched_on_the_lattice_of_p_step_by_default(tmp_path):
    cfg = fake_cfg(tmp_path, trials=12, p_step=0.15)
    assert search_space(cfg) == {"p": ("uniform", 0.0, 0.75, 0.15)}  # 0.8 rounds down to the last point
    run_sweep(cfg, train_fn=fake_train, log=lambda _line: None)
    rates = [t.params["p"] for t in _finished(_load(tmp_path))]
    assert len(rates) == 12
    assert all(min(abs(p - k * 0.15) for k in range(6)) < 1e-9 for p in rates), rates
    assert SweepConfig(base=TrainConfig(), out_dir=tmp_path).p_step == 0.05


def test_p_step_0_searches_continuously(tmp_path):
    def cfg_of(*flags: str) -> SweepConfig:
        return sweep_config(build_parser().parse_args(["sweep", "--model", "tutorial_mlp", "--out", str(tmp_path),
                                                       *flags]))

    assert search_space(cfg_of("--p-step", "0")) == {"p": ("uniform", 0.0, 0.8, None)}
    assert search_space(cfg_of()) == {"p": ("uniform", 0.0, 0.8, 0.05)}


@pytest.mark.slow
def test_two_workers_finish_exactly_n_trials(tmp_path):
    """Real training on 600 MNIST images, two worker processes, one journal file.

    The rates are searched continuously (``--p-step 0``), so two equal rates would mean that the
    workers replayed each other's draws; on the default lattice of 17 rates, 4 random draws
    repeat one about a third of the time, and whether they do would depend on which worker came first.
    """
    argv = ["sweep", "--model", "tutorial_mlp", "--model-arg", "hidden=16", "--trials", "4", "--workers", "2",
            "--epochs", "2", "--limit-train", "600", "--limit-test", "200", "--val-size", "200",
            "--pruner", "halving", "--p-step", "0", "--out", str(tmp_path)]
    assert main(argv) == 0
    trials = _load(tmp_path).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(trials) == 4
    assert sorted(t.number for t in trials) == list(range(4))
    assert len({t.params["p"] for t in trials}) == 4
    assert len(list((tmp_path / "trials").iterdir())) == 4
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["complete"] and summary["trials_finished"] == 4
    assert (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.slow
def test_nproc_trains_every_job_as_a_data_parallel_run(tmp_path, capsys, monkeypatch):
    """Real training on a slice, a configuration's job on 2 gloo processes that report every epoch
    to the study from rank 0 (``--pruner median`` asks the pruner there too)."""
    launched = []
    launch = distributed.launch
    monkeypatch.setattr(distributed, "launch", lambda nproc, fn, *args: launched.append(nproc) or launch(nproc, fn, *args))
    argv = ["sweep", "--model", "tutorial_mlp", "--model-arg", "hidden=16", "--trials", "1", "--nproc", "2",
            "--epochs", "2", "--pruner", "median", "--limit-train", "400", "--limit-test", "100", "--val-size", "100",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "1 worker(s) of 2 processes" in capsys.readouterr().out
    assert launched == [2]  # the job; the winner's test accuracy is read from its finished run
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["complete"] and summary["best"]["test_acc"] is not None
    (row,) = summary["trials"]
    rows = [json.loads(line) for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # rank 0 wrote each epoch, once
    assert row["val_acc_per_epoch"] == [r["val_acc"] for r in rows]  # reported by rank 0's epoch hook


def _kill_a_worker_in_its_hang(tmp_path: Path, cfg_args: str, **env: str) -> None:
    """Run a worker process on ``fake_cfg(tmp_path<cfg_args>)`` whose fake hangs (see HANG_ENV) and
    SIGKILL it once it is inside the hang, as a crash or an OOM kill would."""
    marker = tmp_path / "hanging"
    child = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
             "import optuna; optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
             "from test_sweep import fake_cfg, fake_train\n"
             "from dropkit.lab.sweep import run_worker\n"
             f"run_worker(fake_cfg({str(tmp_path)!r}{cfg_args}), 0, fake_train)\n")
    proc = subprocess.Popen([sys.executable, "-c", child], env={**os.environ, HANG_ENV: str(marker), **env})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the worker never reached its hang"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_killed_worker_loses_only_its_trial_and_a_rerun_completes(tmp_path):
    _kill_a_worker_in_its_hang(tmp_path, ", pruner='median'")
    before = _load(tmp_path).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert before[1].intermediate_values == {1: pytest.approx(0.9 - (before[1].params["p"] - 0.3) ** 2 + 0.01)}

    lines: list[str] = []
    summary = run_sweep(fake_cfg(tmp_path, pruner="median"), fake_train, log=lines.append)
    after = _load(tmp_path).get_trials()
    assert len(_finished(_load(tmp_path))) == 4 and summary["complete"]
    assert after[0].params == before[0].params and after[0].value == before[0].value
    assert after[1].state == TrialState.FAIL
    retries = [t for t in after if retry_history(t) == [1]]
    assert len(retries) == 1 and retries[0].params == before[1].params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert any("trial 1: its worker is gone" in line for line in lines)


def test_resumed_sweep_continues_the_same_study(tmp_path):
    first = run_sweep(fake_cfg(tmp_path, trials=3), fake_train, log=lambda line: None)
    second = run_sweep(fake_cfg(tmp_path, trials=5), fake_train, log=lambda line: None)
    assert [r["trial"] for r in first["trials"]] == [0, 1, 2]
    assert [r["trial"] for r in second["trials"]] == [0, 1, 2, 3, 4]
    assert second["trials"][:3] == first["trials"]
    assert len({r["params"]["p"] for r in second["trials"]}) == 5


def test_a_study_is_not_continued_with_other_settings(tmp_path):
    run_sweep(fake_cfg(tmp_path, trials=1), fake_train, log=lambda line: None)
    with pytest.raises(ValueError, match=r"other settings \(epochs: 3 -> 4\)"):
        run_sweep(fake_cfg(tmp_path, trials=2, epochs=4), fake_train, log=lambda line: None)


@pytest.mark.parametrize(("pruner", "rates", "stopped_at"), [
    ("halving", [0.3, 0.79], 1),         # rung at epoch 1: only the best of two is promoted
    ("median", [0.3, 0.35, 0.79], 2),    # median of two finished trials, from epoch 2 on
])
def test_pruner_stops_a_poor_trial(tmp_path, pruner, rates, stopped_at):
    cfg = fake_cfg(tmp_path, trials=len(rates), epochs=4, pruner=pruner)
    study = open_study(cfg)
    for p in rates:
        study.enqueue_trial({"p": p})
    summary = run_sweep(cfg, fake_train, log=lambda line: None)
    rows = summary["trials"]
    assert [r["state"] for r in rows] == ["COMPLETE"] * (len(rates) - 1) + ["PRUNED"]
    assert rows[-1]["epochs"] == stopped_at
    assert summary["epochs"]["spent"] == 4 * (len(rates) - 1) + stopped_at
    assert summary["epochs"]["full_grid"] == 4 * len(rates)


def test_test_accuracy_is_read_for_the_best_validation_trial_only(tmp_path):
    TEST_READS.clear()
    summary = run_sweep(fake_cfg(tmp_path, trials=4), fake_train, log=lambda line: None)
    best = max((r for r in summary["trials"]), key=lambda r: r["val_acc"])
    assert summary["best"]["trial"] == best["trial"]
    assert TEST_READS == [best["run_dir"]]
    assert summary["best"]["test_acc"] == pytest.approx(best["val_acc"] - 0.002)
    assert not any("test" in key for row in summary["trials"] for key in row)


def _real_cfg(out: Path) -> SweepConfig:
    """One trial of one epoch of real training on a slice of MNIST."""
    base = TrainConfig(model="tutorial_mlp", model_kwargs={"hidden": 16}, epochs=1, limit_train=300,
                       limit_test=100, val_size=100)
    return SweepConfig(base=base, out_dir=out, trials=1)


def _refuse_to_train(*args, **kwargs):
    raise AssertionError("the finished winner was trained again")


def test_a_finished_winner_is_read_while_another_worker_holds_its_run_folder(tmp_path):
    """Two workers that end together both summarise: the winner's test accuracy is read from its
    finished run without its lock, so a worker finds the folder held (here by the test) and still
    succeeds, and trains nothing."""
    cfg = _real_cfg(tmp_path)
    first = run_sweep(cfg, log=lambda line: None)
    run_dir = Path(first["best"]["run_dir"])
    recorded = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert first["best"]["test_acc"] == recorded
    with run_lock.hold(run_dir):
        again = run_sweep(cfg, _refuse_to_train, log=lambda line: None)
    assert again["best"]["test_acc"] == recorded


def test_a_winner_trained_elsewhere_is_trained_once_under_the_machine_lock(tmp_path):
    """A winner whose run is not on this machine is trained again while the sweep holds this
    machine's lock, so this machine's other workers wait for it and then read the finished run."""
    cfg = _real_cfg(tmp_path)
    first = run_sweep(cfg, log=lambda line: None)
    run_dir = Path(first["best"]["run_dir"])
    shutil.rmtree(run_dir)  # as on a machine that did not train it
    held = []

    def train_checking_the_lock(*args, **kwargs):
        with open(tmp_path / LOCK_FILE, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
            else:
                held.append(False)
                fcntl.flock(handle, fcntl.LOCK_UN)
        return train(*args, **kwargs)

    lines: list[str] = []
    again = run_sweep(cfg, train_checking_the_lock, log=lines.append)
    assert held == [True]
    assert any("training it again there for its test accuracy" in line for line in lines)
    assert again["best"]["test_acc"] == first["best"]["test_acc"]  # the same seed trains the same run
    assert run_sweep(cfg, _refuse_to_train, log=lambda line: None)["best"]["test_acc"] == first["best"]["test_acc"]


def test_an_incomplete_study_reports_no_test_accuracy(tmp_path):
    cfg = fake_cfg(tmp_path, trials=2)
    study = open_study(cfg)
    study.tell(study.ask({"p": optuna.distributions.FloatDistribution(0, 0.8)}), 0.5)
    TEST_READS.clear()
    summary = summarise(study, cfg, fake_train, log=lambda line: None)
    assert not summary["complete"] and summary["best"]["test_acc"] is None and TEST_READS == []


def _ask_after_another_machine(study: optuna.Study, cfg: SweepConfig) -> None:
    """Make ``study.ask`` let another machine (not under this machine's lock) create a trial first."""
    other = open_study(cfg, worker=1)
    ask = study.ask

    def racing_ask(*args, **kwargs):
        other.ask()
        return ask(*args, **kwargs)

    study.ask = racing_ask


def test_a_trial_created_past_the_budget_is_surplus_and_never_trained(tmp_path):
    """Another machine (not under this machine's lock) creates a trial between this worker's count and its ask."""
    cfg = fake_cfg(tmp_path, trials=2)
    study = open_study(cfg)
    study.tell(study.ask({"p": optuna.distributions.FloatDistribution(0, 0.8)}), 0.5)
    _ask_after_another_machine(study, cfg)
    assert _claim(study, cfg, log=lambda line: None) == WAIT
    ours = study.get_trials()[-1]
    assert ours.number == 2 and ours.state == TrialState.FAIL and ours.user_attrs["surplus"] and not ours.params


def test_a_trial_of_another_machine_is_dead_when_its_heartbeat_is_stale():
    def running(heartbeat: float) -> optuna.trial.FrozenTrial:
        return optuna.trial.FrozenTrial(
            number=0, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(), datetime_complete=None,
            params={}, distributions={}, intermediate_values={}, trial_id=0, system_attrs={},
            user_attrs={"owner": {"host": "elsewhere.invalid", "pid": 1, "started": "1"}, "heartbeat": heartbeat})

    assert not _is_dead(running(time.time() - 10), stale_after=60)
    assert _is_dead(running(time.time() - 100), stale_after=60)


def test_with_a_database_optunas_heartbeat_fails_a_silent_trial_and_its_retry_callback_queues_it(tmp_path):
    """A trial of another machine on a database storage: Optuna's heartbeat judges it."""
    cfg = fake_cfg(tmp_path, trials=2, storage=f"sqlite:///{tmp_path / 'study.db'}", stale_after=1.0)
    study = open_study(cfg)
    study.enqueue_trial({"p": 0.25}, user_attrs={"config": 0})
    trial = study.ask()
    trial.suggest_float("p", 0.0, 0.8)
    trial.set_user_attr("owner", {"host": "elsewhere.invalid", "pid": 1, "started": "1"})
    heartbeat_storage(cfg).record_heartbeat(trial._trial_id)
    _fail_dead_trials(study, cfg, log=lambda line: None)
    assert study.get_trials()[0].state == TrialState.RUNNING  # its heartbeat is fresh
    time.sleep(2.2)  # past the grace period (stale_after) on SQLite's clock of whole seconds, no heartbeat
    _fail_dead_trials(study, cfg, log=lambda line: None)
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == {"p": 0.25} and retry.user_attrs["config"] == 0 and retry_history(retry) == [0]


@pytest.mark.parametrize(("args", "flag"), [
    (["--p-range", "0.5", "0.2"], "--p-range"),
    (["--p-range", "0", "1"], "--p-range"),
    (["--p-step", "0.9"], "--p-step"),
    (["--p-range", "0.2", "0.3", "--p-step", "0.2"], "--p-step"),
    (["--p-step", "-0.1"], "--p-step"),
    (["--trials", "0"], "--trials"),
    (["--workers", "0"], "--workers"),
    (["--val-size", "0"], "--val-size"),
    (["--lr-range", "1e-3", "1e-2"], "--lr-range"),
    (["--search-lr", "--lr-range", "1e-2", "1e-3"], "--lr-range"),
    (["--search-weight-decay", "--weight-decay-range", "0", "1e-3"], "--weight-decay-range"),
    (["--model-arg", "p=0.5"], "--model-arg"),
    (["--model-arg", "q=1"], "--model-arg"),
    (["--pruner", "asha"], "--pruner"),
])
def test_bad_arguments_name_the_flag(tmp_path, capsys, args, flag):
    try:
        code = main(["sweep", "--model", "tutorial_mlp", "--out", str(tmp_path), *args])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / STORAGE_FILE).exists()


# ----------------------------------------------------------------- --pruner promote

#: nine rates in no particular order; the best three (nearest 0.3) are configurations 1, 4 and 6
RATES = [0.5, 0.31, 0.7, 0.12, 0.28, 0.6, 0.35, 0.0, 0.2]


def _promote_cfg(out, rates=RATES, **kwargs) -> SweepConfig:
    """A --pruner promote sweep of 9 epochs whose configurations are ``rates``, queued in order."""
    cfg = fake_cfg(out, trials=len(rates), epochs=9, pruner="promote", **kwargs)
    study = open_study(cfg)
    for p in rates:
        study.enqueue_trial({"p": p})
    return cfg


def _job(trial: optuna.trial.FrozenTrial) -> tuple[int, int]:
    return trial.user_attrs["config"], trial.user_attrs.get("resumes_from", 0)


def _calls(out: Path) -> dict[str, list[tuple[int, int]]]:
    """Run folder name -> the (epoch resumed from, epochs) of each fake training call in it."""
    calls: dict[str, list[tuple[int, int]]] = {}
    for line in (out / "trials" / CALLS).read_text().splitlines():
        name, done, epochs = line.split()
        calls.setdefault(name, []).append((int(done), int(epochs)))
    return calls


def _check_a_finished_promote_study(out: Path, summary: dict) -> list[optuna.trial.FrozenTrial]:
    """The jobs of a complete 9-configuration, 9-epoch study of RATES: each configuration's first
    job, promotions of 1, 4 and 6 from epoch 1, of 1 from epoch 3, each exactly once (failed
    trials aside); 21 epochs trained; configuration 1 the single COMPLETE trial and the best."""
    trials = _load(out).get_trials()
    live = [t for t in trials if t.state != TrialState.FAIL]
    assert sorted(_job(t) for t in live) == sorted([(c, 0) for c in range(9)] + [(1, 1), (4, 1), (6, 1), (1, 3)])
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in live)
    assert {t.params["p"] for t in live if _job(t)[1] == 0} == set(RATES)
    assert all(t.params["p"] == RATES[_job(t)[0]] for t in live)
    (winner,) = [t for t in trials if t.state == TrialState.COMPLETE]
    assert _job(winner) == (1, 3) and list(winner.intermediate_values) == list(range(1, 10))
    assert summary["complete"] and summary["best"]["trial"] == winner.number and summary["best"]["config"] == 1
    assert summary["epochs"] == {"spent": 21, "per_full_run": 9, "full_grid": 81,
                                 "fraction_of_full_grid": pytest.approx(21 / 81)}
    assert summary["configurations"] == {"requested": 9, "started": 9}
    trained = {row["trial"]: row["epochs_trained"] for row in summary["trials"]}
    assert sum(trained[t.number] for t in live) == 21
    return trials


def test_rungs_are_powers_of_3_below_the_full_epochs_then_the_full_epochs():
    assert rungs(9) == [1, 3, 9]
    assert rungs(10) == [1, 3, 9, 10]
    assert rungs(2) == [1, 2]
    assert rungs(1) == [1]


def test_promotion_takes_the_best_third_of_a_rung_once_each_and_the_highest_rung_first():
    seven = {0: 0.50, 1: 0.80, 2: 0.60, 3: 0.90, 4: 0.10, 5: 0.70, 6: 0.20}
    assert next_promotion({1: seven}, set()) == (3, 1)
    assert next_promotion({1: seven}, {(3, 1)}) == (1, 1)
    assert next_promotion({1: seven}, {(3, 1), (1, 1)}) is None       # 7 // 3 = 2 promotions
    ties = {0: 0.5, 1: 0.7, 2: 0.7, 3: 0.1, 4: 0.2, 5: 0.3}
    assert next_promotion({1: ties}, set()) == (1, 1)                 # equal: the earlier first
    assert next_promotion({1: ties}, {(1, 1)}) == (2, 1)
    assert next_promotion({1: {0: 0.9, 1: 0.8}}, set()) is None       # 2 // 3 = 0
    both = {1: seven, 3: {3: 0.95, 1: 0.85, 5: 0.97}}
    assert next_promotion(both, set()) == (5, 3)
    assert next_promotion(both, {(5, 3)}) == (3, 1)
    # a configuration promoted early keeps its promotion when later ones push it out of the top third
    assert next_promotion({1: {**seven, 7: 0.95, 8: 0.99}}, {(3, 1)}) == (8, 1)


def test_promote_trains_21_epochs_for_9_configurations_of_9_epochs(tmp_path):
    TEST_READS.clear()
    summary = run_sweep(_promote_cfg(tmp_path), fake_train, log=lambda line: None)
    trials = _check_a_finished_promote_study(tmp_path, summary)
    assert [_job(t) for t in trials] == [(c, 0) for c in range(9)] + [(1, 1), (4, 1), (6, 1), (1, 3)]
    assert not any(t.state == TrialState.FAIL for t in trials)
    calls = _calls(tmp_path)
    assert sum(epochs - done for runs in calls.values() for done, epochs in runs) == 21   # the fake agrees
    assert TEST_READS == [summary["best"]["run_dir"]]
    assert summary["best"]["test_acc"] == pytest.approx(summary["best"]["val_acc"] - 0.002)


def test_a_promotion_resumes_from_a_copy_of_the_promoted_jobs_run(tmp_path):
    run_sweep(_promote_cfg(tmp_path), fake_train, log=lambda line: None)
    trials = _load(tmp_path).get_trials()
    calls = _calls(tmp_path)
    for trial in trials:
        config, start = _job(trial)
        name = Path(trial.user_attrs["run_dir"]).name
        assert calls[name][0] == (start, {0: 1, 1: 3, 3: 9}[start])     # the fake's first call there
        if start:
            source = trials[trial.user_attrs["source"]]
            assert _job(source)[0] == config and trial.user_attrs["source_dir"] == source.user_attrs["run_dir"]
            assert {k: v for k, v in trial.intermediate_values.items() if k <= start} == source.intermediate_values
            assert trial.user_attrs["trained_from"] == start
    # the copied runs are left as they were: configuration 1's first run still holds one epoch
    assert json.loads((Path(trials[1].user_attrs["run_dir"]) / CHECKPOINT).read_text())["epochs"] == 1


def test_promote_trains_the_best_in_full_when_no_rung_holds_three(tmp_path):
    summary = run_sweep(_promote_cfg(tmp_path, rates=[0.5, 0.3]), fake_train, log=lambda line: None)
    trials = _load(tmp_path).get_trials()
    assert [_job(t) for t in trials] == [(0, 0), (1, 0), (1, 1), (1, 3)]
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3 + [TrialState.COMPLETE]
    assert summary["complete"] and summary["epochs"]["spent"] == 1 + 1 + 2 + 6


@pytest.mark.slow
def test_two_workers_run_every_job_of_a_promote_study_once(tmp_path, monkeypatch):
    monkeypatch.setenv(SLOW_ENV, "0.2")   # the spawned workers inherit it: their jobs overlap
    summary = run_sweep(_promote_cfg(tmp_path, workers=2), fake_train, log=lambda line: None)
    trials = _check_a_finished_promote_study(tmp_path, summary)
    assert not any(t.state == TrialState.FAIL for t in trials) and len(trials) == 13


@pytest.mark.slow
def test_a_killed_promote_worker_loses_only_its_job_and_a_rerun_completes(tmp_path):
    _promote_cfg(tmp_path)
    # the hang is in trial 9, the first promotion
    _kill_a_worker_in_its_hang(tmp_path, ", trials=9, epochs=9, pruner='promote'", **{HANG_AT_ENV: "-0009 2"})
    before = _load(tmp_path).get_trials()
    assert [t.state for t in before] == [TrialState.PRUNED] * 9 + [TrialState.RUNNING]
    assert _job(before[9]) == (1, 1)

    lines: list[str] = []
    summary = run_sweep(fake_cfg(tmp_path, trials=9, epochs=9, pruner="promote"), fake_train, log=lines.append)
    after = _check_a_finished_promote_study(tmp_path, summary)
    assert [(t.params, t.value) for t in after[:9]] == [(t.params, t.value) for t in before[:9]]
    assert after[9].state == TrialState.FAIL and [t.number for t in after if t.state == TrialState.FAIL] == [9]
    (retry,) = [t for t in after if retry_history(t) == [9]]
    assert _job(retry) == (1, 1) and retry.user_attrs["source"] == 1
    assert retry.state == TrialState.PRUNED and _calls(tmp_path)[Path(retry.user_attrs["run_dir"]).name] == [(1, 3)]
    assert any("trial 9: its worker is gone" in line for line in lines)


def _finished_first_jobs(cfg: SweepConfig, rates: list[float]) -> optuna.Study:
    """A promote study whose first jobs, one per rate, have finished at epoch 1 (as fake_train scores them)."""
    study = open_study(cfg)
    for p in rates:
        study.enqueue_trial({"p": p})
        trial = study.ask()
        trial.report(0.9 - (trial.suggest_float("p", *cfg.p_range) - 0.3) ** 2 + 0.01, 1)
        study.tell(trial, state=TrialState.PRUNED)
    return study


def test_a_promotion_made_first_by_another_machine_is_a_duplicate_and_never_trained(tmp_path):
    """Another machine (not under this machine's lock) makes the same promotion just before this worker does."""
    cfg = fake_cfg(tmp_path, trials=3, epochs=3, pruner="promote")
    study = _finished_first_jobs(cfg, [0.5, 0.3, 0.7])
    other = open_study(cfg, worker=1)
    enqueue = study.enqueue_trial

    def racing_enqueue(params, user_attrs):
        other.enqueue_trial(params, user_attrs=user_attrs)
        other.ask()
        enqueue(params, user_attrs=user_attrs)

    study.enqueue_trial = racing_enqueue
    assert _claim(study, cfg, log=lambda line: None) == WAIT
    theirs, ours = study.get_trials()[3:]
    assert theirs.state == TrialState.RUNNING and _job(theirs) == (1, 1)
    assert ours.state == TrialState.FAIL and ours.user_attrs["duplicate"] and _job(ours) == (1, 1) and not ours.params
    assert summarise(study, cfg, fake_train, log=lambda line: None)["trials"][4]["note"].startswith("duplicate")


def test_a_configuration_created_past_the_budget_is_surplus_and_never_trained(tmp_path):
    cfg = fake_cfg(tmp_path, trials=2, epochs=3, pruner="promote")
    study = _finished_first_jobs(cfg, [0.5])
    _ask_after_another_machine(study, cfg)
    assert _claim(study, cfg, log=lambda line: None) == WAIT
    ours = study.get_trials()[-1]
    assert ours.number == 2 and ours.state == TrialState.FAIL and ours.user_attrs["surplus"] and not ours.params


def test_every_job_plans_the_full_trial_so_schedules_span_it_and_other_pruners_studies_are_refused(tmp_path):
    base = TrainConfig(model="tutorial_mlp", epochs=9, val_size=100, schedule="cosine", drop_schedule="curriculum")
    SweepConfig(base=base, out_dir=tmp_path, pruner="promote").validate()  # cosine and ramps are accepted
    for epochs in (1, 3, None):
        job = trial_config(base, {"p": 0.3}, epochs)
        assert job.planned_epochs == 9 and job.span == 9 and job.epochs == (epochs or 9)
    run_sweep(fake_cfg(tmp_path, trials=1, pruner="halving"), fake_train, log=lambda line: None)
    with pytest.raises(ValueError, match="--pruner: halving, median or none -> promote"):
        run_sweep(fake_cfg(tmp_path, trials=1, pruner="promote"), fake_train, log=lambda line: None)


def test_with_a_database_a_trial_no_worker_took_is_dead_once_stale_and_another_machines_is_optunas():
    """A RUNNING trial without an owner was never taken (its worker died between creating and
    taking it), so it has no heartbeat for Optuna to judge: its start decides."""
    def running(age: float, owner: dict | None = None) -> optuna.trial.FrozenTrial:
        return optuna.trial.FrozenTrial(
            number=0, state=TrialState.RUNNING, value=None, datetime_start=datetime.fromtimestamp(time.time() - age),
            datetime_complete=None, params={}, distributions={}, intermediate_values={}, trial_id=0,
            system_attrs={}, user_attrs={"owner": owner} if owner else {})

    assert _is_dead(running(100), stale_after=60, optuna_heartbeat=True)
    assert not _is_dead(running(10), stale_after=60, optuna_heartbeat=True)
    elsewhere = {"host": "elsewhere.invalid", "pid": 1, "started": "1"}
    assert not _is_dead(running(100, elsewhere), stale_after=60, optuna_heartbeat=True)
