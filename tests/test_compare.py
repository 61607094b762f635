"""dropkit compare: settings, the summary's statements, and the report files."""

import json
import re

import pytest

from dropkit.lab.cli import main
from dropkit.lab.compare import p_settings, reg_settings, run_settings, summarise
from dropkit.lab.report import write_report
from dropkit.lab.train import TrainConfig


def _run(label, p, train_acc, test_acc, val_acc, seconds=1.0, saved=1.0, other_rates=None, seed=0, epochs=1):
    """A finished run of ``epochs`` epochs whose final figures are those given (epochs take ``seconds``)."""
    row = {"epoch": epochs, "p": p, "train_acc": train_acc, "train_eval_acc": train_acc, "test_acc": test_acc,
           "val_acc": val_acc,
           "gap": train_acc - test_acc, "seconds": seconds, "peak_rss_mib": 100.0, "saved_mib": saved}
    history = [{**row, "epoch": e} for e in range(1, epochs)] + [row]
    return {"label": label, "seed": seed, "config": {"p": p, "model_kwargs": other_rates or {}}, "history": history}


def _seeds(label, p, accs, **kwargs):
    """One run per seed: ``accs`` holds (train_acc, test_acc, val_acc) per seed."""
    return [_run(label, p, *acc, seed=seed, **kwargs) for seed, acc in enumerate(accs)]


def test_reg_settings_switch_off_every_dropout_rate_for_non_dropout_settings():
    settings = {s.label: s for s in reg_settings("srivastava_mlp", ["none", "l2", "dropout+maxnorm", "batchnorm"],
                                                 p=0.5, l2=1e-4, max_norm=3.0)}
    base = TrainConfig(model="srivastava_mlp")
    none = settings["none"].apply(base)
    assert none.p == 0.0 and none.model_kwargs == {"p_input": 0.0}
    assert settings["l2"].apply(base).weight_decay == 1e-4
    both = settings["dropout+maxnorm"].apply(base)
    assert both.p == 0.5 and both.max_norm == 3.0 and both.model_kwargs == {}
    assert settings["batchnorm"].apply(base).model_kwargs == {"p_input": 0.0, "batchnorm": True}


def test_unknown_regulariser_is_named():
    with pytest.raises(ValueError, match="argument --reg: must be among"):
        reg_settings("tutorial_mlp", ["dropconnect"], p=0.5, l2=0.0, max_norm=1.0)


def test_summary_states_differences_beyond_noise_and_says_when_a_difference_is_within_it():
    runs = (_seeds("p=0.5", 0.5, [(0.900, 0.910, 0.920), (0.902, 0.911, 0.921), (0.898, 0.909, 0.919)],
                   seconds=1.5, saved=2.0, epochs=3)
            + _seeds("p=0", 0.0, [(0.990, 0.950, 0.940), (0.992, 0.951, 0.941), (0.988, 0.949, 0.939)], epochs=3)
            + _seeds("p=0.8", 0.8, [(0.800, 0.850, 0.860), (0.802, 0.851, 0.861), (0.798, 0.849, 0.859)], epochs=3)
            + _seeds("p=0.1", 0.1, [(0.990, 0.952, 0.941), (0.992, 0.947, 0.942), (0.988, 0.951, 0.938)], epochs=3))
    summary = summarise(runs)
    assert summary["baseline"] == "p=0" and summary["seeds"] == 3
    assert summary["best_on_validation"] == "p=0.1"
    rows = {r["label"]: r for r in summary["settings"]}
    assert rows["p=0.5"]["time_ratio"] == pytest.approx(1.5)
    assert rows["p=0.5"]["saved_ratio"] == pytest.approx(2.0)
    assert rows["p=0.5"]["gap_vs_baseline"] == pytest.approx(-0.01 - 0.04)
    assert rows["p=0.5"]["test_acc_spread"] == pytest.approx(0.001)
    text = " ".join(summary["statements"])
    assert "p=0.5: the train-test gap was -1.00% ± 0.10 against 4.00% ± 0.10 for p=0, so it reduced overfitting" in text
    assert "p=0.8 fits the training data less well (80.00% against 99.00%, every unit on)" in text
    # the epochs of p=0.5 all take 1.5 s, those of p=0 1 s: no spread, a real difference
    assert "p=0.5: " in text and "costs x1.50 per epoch" in text
    # p=0.1 is p=0 up to seed noise: no statement of effect
    (p01,) = [s for s in summary["statements"] if s.startswith("p=0.1:")]
    assert "the difference is within noise" in p01 and "within noise)" in p01 and "overfitting" not in p01
    assert "p=0.1 fits" not in text
    assert "Best on validation data: p=0.1" in text and "p=0 is within noise of it" in text


