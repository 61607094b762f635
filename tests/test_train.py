"""dropkit.lab.train: repeatable and resumable runs, the metrics and files written, max-norm, settings."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from dropkit.lab import data
from dropkit.lab import train as training
from dropkit.lab.train import loop
from dropkit.lab.cli import main
from dropkit.lab.models import build_model
from dropkit.lab.train import (
    TrainConfig, apply_max_norm, evaluate, hidden_linears, iter_metrics, load_splits, ramped_momentum, train,
)

#: a small MNIST slice: a run of 2 epochs takes well under a second
SMALL = dict(limit_train=2000, limit_test=500, val_size=500, epochs=2)
#: metrics that measure the machine, not the run: they legitimately differ between equal runs
TIMINGS = ("seconds", "eval_seconds", "peak_rss_mib")


def figures(history: list[dict]) -> list[dict]:
    """The per-epoch metrics that a repeated or resumed run must reproduce exactly."""
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in history]


def test_same_seed_same_figures_other_seed_other_figures():
    first = train(TrainConfig(**SMALL), quiet=True)
    again = train(TrainConfig(**SMALL), quiet=True)
    other = train(TrainConfig(**SMALL, seed=1), quiet=True)
    assert figures(first.history) == figures(again.history)
    assert figures(first.history) != figures(other.history)


def test_a_short_run_learns_and_reports_every_metric():
    result = train(TrainConfig(**SMALL, p=0.2), quiet=True)
    assert [row["epoch"] for row in result.history] == [1, 2]
    final = result.final
    assert final["test_acc"] > 0.8 and final["val_acc"] > 0.8  # chance is 0.1; 32 Adam steps on MNIST give ~0.85
    assert final["train_loss"] < result.history[0]["train_loss"]
    assert final["gap"] == pytest.approx(final["train_eval_acc"] - final["test_acc"])
    assert final["p"] == 0.2 and final["lr"] == 1e-3
    assert final["seconds"] > 0 and final["peak_rss_mib"] > 50 and final["saved_mib"] > 0
    assert not result.model.training
    train_part, _, test = load_splits("mnist", None, 500, 2000, 500)
    assert evaluate(result.model, test) == (pytest.approx(final["test_loss"]), final["test_acc"])
    assert evaluate(result.model, train_part) == (pytest.approx(final["train_eval_loss"]), final["train_eval_acc"])


def test_unit_inputs_train_on_pixels_in_unit_range():
    config = TrainConfig(**SMALL, inputs="unit")
    train_part, val, test = load_splits("mnist", None, 500, 2000, 500, "unit")
    assert all(s.images.min() == 0 and s.images.max() == 1 for s in (train_part, val, test))
    standard, _, _ = load_splits("mnist", None, 500, 2000, 500)
    assert standard.images.min() < 0 and torch.equal(standard.labels, train_part.labels)
    result = train(config, quiet=True)
    assert result.final["test_acc"] > 0.5  # chance is 0.1; unscaled pixels learn slower than standardised ones
    assert evaluate(result.model, test) == (pytest.approx(result.final["test_loss"]), result.final["test_acc"])


def test_fusing_relu_dropout_changes_no_figure_and_keeps_less(monkeypatch):
    """train() fuses ReLU -> Dropout pairs; the same run unfused gives the very same figures."""
    config = TrainConfig(**SMALL, model="srivastava_mlp", model_kwargs={"width": 64, "depth": 2})
    fused = train(config, quiet=True)
    assert sum(type(m).__name__ == "ReLUDropout" for m in fused.model.modules()) == 2
    monkeypatch.setattr(loop, "fuse_relu_dropout", lambda model: 0)
    unfused = train(config, quiet=True)
    timings = ("saved_mib", *TIMINGS)
    assert [{k: v for k, v in row.items() if k not in timings} for row in fused.history] == \
        [{k: v for k, v in row.items() if k not in timings} for row in unfused.history]
    assert fused.final["saved_mib"] < unfused.final["saved_mib"]  # ReLU's outputs are no longer kept


def test_saved_for_backward_counts_activations_per_batch():
    def saved(batch_size: int) -> float:
        config = TrainConfig(**{**SMALL, "epochs": 1, "limit_train": 512}, batch_size=batch_size)
        return train(config, quiet=True).final["saved_mib"]

    small, large = saved(64), saved(128)
    assert small > 64 * 784 * 4 / 2**20  # at least the input batch, which the first Linear keeps
    assert large == pytest.approx(2 * small, rel=0.05)  # activations scale with the batch; weights are not counted


def test_out_dir_holds_config_metrics_result_and_a_loadable_checkpoint(tmp_path):
    result = train(TrainConfig(**SMALL), tmp_path, quiet=True)
    written = sorted(p.name for p in tmp_path.iterdir())
    # the last two checkpoints; no temporary or lock files left
    assert written == ["checkpoint.prev.pt", "checkpoint.pt", "config.json", "metrics.jsonl", "result.json"]
    assert json.loads((tmp_path / "config.json").read_text()) == TrainConfig(**SMALL).to_dict()
    assert list(iter_metrics(tmp_path)) == result.history
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["final"] == result.final and summary["epochs"] == 2
    assert summary["best_val"]["val_acc"] == max(row["val_acc"] for row in result.history)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["history"] == result.history
    model = build_model("tutorial_mlp")
    model.load_state_dict(state["model"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), result.model.state_dict().values()))


def test_resume_extends_a_finished_run_to_the_uninterrupted_figures(tmp_path):
    straight = train(TrainConfig(**SMALL), tmp_path / "a", quiet=True)
    train(TrainConfig(**{**SMALL, "epochs": 1}), tmp_path / "b", quiet=True)
    resumed = train(TrainConfig(**SMALL), tmp_path / "b", resume=True, quiet=True)
    assert figures(resumed.history) == figures(straight.history)
    assert figures(list(iter_metrics(tmp_path / "b"))) == figures(straight.history)


class Killed(Exception):
    """Stands for the process being killed in the middle of an epoch."""


class KillInSecondEpoch(training.Callback):
    """Raises :class:`Killed` after the first step of the second epoch: the weights have moved
    past the last checkpoint."""

    def on_step_end(self, model, step, epoch):
        if epoch == 1:
            raise Killed


@pytest.mark.parametrize(
    "settings",
    [
        dict(optimizer="nesterov", lr=0.05, schedule="cosine", max_norm=2.0),
        dict(optimizer="adamw", weight_decay=0.01, schedule="step", step_epochs=1, step_gamma=0.5),
        dict(model="lstm", model_kwargs={"hidden": 16, "layers": 1, "p_weight": 0.3}, limit_train=300),
        dict(optimizer="nesterov", lr=0.05, momentum=0.95, momentum_start=0.5, momentum_ramp=2),
        dict(optimizer="nesterov", lr=0.05, schedule="cosine", epochs=3, average_from=1),
    ],
    ids=["sgd-cosine-maxnorm", "adamw-step", "lstm-weightdrop", "momentum-ramp", "weight-average"],
)
def test_resume_after_a_kill_ends_where_the_uninterrupted_run_ends(tmp_path, settings):
    config = TrainConfig(**{**SMALL, "limit_train": 1000, **settings})
    straight = train(config, tmp_path / "straight", quiet=True)
    with pytest.raises(Killed):
        train(config, tmp_path / "killed", quiet=True, callbacks=[KillInSecondEpoch()])
    assert len(list(iter_metrics(tmp_path / "killed"))) == 1
    torch.manual_seed(12345)  # a resumed process starts from some other random state
    resumed = train(config, tmp_path / "killed", resume=True, quiet=True)
    assert figures(resumed.history) == figures(straight.history)


def test_a_planned_run_stopped_early_resumes_to_the_full_runs_figures(tmp_path):
    """With planned_epochs the cosine lr and the curriculum ramp span the planned run, so its
    first epochs, resumed, give exactly the uninterrupted run (what a sweep's rungs rely on)."""
    settings = dict(SMALL, epochs=3, limit_train=600, schedule="cosine", drop_schedule="curriculum")
    whole = train(TrainConfig(**settings), quiet=True)
    train(TrainConfig(**{**settings, "epochs": 1}, planned_epochs=3), tmp_path, quiet=True)
    resumed = train(TrainConfig(**settings, planned_epochs=3), tmp_path, resume=True, quiet=True)
    assert figures(resumed.history) == figures(whole.history)
    with pytest.raises(ValueError, match=r"planned_epochs must be >= epochs \(3\), got 2"):
        TrainConfig(**settings, planned_epochs=2).validate()


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    resumed = train(TrainConfig(**SMALL), tmp_path, resume=True, quiet=True)
    assert figures(resumed.history) == figures(train(TrainConfig(**SMALL), quiet=True).history)


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    train(TrainConfig(**SMALL), tmp_path, quiet=True)
    with pytest.raises(ValueError, match=r"lr: 0\.001 -> 0\.01"):
        train(TrainConfig(**SMALL, lr=0.01), tmp_path, resume=True, quiet=True)
    with pytest.raises(ValueError, match="already holds 2 epochs"):
        train(TrainConfig(**{**SMALL, "epochs": 1}), tmp_path, resume=True, quiet=True)
    with pytest.raises(ValueError, match="out_dir"):
        train(TrainConfig(**SMALL), resume=True, quiet=True)
    cosine = tmp_path / "cosine"
    train(TrainConfig(**{**SMALL, "epochs": 1}, schedule="cosine"), cosine, quiet=True)
    with pytest.raises(ValueError, match="cosine"):
        train(TrainConfig(**SMALL, schedule="cosine"), cosine, resume=True, quiet=True)


def test_a_checkpoint_from_before_a_config_field_existed_resumes_with_its_default(tmp_path):
    config = TrainConfig(**{**SMALL, "epochs": 1})
    train(config, tmp_path, quiet=True)
    path = tmp_path / training.CHECKPOINT
    state = torch.load(path, weights_only=True)
    for newer in ("inputs", "momentum_ramp", "momentum_start"):
        del state["config"][newer]
    for seal in ("checksum", "config_checksum"):  # checkpoints of that time carried no checksums either
        del state[seal]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"inputs: 'standard' -> 'unit'"):
        train(dataclasses.replace(config, epochs=2, inputs="unit"), tmp_path, resume=True, quiet=True)
    resumed = train(dataclasses.replace(config, epochs=2), tmp_path, resume=True, quiet=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2]


