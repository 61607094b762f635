"""dropkit compare: settings, the summary's statements, and the report files."""

import json

import pytest

from dropkit.lab.cli import main
from dropkit.lab.compare import p_settings, reg_settings, run_settings, summarise
from dropkit.lab.report import write_report
from dropkit.lab.train import TrainConfig


def _run(label, p, train_acc, test_acc, val_acc, seconds=1.0, saved=1.0, other_rates=None):
    row = {"epoch": 1, "p": p, "train_acc": train_acc, "train_eval_acc": train_acc, "test_acc": test_acc,
           "val_acc": val_acc,
           "gap": train_acc - test_acc, "seconds": seconds, "peak_rss_mib": 100.0, "saved_mib": saved}
    return {"label": label, "config": {"p": p, "model_kwargs": other_rates or {}}, "history": [row]}


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
    with pytest.raises(ValueError, match="--reg must be among"):
        reg_settings("tutorial_mlp", ["dropconnect"], p=0.5, l2=0.0, max_norm=1.0)


def test_summary_finds_baseline_best_and_says_what_happened():
    runs = [_run("p=0.5", 0.5, 0.90, 0.91, 0.92, seconds=1.5, saved=2.0),
            _run("p=0", 0.0, 0.99, 0.95, 0.94),
            _run("p=0.8", 0.8, 0.80, 0.85, 0.86)]
    summary = summarise(runs)
    assert summary["baseline"] == "p=0"
    assert summary["best_on_validation"] == "p=0"
    rows = {r["label"]: r for r in summary["settings"]}
    assert rows["p=0.5"]["time_ratio"] == pytest.approx(1.5)
    assert rows["p=0.5"]["saved_ratio"] == pytest.approx(2.0)
    assert rows["p=0.5"]["gap_vs_baseline"] == pytest.approx(-0.01 - 0.04)
    text = " ".join(summary["statements"])
    assert "p=0.5: the train-test gap was -1.00% against 4.00% for p=0, so it reduced overfitting" in text
    assert "p=0.8 fits the training data less well (80.00% against 99.00%, every unit on)" in text
    assert "p=0.5 fits the training data less well" in text and "p=0.5: the train-test gap" in text
    assert "Best on validation data: p=0" in text


def test_report_files_are_self_contained(tmp_path):
    runs = [_run("p=0", 0.0, 0.99, 0.95, 0.94), _run("p=0.5", 0.5, 0.95, 0.96, 0.96)]
    json_path, html_path = write_report(tmp_path, "t", runs, summarise(runs), {"epochs": 1})
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 5 and "http" not in page
    data = json.loads(json_path.read_text())
    assert data["summary"]["best_on_validation"] == "p=0.5" and len(data["runs"]) == 2


def test_compare_end_to_end_on_a_slice(tmp_path):
    base = TrainConfig(epochs=1, limit_train=1500, limit_test=500, val_size=300, batch_size=100)
    runs = run_settings(base, p_settings([0.0, 0.5]), tmp_path, isolate=False)
    assert [r["label"] for r in runs] == ["p=0", "p=0.5"]
    assert (tmp_path / "p=0.5" / "metrics.jsonl").exists()
    summary = summarise(runs)
    assert summary["baseline"] == "p=0" and summary["settings"][1]["p"] == 0.5
    with pytest.raises(ValueError, match="settings must differ"):
        run_settings(base, p_settings([0.5, 0.5]), tmp_path)


def test_compare_command_writes_the_report_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--p", "0", "0.5", "--epochs", "1", "--limit-train", "1000", "--limit-test", "300",
                 "--val-size", "200", "--batch-size", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 settings x 1 epochs of tutorial_mlp on mnist" in printed
    assert "p=0 " in printed and "p=0.5 " in printed and f"report: {out / 'report.html'}" in printed
    report = json.loads((out / "report.json").read_text())
    assert [run["label"] for run in report["runs"]] == ["p=0", "p=0.5"]
    assert report["summary"]["best_on_validation"] in ("p=0", "p=0.5")
