"""dropkit sweep: exact trial budgets across workers, recovery from a killed worker, resumption,
pruning, test accuracy read for the winner only, and argument errors that name the flag.

Most tests use a fake training function (validation accuracy a known function of p and the
epoch) so that they check the study's bookkeeping in milliseconds; one runs real training on a
tiny slice of MNIST through the command line with two worker processes.
"""

from __future__ import annotations

import json
import os
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

from dropkit.cli import main
from dropkit.sweep import (
    STORAGE_FILE,
    WAIT,
    SweepConfig,
    _claim,
    _is_dead,
    open_study,
    rate_arguments,
    run_sweep,
    summarise,
    trial_config,
)
from dropkit.train import CHECKPOINT, TrainConfig

#: run folders whose test accuracy was read, in order (the fake's rows record it)
TEST_READS: list[str] = []
#: set in a child process: the fake then hangs in trial 1's second epoch after touching this file
HANG_ENV = "DROPKIT_SWEEP_TEST_HANG"


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


def fake_train(config: TrainConfig, out_dir, *, resume: bool = False, quiet: bool = False) -> _Result:
    """Validation accuracy 0.9 - (p - 0.3)^2 + 0.01 * epoch: best at p = 0.3, better every epoch."""
    out = Path(out_dir)
    hang = os.environ.get(HANG_ENV)
    if hang and out.name.endswith("-0001") and config.epochs == 2:
        Path(hang).write_text("in trial 1, epoch 2")
        time.sleep(120)
    out.mkdir(parents=True, exist_ok=True)
    (out / CHECKPOINT).touch()
    rows = []
    for epoch in range(1, config.epochs + 1):
        val = 0.9 - (config.p - 0.3) ** 2 + 0.01 * epoch
        row = _Row(epoch=epoch, val_acc=val, test_acc=val - 0.002)
        row.run = str(out)
        rows.append(row)
    return _Result(rows)


def fake_cfg(out, *, trials: int = 4, epochs: int = 3, pruner: str = "none", **kwargs) -> SweepConfig:
    """A sweep of tutorial_mlp's single rate p over the fake training function."""
    base = TrainConfig(model="tutorial_mlp", epochs=epochs, val_size=100)
    return SweepConfig(base=base, out_dir=Path(out), trials=trials, pruner=pruner, **kwargs)


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


def test_two_workers_finish_exactly_n_trials(tmp_path):
    """Real training on 600 MNIST images, two worker processes, one journal file."""
    argv = ["sweep", "--model", "tutorial_mlp", "--model-arg", "hidden=16", "--trials", "6", "--workers", "2",
            "--epochs", "2", "--limit-train", "600", "--limit-test", "200", "--val-size", "200",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    trials = _load(tmp_path).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6 and len(trials) == 6
    assert sorted(t.number for t in trials) == list(range(6))
    assert len({t.params["p"] for t in trials}) == 6
    assert len(list((tmp_path / "trials").iterdir())) == 6
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["complete"] and summary["trials_finished"] == 6
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_killed_worker_loses_only_its_trial_and_a_rerun_completes(tmp_path):
    marker = tmp_path / "hanging"
    child = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
             "import optuna; optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
             "from test_sweep import fake_cfg, fake_train\n"
             "from dropkit.sweep import run_worker\n"
             f"run_worker(fake_cfg({str(tmp_path)!r}, pruner='median'), 0, fake_train)\n")
    proc = subprocess.Popen([sys.executable, "-c", child], env={**os.environ, HANG_ENV: str(marker)})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the worker never reached trial 1"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = _load(tmp_path).get_trials()
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert before[1].intermediate_values == {1: pytest.approx(0.9 - (before[1].params["p"] - 0.3) ** 2 + 0.01)}

    lines: list[str] = []
    summary = run_sweep(fake_cfg(tmp_path, pruner="median"), fake_train, log=lines.append)
    after = _load(tmp_path).get_trials()
    assert len(_finished(_load(tmp_path))) == 4 and summary["complete"]
    assert after[0].params == before[0].params and after[0].value == before[0].value
    assert after[1].state == TrialState.FAIL
    retries = [t for t in after if t.user_attrs.get("retry_of") == 1]
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


def test_an_incomplete_study_reports_no_test_accuracy(tmp_path):
    cfg = fake_cfg(tmp_path, trials=2)
    study = open_study(cfg)
    study.tell(study.ask({"p": optuna.distributions.FloatDistribution(0, 0.8)}), 0.5)
    TEST_READS.clear()
    summary = summarise(study, cfg, fake_train, log=lambda line: None)
    assert not summary["complete"] and summary["best"]["test_acc"] is None and TEST_READS == []


def test_a_trial_created_past_the_budget_is_surplus_and_never_trained(tmp_path):
    """Another machine (not under this machine's lock) creates a trial between our count and our ask."""
    cfg = fake_cfg(tmp_path, trials=2)
    study = open_study(cfg)
    study.tell(study.ask({"p": optuna.distributions.FloatDistribution(0, 0.8)}), 0.5)
    other = open_study(cfg, worker=1)
    ask = study.ask

    def racing_ask(*args, **kwargs):
        other.ask()
        return ask(*args, **kwargs)

    study.ask = racing_ask
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


@pytest.mark.parametrize(("args", "flag"), [
    (["--p-range", "0.5", "0.2"], "--p-range"),
    (["--p-range", "0", "1"], "--p-range"),
    (["--trials", "0"], "--trials"),
    (["--workers", "0"], "--workers"),
    (["--val-size", "0"], "--val-size"),
    (["--lr-range", "1e-3", "1e-2"], "--lr-range"),
    (["--search-lr", "--lr-range", "1e-2", "1e-3"], "--lr-range"),
    (["--search-weight-decay", "--weight-decay-range", "0", "1e-3"], "--weight-decay-range"),
    (["--schedule", "cosine"], "--pruner"),
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
