"""Tree ensembles in the lab: settings, tables, the best-snapshot early-stopping rule, the compare path."""

from __future__ import annotations

import csv
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from dropkit.lab.cli import main
from dropkit.lab.tables import Part, Table, image_table, read_table, split_table, table_from_file
from dropkit.lab.tree_compare import summarise_trees
from dropkit.lab.trees import BestSnapshot, TreeConfig, fit, require_lightgbm, tree_settings

lightgbm = pytest.importorskip("lightgbm")


def _blobs(n: int = 600, features: int = 6, classes: int = 3, seed: int = 0, noise: float = 1.0):
    """Gaussian blobs around well separated centres, plus pure-noise features."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 3, (classes, features))
    X = (centres[y] + rng.normal(0, noise, (n, features))).astype(np.float32)
    return X, y


def _table(**kwargs) -> Table:
    X, y = _blobs(**kwargs)
    train, val, test = split_table(X, y)
    return Table("blobs", train, val, test, tuple(f"f{i}" for i in range(X.shape[1])), ("a", "b", "c"))


def _write_csv(path, X, y, names=("a", "b", "c")):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"f{i}" for i in range(X.shape[1])] + ["label"])
        for row, label in zip(X, y):
            writer.writerow([f"{v:.5f}" for v in row] + [names[label]])
    return path


# -- settings and config ----------------------------------------------------------------------------

def test_tree_settings_parse_every_form():
    settings = tree_settings(["none", "dart:0.1", "rf", "rf:0.5"])
    assert [(s.label, s.boosting, s.rate) for s in settings] == [
        ("none", "gbdt", None), ("dart:0.1", "dart", 0.1), ("rf", "rf", None), ("rf:0.5", "rf", 0.5)]


@pytest.mark.parametrize("reg, message", [
    ("l2", "must be among none, dart:RATE"), ("dart", "needs its drop rate"), ("dart:abc", "must be a number"),
    ("dart:1.5", r"must be in \(0, 1\)"), ("dart:0", r"must be in \(0, 1\)"), ("rf:nan", r"must be in \(0, 1\)"),
    ("none:0.1", "must be among"),
])
def test_bad_tree_settings_are_named(reg, message):
    with pytest.raises(ValueError, match=message):
        tree_settings([reg])


def test_duplicate_tree_settings_are_refused():
    with pytest.raises(ValueError, match="must differ"):
        tree_settings(["dart:0.1", "dart:0.1"])


@pytest.mark.parametrize("changes, message", [
    ({"rounds": True}, "rounds must be an int"), ({"rounds": 0}, "rounds must be an int >= 1"),
    ({"boosting": "dart"}, "needs its drop rate"), ({"rate": 0.1}, "plain boosting has no drop rate"),
    ({"boosting": "dart", "rate": "0.1"}, "rate must be a number"), ({"learning_rate": 0}, "learning_rate"),
    ({"patience": 0}, "patience must be an int >= 1"), ({"boosting": "goss"}, "boosting must be one of"),
    ({"data": "x.csv"}, "--data needs --target"), ({"target": "y"}, "pass --data too"),
])
def test_tree_config_validation_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        TreeConfig(**changes).validate()


def test_random_forest_keeps_sqrt_features_per_split_unless_told():
    params = TreeConfig(boosting="rf").params(num_class=10, num_features=784)
    assert params["feature_fraction_bynode"] == pytest.approx(28 / 784)
    assert 0 < params["bagging_fraction"] < 1 and params["bagging_freq"] == 1
    assert TreeConfig(boosting="rf", rate=0.75).params(10, 784)["feature_fraction_bynode"] == pytest.approx(0.25)
    dart = TreeConfig(boosting="dart", rate=0.2).params(2, 5)
    assert dart["drop_rate"] == 0.2 and dart["skip_drop"] == 0.0 and dart["objective"] == "binary"


def test_missing_lightgbm_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    with pytest.raises(ValueError, match=r"lightgbm.*dropkit\[trees\]"):
        require_lightgbm()


# -- tables ---------------------------------------------------------------------------------------

def test_csv_table_reads_features_missing_cells_and_text_classes(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("x,label,z\n1.5,cat,\n2,dog,NA\n-3e-1,cat,4\n")
    X, y, features, classes = read_table(path, "label")
    assert features == ("x", "z") and classes == ("cat", "dog")
    assert y.tolist() == [0, 1, 0] and X.dtype == np.float32
    np.testing.assert_array_equal(X[:, 0], np.float32([1.5, 2, -0.3]))
    assert np.isnan(X[0, 1]) and np.isnan(X[1, 1]) and X[2, 1] == 4


def test_numeric_classes_sort_as_numbers(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("x,y\n1,10\n2,9\n3,10\n")
    assert read_table(path, "y")[3] == ("9", "10")


@pytest.mark.parametrize("text, target, message", [
    ("x,y\n1,a\n", "label", "no column 'label' for --target"),
    ("x,y\nabc,a\n2,b\n", "y", "line 2, column 'x': 'abc' is not a number"),
    ("x,y\n1,a,3\n", "y", "line 2 has 3 cells, the header has 2"),
    ("x,y\n1,a\n", "y", "holds 1 class"),
    ("x,y\n1,\n2,b\n", "y", "empty or missing values"),
    ("", "y", "empty file"),
])
def test_broken_csv_errors_name_the_file(tmp_path, text, target, message):
    path = tmp_path / "broken.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_table(path, target)
    assert "broken.csv" in str(info.value)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"accepts \.csv, \.parquet"):
        read_table(tmp_path / "t.xlsx", "y")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_table(tmp_path / "nope.csv", "y")


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="t.parquet: reading Parquet needs the package pyarrow"):
        read_table(path, "y")


def test_parquet_reads_like_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"x": [1.0, 2.0, None], "flag": [True, False, True], "y": ["b", "a", "b"]}),
                   tmp_path / "t.parquet")
    X, y, features, classes = read_table(tmp_path / "t.parquet", "y")
    assert features == ("x", "flag") and classes == ("a", "b") and y.tolist() == [1, 0, 1]
    assert X[:2].tolist() == [[1.0, 1.0], [2.0, 0.0]] and np.isnan(X[2, 0])


def test_split_is_fixed_disjoint_and_complete():
    X = np.arange(100, dtype=np.float32)[:, None]
    y = np.arange(100) % 2
    parts = split_table(X, y, val_fraction=0.2, test_fraction=0.1)
    assert [len(p) for p in parts] == [70, 20, 10]
    assert sorted(np.concatenate([p.X[:, 0] for p in parts]).tolist()) == list(range(100))
    again = split_table(X, y, val_fraction=0.2, test_fraction=0.1)
    assert all(np.array_equal(a.X, b.X) for a, b in zip(parts, again))
    with pytest.raises(ValueError, match="val_fraction must be a number in"):
        split_table(X, y, val_fraction=True)


def test_image_table_uses_the_lab_splits():
    table = image_table("mnist", val_size=300, limit_train=200, limit_test=100)
    assert table.train.X.shape == (200, 784) and len(table.val) == 300 and len(table.test) == 100
    assert table.train.X.dtype == np.float32 and 0 <= table.train.X.min() and table.train.X.max() <= 1
    assert table.num_classes == 10


# -- models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("boosting, rate", [("gbdt", None), ("dart", 0.1), ("rf", None)])
def test_every_form_learns_separable_classes(boosting, rate):
    table = _table()
    result = fit(TreeConfig(boosting=boosting, rate=rate, rounds=20, eval_every=5, num_leaves=7, patience=None),
                 table)
    test_acc = float((result.booster.predict(table.test.X).argmax(1) == table.test.y).mean())
    assert test_acc > 0.9  # three classes: chance is 1/3
    assert [row["rounds"] for row in result.history] == [5, 10, 15, 20]
    assert all(0 <= row[k] <= 1 for row in result.history for k in ("train_acc", "val_acc", "test_acc"))


def test_random_forest_rows_differ_by_seed_and_plain_boosting_does_not():
    table = _table(noise=3.0)

    def predictions(boosting, seed):
        config = TreeConfig(boosting=boosting, rounds=10, eval_every=10, num_leaves=7, seed=seed, patience=None)
        return fit(config, table).booster.predict(table.test.X)

    assert not np.array_equal(predictions("rf", 0), predictions("rf", 1))
    np.testing.assert_array_equal(predictions("gbdt", 0), predictions("gbdt", 1))


# -- the early-stopping rule ------------------------------------------------------------------------

def _env(rounds, val_error, end=100, model="model"):
    return SimpleNamespace(iteration=rounds - 1, end_iteration=end, params={"learning_rate": 0.1},
                           evaluation_result_list=[("train", "multi_error", 0.0, False),
                                                   ("val", "multi_error", val_error, False)],
                           model=SimpleNamespace(model_to_string=lambda num_iteration: f"{model}@{rounds}"))


def test_snapshot_keeps_the_best_model_ties_keep_the_earlier_and_patience_stops():
    rule = BestSnapshot(eval_every=10, patience=2, rate=0.1)
    rule(_env(5, 0.9))  # not an evaluation point
    assert rule.history == []
    rule(_env(10, 0.30))
    rule(_env(20, 0.20))
    rule(_env(30, 0.20))  # a tie is no improvement
    assert (rule.best_round, rule.best_model) == (20, "model@20")
    with pytest.raises(lightgbm.callback.EarlyStopException) as info:
        rule(_env(40, 0.25))
    assert info.value.best_iteration == 19  # LightGBM counts from 0
    assert [row["rounds"] for row in rule.history] == [10, 20, 30, 40]
    assert rule.history[1]["val_acc"] == pytest.approx(0.8) and rule.history[1]["p"] == 0.1


def test_snapshot_evaluates_the_last_round_and_never_stops_without_patience():
    rule = BestSnapshot(eval_every=10, patience=None, rate=0.0)
    for rounds, error in ((10, 0.1), (20, 0.2), (30, 0.3), (35, 0.4)):
        rule(_env(rounds, error, end=35))
    assert [row["rounds"] for row in rule.history] == [10, 20, 30, 35] and rule.best_round == 10


def _train_with_observer(boosting, table, rounds=40, eval_every=10, patience=None):
    """LightGBM with the rule and an observer that keeps the raw validation scores of the model as
    it stood at every evaluation point."""
    config = TreeConfig(boosting=boosting, rate=0.5 if boosting == "dart" else None, num_leaves=7, rounds=rounds)
    params = config.params(table.num_classes, table.train.X.shape[1])
    train_set = lightgbm.Dataset(table.train.X, table.train.y, free_raw_data=False)
    val_set = lightgbm.Dataset(table.val.X, table.val.y, reference=train_set)
    seen = {}

    def observe(env):
        if (env.iteration + 1) % eval_every == 0:
            seen[env.iteration + 1] = env.model.predict(table.val.X, raw_score=True)

    rule = BestSnapshot(eval_every, patience, config.rate)
    final = lightgbm.train(params, train_set, rounds, valid_sets=[train_set, val_set], valid_names=["train", "val"],
                           callbacks=[rule, observe])
    return rule, final, seen


def test_dart_snapshot_is_the_scored_model_and_truncation_is_not():
    table = _table(noise=3.0)
    rule, final, seen = _train_with_observer("dart", table)
    snapshot = lightgbm.Booster(model_str=rule.best_model)
    np.testing.assert_array_equal(snapshot.predict(table.val.X, raw_score=True), seen[rule.best_round])
    # DART re-weights old trees, so the final model cut to 10 rounds is not the model scored at round 10
    truncated = final.predict(table.val.X, raw_score=True, num_iteration=10)
    assert np.abs(truncated - seen[10]).max() > 1e-3


def test_plain_boosting_snapshot_agrees_with_truncation():
    table = _table(noise=3.0)
    _, final, seen = _train_with_observer("gbdt", table)
    np.testing.assert_allclose(final.predict(table.val.X, raw_score=True, num_iteration=10), seen[10], atol=1e-9)


def test_fit_returns_the_snapshot_after_patience():
    table = _table(noise=4.0)
    config = TreeConfig(boosting="dart", rate=0.3, rounds=300, eval_every=2, patience=2, num_leaves=7,
                        learning_rate=0.5)
    result = fit(config, table)
    assert result.rounds_trained < 300  # noisy blobs: validation accuracy stops improving long before
    best_val = max(row["val_acc"] for row in result.history)
    best_rows = [row["rounds"] for row in result.history if row["val_acc"] == best_val]
    assert result.best_round == best_rows[0]
    assert result.rounds_trained == result.history[-1]["rounds"] == result.best_round + 2 * 2
    assert result.booster.num_trees() == result.best_round * table.num_classes
    val_acc = float((result.booster.predict(table.val.X).argmax(1) == table.val.y).mean())
    assert val_acc == best_val


def test_without_validation_every_round_is_trained_and_the_last_model_returned():
    table = _table()
    empty = Part(table.val.X[:0], table.val.y[:0])
    result = fit(TreeConfig(boosting="dart", rate=0.1, rounds=12, eval_every=5, num_leaves=7, patience=1),
                 Table("t", table.train, empty, table.test, table.features, table.classes))
    assert result.best_round is None and result.rounds_trained == 12
    assert result.booster.num_trees() == 12 * 3 and result.history[-1]["val_acc"] is None


# -- summaries and the command --------------------------------------------------------------------

def _run(label, boosting, rate, seed, test, val, train=1.0):
    final = {"train_acc": train, "train_eval_acc": train, "val_acc": val, "test_acc": test, "gap": train - test,
             "fit_seconds": 2.0 if boosting == "dart" else 1.0, "seconds_per_round": 0.1, "best_round": 10,
             "rounds_trained": 10}
    return {"label": label, "seed": seed, "config": {"boosting": boosting, "rate": rate},
            "history": [{"p": rate, "seconds": 1.0}], "final": final}


def test_summary_states_only_differences_beyond_the_noise():
    runs = [_run("none", "gbdt", None, s, 0.80, 0.80) for s in range(3)]
    runs += [_run("dart:0.1", "dart", 0.1, s, t, 0.85, train=0.95) for s, t in enumerate((0.84, 0.85, 0.86))]
    runs += [_run("dart:0.3", "dart", 0.3, s, t, 0.81) for s, t in enumerate((0.78, 0.80, 0.82))]
    summary = summarise_trees(runs)
    rows = {row["label"]: row for row in summary["settings"]}
    assert summary["baseline"] == "none" and summary["best_on_validation"] == "dart:0.1"
    assert rows["dart:0.1"]["test_acc"] == pytest.approx(0.85) and rows["dart:0.1"]["time_ratio"] == 2.0
    text = "\n".join(summary["statements"])
    assert "dart:0.1: test accuracy 85.00% ± 1.00 against 80.00% ± 0.00 for none (higher by 5.00 points, beyond the noise" in text
    assert "dart:0.3: test accuracy 80.00% ± 2.00 against 80.00% ± 0.00 for none (+0.00 points, within the noise" in text
    assert "dart:0.1, beats plain boosting on test accuracy and train-test gap by more than the noise" in text


def test_summary_says_plainly_when_dart_does_not_beat_boosting():
    runs = [_run("none", "gbdt", None, s, 0.80, 0.80) for s in range(2)]
    runs += [_run("dart:0.1", "dart", 0.1, s, t, 0.82) for s, t in enumerate((0.79, 0.81))]
    text = "\n".join(summarise_trees(runs)["statements"])
    assert "dart:0.1, does not beat plain boosting on test accuracy or the train-test gap" in text


def test_compare_cli_trains_trees_on_a_csv_and_writes_the_report(tmp_path, capsys):
    X, y = _blobs(n=300, noise=2.0)
    data = _write_csv(tmp_path / "blobs.csv", X, y)
    out = tmp_path / "out"
    code = main(["compare", "--model", "gbdt", "--reg", "none", "dart:0.2", "rf", "--data", str(data), "--target",
                 "label", "--seeds", "2", "--model-arg", "rounds=10", "--model-arg", "eval_every=5",
                 "--model-arg", "num_leaves=7", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["label"] for row in report["summary"]["settings"]] == ["none", "dart:0.2", "rf"]
    assert all(row["seeds"] == [0, 1] for row in report["summary"]["settings"])
    assert len(report["runs"]) == 6 and (out / "dart:0.2" / "seed=1" / "model.txt").is_file()
    assert report["summary"]["statements"][-1].startswith("DART's best rate on validation data, dart:0.2")
    page = (out / "report.html").read_text()
    assert "<img alt='Learning curves' src='data:image/png;base64," in page
    assert "Memory kept for backward (one batch): chart left out (every setting keeps the same memory)" in page
    printed = capsys.readouterr().out
    assert "dart:0.2" in printed and "report:" in printed


def test_table_from_file_caps_training_rows(tmp_path):
    X, y = _blobs(n=100)
    table = table_from_file(_write_csv(tmp_path / "b.csv", X, y), "label", limit_train=10)
    assert len(table.train) == 10 and len(table.val) == 20 and len(table.test) == 20


@pytest.mark.parametrize("extra, message", [
    (["--reg", "l2"], "argument --reg: for a tree model it must be among"),
    (["--reg", "dart:abc"], "must be a number in"),
    (["--reg", "none", "--lr", "0.5"], "--lr applies to networks, not to --model gbdt; use --model-arg learning_rate"),
    (["--reg", "none", "--model-arg", "depth=3"], "--model-arg depth: not a parameter of --model gbdt"),
    (["--p", "0.1"], "--p sets a network's dropout rate"),
    (["--reg", "none", "--data", "x.csv"], "--data needs --target"),
])
def test_compare_cli_errors_for_tree_models(extra, message, capsys):
    assert main(["compare", "--model", "gbdt", *extra]) == 2
    assert message in capsys.readouterr().err


def test_network_compare_refuses_tree_settings(capsys):
    assert main(["compare", "--model", "tutorial_mlp", "--reg", "dart:0.1", "--epochs", "1"]) == 2
    assert "argument --reg: must be among" in capsys.readouterr().err


# -- the DART sweep -------------------------------------------------------------------------------

def test_sweep_lattice_starts_above_zero_and_continuous_search_needs_a_positive_low(tmp_path):
    from dropkit.lab.tree_sweep import TreeSweepConfig

    cfg = TreeSweepConfig(TreeConfig(), tmp_path, rate_range=(0.0, 0.52), rate_step=0.05)
    assert cfg.lattice() == (0.05, 0.5, 0.05)
    with pytest.raises(ValueError, match="needs --p-range LOW > 0"):
        TreeSweepConfig(TreeConfig(), tmp_path, rate_range=(0.0, 0.5), rate_step=None).validate()
    with pytest.raises(ValueError, match="--pruner must be one of"):
        TreeSweepConfig(TreeConfig(), tmp_path, pruner="asha").validate()


def test_sweep_reporter_prunes_a_trial_at_its_first_evaluation():
    optuna = pytest.importorskip("optuna")
    from dropkit.lab.tree_sweep import _Reporter

    class AlwaysPrune:
        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return True

    trial = AlwaysPrune()
    with pytest.raises(optuna.TrialPruned, match="after 5 rounds"):
        fit(TreeConfig(boosting="dart", rate=0.1, rounds=20, eval_every=5, num_leaves=7, patience=None), _table(),
            callbacks=lambda snapshot: [_Reporter(trial, snapshot.history)])
    assert [step for step, _ in trial.reported] == [1]


def test_sweep_cli_searches_dart_rates_on_a_csv(tmp_path, capsys):
    X, y = _blobs(n=240, noise=2.0)
    data = _write_csv(tmp_path / "blobs.csv", X, y)
    out = tmp_path / "sweep"
    code = main(["sweep", "--model", "gbdt", "--data", str(data), "--target", "label", "--trials", "3",
                 "--pruner", "median", "--p-range", "0", "0.3", "--p-step", "0.1", "--model-arg", "rounds=6",
                 "--model-arg", "eval_every=2", "--model-arg", "num_leaves=7", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["trials"]) == 3 and summary["pruner"] == "median"
    assert all(t["drop_rate"] in (0.1, 0.2, 0.3) for t in summary["trials"])
    complete = [t for t in summary["trials"] if t["state"] == "complete"]
    assert summary["best"]["val_acc"] == max(t["val_acc"] for t in complete)
    assert "best on validation: trial" in capsys.readouterr().out
    assert main(["sweep", "--model", "gbdt", "--workers", "2", "--out", str(out)]) == 2
    assert "--workers applies to network sweeps" in capsys.readouterr().err


def test_compare_without_lightgbm_names_the_extra(tmp_path, monkeypatch, capsys):
    X, y = _blobs(n=60)
    data = _write_csv(tmp_path / "b.csv", X, y)
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    assert main(["compare", "--model", "gbdt", "--reg", "none", "--data", str(data), "--target", "label",
                 "--out", str(tmp_path / "out")]) == 2
    assert "tree models need the package lightgbm: pip install 'dropkit[trees]'" in capsys.readouterr().err


def test_tree_options_keep_a_seeds_flag_the_command_already_has():
    import argparse

    from dropkit.lab.commands.trees import add_tree_options

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    add_tree_options(parser)
    args = parser.parse_args(["--data", "t.csv", "--target", "y"])
    assert (args.seeds, args.data, args.target) == (5, "t.csv", "y")