def test_weight_average_is_the_mean_of_the_epochs_weights_and_is_scored_from_its_epoch():
    settings = dict(SMALL, epochs=3, limit_train=600, optimizer="nesterov", lr=0.05, schedule="cosine",
                    average_from=2)
    # the first 2 epochs of the same run (planned_epochs keeps its cosine)
    at_two = train(TrainConfig(**{**settings, "epochs": 2}, planned_epochs=3), quiet=True)
    at_three = train(TrainConfig(**settings), quiet=True)
    # one average so far: the epoch-2 weights themselves, scored as the model is
    for name, value in at_two.model.state_dict().items():
        assert torch.equal(at_two.averaged.module.state_dict()[name], value)
    assert at_two.history[1]["avg_test_acc"] == at_two.history[1]["test_acc"]
    # two: the mean of epoch 2's and epoch 3's weights, which differ
    for name, value in at_three.model.state_dict().items():
        before = at_two.model.state_dict()[name]
        expected = (before + value) / 2
        assert torch.allclose(at_three.averaged.module.state_dict()[name], expected, atol=1e-6)
    assert not torch.equal(at_three.model.state_dict()["1.weight"], at_two.model.state_dict()["1.weight"])
    assert "avg_test_acc" not in at_three.history[0]
    _, acc = evaluate(at_three.averaged.module, load_splits("mnist", None, 500, 600, 500)[2])
    assert at_three.history[2]["avg_test_acc"] == acc
    assert {"avg_train_eval_acc", "avg_val_loss", "avg_val_acc", "avg_test_loss"} <= set(at_three.history[2])
    assert train(TrainConfig(**SMALL), quiet=True).averaged is None