def test_with_one_seed_no_accuracy_difference_is_called_real():
    runs = [_run("p=0", 0.0, 0.99, 0.95, 0.94, epochs=4), _run("p=0.8", 0.8, 0.80, 0.85, 0.86, epochs=4)]
    summary = summarise(runs)
    text = " ".join(summary["statements"])
    assert "one seed per setting, so this cannot be told from noise" in text
    assert "reduced overfitting" not in text and "underfits" not in text
    assert "the ranking cannot be told from noise" in text


def test_time_per_epoch_is_the_median_after_the_first_epoch():
    run = _run("p=0", 0.0, 0.99, 0.95, 0.94, epochs=4)
    for row, seconds in zip(run["history"], (25.0, 0.7, 0.64, 0.9)):
        row["seconds"] = seconds
    (row,) = summarise([run])["settings"]
    assert row["seconds_per_epoch"] == pytest.approx(0.7) and row["first_epoch_seconds"] == 25.0


def _clear_runs():
    """Two settings, three seeds each, that differ beyond noise in gap, time and memory."""
    return (_seeds("p=0", 0.0, [(0.990, 0.950, 0.940), (0.992, 0.951, 0.941), (0.988, 0.949, 0.939)], epochs=3)
            + _seeds("p=0.5", 0.5, [(0.960, 0.965, 0.962), (0.962, 0.966, 0.963), (0.958, 0.964, 0.961)],
                     seconds=1.4, saved=2.0, epochs=3))


def test_report_files_are_self_contained_and_leave_out_charts_without_information(tmp_path):
    runs = _clear_runs()
    json_path, html_path = write_report(tmp_path, "t", runs, summarise(runs), {"epochs": 3, "warmup_seconds": 1.25})
    page = html_path.read_text()
    # learning curves, gap, time, memory; accuracy against p needs three rates
    assert page.count("data:image/png;base64,") == 4 and "http" not in page
    assert "Accuracy against p: chart left out (fewer than three rates" in page
    assert "Kernel warm-up (compiled, or loaded from the cache) took 1.25 s" in page
    assert "96.50 ± 0.10" in page  # mean ± spread of p=0.5's test accuracy, in %
    data = json.loads(json_path.read_text())
    assert data["summary"]["best_on_validation"] == "p=0.5" and len(data["runs"]) == 6

    same = _seeds("p=0", 0.0, [(0.99, 0.95, 0.94), (0.98, 0.96, 0.95)]) + \
        _seeds("p=0.1", 0.1, [(0.985, 0.955, 0.945), (0.99, 0.95, 0.94)])
    _, html_path = write_report(tmp_path / "same", "t", same, summarise(same), {"epochs": 1})
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 1  # only the learning curves
    assert "Time per epoch: chart left out" in page and "Memory kept for backward (one batch): chart left out" in page
    assert "Generalisation gap (final train accuracy - test accuracy): chart left out (no setting differs" in page


def test_compare_end_to_end_on_a_slice(tmp_path):
    base = TrainConfig(epochs=1, limit_train=600, limit_test=300, val_size=300, batch_size=100)
    runs = run_settings(base, p_settings([0.0, 0.5]), tmp_path, seeds=2, isolate=False)
    assert [(r["label"], r["seed"]) for r in runs] == [("p=0", 0), ("p=0", 1), ("p=0.5", 0), ("p=0.5", 1)]
    assert (tmp_path / "p=0.5" / "seed=1" / "metrics.jsonl").exists()
    assert runs[0]["history"][-1]["test_acc"] != runs[1]["history"][-1]["test_acc"]  # the seeds differ
    summary = summarise(runs)
    assert summary["baseline"] == "p=0" and summary["settings"][1]["p"] == 0.5 and summary["seeds"] == 2
    with pytest.raises(ValueError, match="settings must differ"):
        run_settings(base, p_settings([0.5, 0.5]), tmp_path)


@pytest.mark.slow
def test_compare_command_writes_the_report_and_prints_the_table(tmp_path, capfd):
    """Each run in its own process (their lines reach the file descriptor, hence capfd)."""
    out = tmp_path / "cmp"
    assert main(["compare", "--p", "0", "0.5", "--epochs", "2", "--limit-train", "600", "--limit-test", "300",
                 "--val-size", "200", "--batch-size", "100", "--seeds", "1", "--out", str(out)]) == 0
    printed = capfd.readouterr().out
    assert "2 settings x 1 seeds x 2 epochs of tutorial_mlp on mnist" in printed
    assert re.search(r"kernel warm-up: \d+\.\d\d s", printed)
    assert "p=0.5 seed 0: epoch 2/2  val acc" in printed  # progress, one line per epoch
    assert "p=0 " in printed and "p=0.5 " in printed and f"report: {out / 'report.html'}" in printed
    assert "one seed per setting, so this cannot be told from noise" in printed
    report = json.loads((out / "report.json").read_text())
    assert [(run["label"], run["seed"]) for run in report["runs"]] == [("p=0", 0), ("p=0.5", 0)]
    assert report["summary"]["best_on_validation"] in ("p=0", "p=0.5")