@pytest.mark.parametrize(
    ("settings", "lrs"),
    [
        (dict(schedule="none"), [0.1, 0.1, 0.1]),
        (dict(schedule="cosine"), [0.1, 0.075, 0.025]),
        (dict(schedule="step", step_epochs=2, step_gamma=0.5), [0.1, 0.1, 0.05]),
    ],
)
def test_learning_rate_schedules(settings, lrs):
    config = TrainConfig(**{**SMALL, "epochs": 3, "limit_train": 256}, optimizer="sgd", lr=0.1, **settings)
    assert [row["lr"] for row in train(config, quiet=True).history] == pytest.approx(lrs)


def test_momentum_ramp_rises_linearly_then_holds():
    config = TrainConfig(**{**SMALL, "epochs": 4, "limit_train": 256}, optimizer="nesterov", lr=0.05,
                         momentum=0.9, momentum_start=0.6, momentum_ramp=2)
    assert [ramped_momentum(config, epoch) for epoch in (1, 2, 3, 4)] == pytest.approx([0.6, 0.75, 0.9, 0.9])
    result = train(config, quiet=True)
    assert [row["momentum"] for row in result.history] == pytest.approx([0.6, 0.75, 0.9, 0.9])
    assert "momentum" not in train(dataclasses.replace(config, momentum_ramp=0), quiet=True).history[0]


def test_momentum_ramp_changes_the_run():
    config = TrainConfig(**{**SMALL, "epochs": 1, "limit_train": 256}, optimizer="sgd", lr=0.05, momentum=0.9)
    ramped = dataclasses.replace(config, momentum_start=0.0, momentum_ramp=5)
    assert figures(train(config, quiet=True).history) != figures(train(ramped, quiet=True).history)


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adam", "adamw"])
def test_every_optimizer_trains(optimizer):
    lr = 1e-3 if optimizer.startswith("adam") else 0.05
    result = train(TrainConfig(**{**SMALL, "epochs": 1}, optimizer=optimizer, lr=lr, weight_decay=1e-4), quiet=True)
    assert result.final["test_acc"] > 0.7


def test_apply_max_norm_caps_long_rows_and_leaves_short_ones():
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]]))
    apply_max_norm([layer], 1.0)
    assert torch.allclose(layer.weight, torch.tensor([[0.6, 0.8, 0.0], [0.3, 0.4, 0.0]]))


def test_max_norm_constrains_hidden_units_but_not_the_output_layer():
    config = TrainConfig(**{**SMALL, "epochs": 1}, model="srivastava_mlp", model_kwargs={"width": 64, "depth": 2},
                         optimizer="sgd", lr=0.5, max_norm=0.5)
    model = train(config, quiet=True).model
    hidden = hidden_linears(model)
    assert len(hidden) == 2 and model[-1] not in hidden
    assert all(layer.weight.norm(dim=1).max() <= 0.5 + 1e-5 for layer in hidden)
    assert model[-1].weight.norm(dim=1).max() > 0.5  # the output layer is free


def test_without_validation_set_val_figures_are_none(idx_folder):
    config = TrainConfig(dataset="fake", data_dir=str(idx_folder), val_size=0, epochs=1, batch_size=16)
    result = train(config, quiet=True)
    assert result.final["val_acc"] is None and result.best_val is None
    assert math.isfinite(result.final["test_loss"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("p", 1.5, r"p must be in \[0, 1\], got 1.5"),
        ("p", float("nan"), r"p must be in \[0, 1\]"),
        ("optimizer", "rmsprop", "optimizer must be one of sgd, nesterov, adam, adamw"),
        ("schedule", "linear", "schedule must be one of none, cosine, step"),
        ("inputs", "raw", "inputs must be one of standard, unit, got 'raw'"),
        ("lr", 0.0, "lr must be a finite number > 0"),
        ("momentum", 1.0, r"momentum must be in \[0, 1\)"),
        ("max_norm", -1.0, "max_norm must be a finite number > 0"),
        ("epochs", 0, "epochs must be >= 1"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("limit_train", 0, "limit_train must be >= 1"),
        ("val_size", -1, "val_size must be >= 0"),
        ("average_from", -1, r"average_from must be in \[0, 10\] \(an epoch of the run; 0: no weight average\), "
                             "got -1"),
        ("average_from", 11, r"average_from must be in \[0, 10\]"),
    ],
)
def test_bad_settings_are_refused_with_their_range(field, value, message):
    config = dataclasses.replace(TrainConfig(), **{field: value})
    with pytest.raises(ValueError, match=message):
        train(config, quiet=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(momentum_ramp=-1), "momentum_ramp must be >= 0 epochs, got -1"),
        (dict(optimizer="adam", momentum_ramp=5), "momentum_ramp applies to sgd and nesterov, not optimizer 'adam'"),
        (dict(optimizer="sgd", momentum=0.9, momentum_start=0.95, momentum_ramp=5),
         r"momentum_start must be in \[0, momentum=0.9\], got 0.95"),
        (dict(optimizer="nesterov", momentum_start=0.0, momentum_ramp=5), "nesterov needs momentum_start in"),
    ],
)
def test_bad_momentum_ramps_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings).validate()


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        TrainConfig(optimizer="nesterov", momentum=0.0).validate()


# --- the `dropkit train` command -------------------------------------------------------------

CLI_SMALL = ["--epochs", "1", "--limit-train", "1000", "--limit-test", "300", "--val-size", "300", "--quiet"]


def test_cli_trains_each_rate_and_prints_one_table(tmp_path, capsys):
    assert main(["train", "--p", "0", "0.5", *CLI_SMALL, "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:3] == ["p", "train", "acc"])
    assert [line.split()[0] for line in table[header + 1 : header + 3]] == ["0", "0.5"]
    assert {"test", "gap", "s/epoch"} <= set(table[header].split())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [run["final"]["p"] for run in summary["runs"]] == [0.0, 0.5]
    assert [run["out_dir"] for run in summary["runs"]] == [str(tmp_path / "p=0"), str(tmp_path / "p=0.5")]
    library = train(TrainConfig(p=0.5, epochs=1, limit_train=1000, limit_test=300, val_size=300), quiet=True)
    assert figures(list(iter_metrics(tmp_path / "p=0.5"))) == figures(library.history)  # same seed, same run
    assert f"{100 * library.final['test_acc']:.2f}%" in table[header + 2]


def test_cli_passes_model_arguments_and_resumes(tmp_path, capsys):
    args = ["train", "--model", "srivastava_mlp", "--model-arg", "width=32", "--model-arg", "depth=1",
            "--max-norm", "3", "--optimizer", "sgd", "--lr", "0.05", "--momentum-ramp", "4", "--momentum-start", "0.3",
            "--inputs", "unit",
            *CLI_SMALL, "--out", str(tmp_path)]
    assert main(args) == 0
    config = json.loads((tmp_path / "p=0.5" / "config.json").read_text())
    assert config["model_kwargs"] == {"width": 32, "depth": 1} and config["max_norm"] == 3.0
    assert (config["momentum_ramp"], config["momentum_start"], config["inputs"]) == (4, 0.3, "unit")
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    assert [row["epoch"] for row in iter_metrics(tmp_path / "p=0.5")] == [1, 2]


def test_cli_seeds_train_each_rate_with_each_seed_and_show_mean_and_spread(tmp_path, capsys):
    loud = [arg for arg in CLI_SMALL if arg != "--quiet"]
    assert main(["train", "--p", "0.5", "--seeds", "2", *loud, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert re.search(r"kernel warm-up: \d+\.\d\d s", captured.err)
    runs = [list(iter_metrics(tmp_path / "p=0.5" / f"seed={seed}")) for seed in (0, 1)]
    assert figures(runs[0]) != figures(runs[1])
    (line,) = [line for line in captured.out.splitlines() if line.split()[:1] == ["0.5"]]
    mean = (runs[0][-1]["test_acc"] + runs[1][-1]["test_acc"]) / 2
    assert f"{100 * mean:.2f}%±" in line and "seeds 0-1 (mean ± spread)" in captured.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--p", "0", "1.5"], r"argument --p: must be in \[0, 1\], got 1.5"),
        (["--lr", "-1"], r"argument --lr: must be in \(0, 1000\], got -1"),
        (["--momentum", "1"], r"argument --momentum: must be in \[0, 1\)"),
        (["--momentum-ramp", "-1"], "argument --momentum-ramp: must be an integer >= 0"),
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1"),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
        (["--model-arg", "width"], "argument --model-arg: expected KEY=VALUE"),
    ],
)
def test_cli_rejects_bad_arguments_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--p", "0.5", "0.5"], "--p values must differ"),
        (["--resume"], "--resume needs --out"),
        (["--optimizer", "nesterov", "--momentum", "0"], "nesterov needs momentum"),
        (["--model-arg", "widht=3"], "has no argument widht"),
        (["--dataset", "fashion-mnist"], "apt-get install dataset-fashion-mnist"),
    ],
)
def test_cli_reports_errors_without_a_traceback(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN", tmp_path / "absent")
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert main(["train", *CLI_SMALL, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dropkit train: error:") and message in err
