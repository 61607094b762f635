"""dropkit.lab.sealed_files: a damaged checkpoint is named and never trained on; the previous one
is resumed from, to the uninterrupted run's figures; with none left the run stops with an error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dropkit.lab import sealed_files
from dropkit.lab.sealed_files import CHECKPOINT, PREVIOUS, CheckpointError, checksum
from dropkit.lab.cli import main
from dropkit.lab.train import TrainConfig, iter_metrics, train

SMALL = TrainConfig(limit_train=600, limit_test=200, val_size=200, epochs=3)
TIMINGS = ("seconds", "eval_seconds", "peak_rss_mib")


def figures(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in history]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 3-epoch run every resumed one must reproduce."""
    return train(SMALL, tmp_path_factory.mktemp("straight"), quiet=True)


def _two_epochs(folder):
    """The first 2 epochs of SMALL in ``folder``: checkpoint.pt holds epoch 2, checkpoint.prev.pt epoch 1."""
    train(dataclasses.replace(SMALL, epochs=2), folder, quiet=True)
    assert torch.load(folder / CHECKPOINT, weights_only=True)["epoch"] == 2
    assert torch.load(folder / PREVIOUS, weights_only=True)["epoch"] == 1


def flip_weight_byte(path):
    """Flip the top exponent bit of one weight of the first layer inside the saved file (a weight
    of 1e-2 becomes about 1.7e36: the kind of damage that used to resume silently)."""
    state = torch.load(path, weights_only=True)
    weight = state["model"]["1.weight"]
    raw = path.read_bytes()
    start = raw.find(weight.flatten()[:16].numpy().tobytes())
    assert start > 0
    damaged = bytearray(raw)
    damaged[start + 3] ^= 0x40  # little-endian float32: byte 3 holds the sign and the top exponent bits
    path.write_bytes(bytes(damaged))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["1.weight"], weight)


def test_a_flipped_byte_is_detected_and_named(tmp_path):
    _two_epochs(tmp_path)
    flip_weight_byte(tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match=f"{tmp_path / CHECKPOINT}: damaged checkpoint: its contents"):
        sealed_files.load(tmp_path / CHECKPOINT)


def test_a_damaged_checkpoint_resumes_from_the_previous_one_to_the_same_figures(tmp_path, straight, capsys):
    _two_epochs(tmp_path)
    flip_weight_byte(tmp_path / CHECKPOINT)
    resumed = train(SMALL, tmp_path, resume=True, quiet=True)
    err = capsys.readouterr().err
    assert f"{tmp_path / CHECKPOINT}: damaged checkpoint" in err and f"resuming from {tmp_path / PREVIOUS} (epoch 1)" in err
    assert figures(resumed.history) == figures(straight.history)
    assert figures(list(iter_metrics(tmp_path))) == figures(straight.history)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                  straight.model.state_dict().values()))


def test_a_changed_config_inside_a_checkpoint_is_detected(tmp_path):
    _two_epochs(tmp_path)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    state["config"]["lr"] = 0.5  # edited without resealing
    torch.save(state, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="its config does not match its config checksum"):
        sealed_files.load(tmp_path / CHECKPOINT)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "not a checkpoint"])
def test_with_no_good_checkpoint_left_the_run_stops_naming_each_file(tmp_path, damage):
    _two_epochs(tmp_path)
    for path in (tmp_path / CHECKPOINT, tmp_path / PREVIOUS):
        raw = path.read_bytes()
        if damage == "not a checkpoint":
            torch.save({"weights": torch.zeros(3)}, path)
        else:
            path.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "garbage": b"\x89garbage" * 50}[damage])
    with pytest.raises(CheckpointError) as err:
        train(SMALL, tmp_path, resume=True, quiet=True)
    message = str(err.value)
    assert message.startswith(f"no usable checkpoint in {tmp_path}")
    assert str(tmp_path / CHECKPOINT) in message and str(tmp_path / PREVIOUS) in message


def test_the_command_reports_a_damaged_checkpoint_in_one_line(tmp_path, capsys):
    args = ["train", "--epochs", "1", "--limit-train", "300", "--limit-test", "100", "--val-size", "100", "--quiet",
            "--out", str(tmp_path)]
    assert main(args) == 0
    (tmp_path / "p=0.5" / CHECKPOINT).write_bytes(b"")
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dropkit train: error: no usable checkpoint in ")
    assert "Traceback" not in err and "cannot be read" in err


def test_a_kill_between_the_two_renames_resumes_from_the_previous_one(tmp_path, straight):
    """save() moves checkpoint.pt aside before renaming the new one into place: a kill in between
    leaves only checkpoint.prev.pt, which a resumed run picks up."""
    _two_epochs(tmp_path)
    (tmp_path / CHECKPOINT).unlink()
    resumed = train(SMALL, tmp_path, resume=True, quiet=True)
    assert figures(resumed.history) == figures(straight.history)


def test_a_fresh_run_clears_the_checkpoints_of_the_run_it_overwrites(tmp_path):
    _two_epochs(tmp_path)
    train(dataclasses.replace(SMALL, epochs=1, seed=5), tmp_path, quiet=True)
    assert not (tmp_path / PREVIOUS).exists()  # epoch 1 of the old run would otherwise be kept as "previous"
    assert sealed_files.load(tmp_path / CHECKPOINT)["config"]["seed"] == 5


def test_checksum_follows_contents_not_order():
    state = {"a": torch.arange(4.0), "b": [1, 2.5, None, True, "x"], "c": {0: torch.zeros(2, dtype=torch.bfloat16)}}
    assert checksum(state) == checksum(dict(reversed(list(state.items()))))
    changed = [
        {**state, "a": torch.tensor([0.0, 1.0, 2.0, 3.0000002])},
        {**state, "a": torch.arange(4.0).double()},
        {**state, "a": torch.arange(4.0).reshape(2, 2)},
        {**state, "b": [1, 2.5, None, 1, "x"]},  # True is not 1
        {**state, "b": [1, 2.5, None, True, "y"]},
        {**state, "c": {1: torch.zeros(2, dtype=torch.bfloat16)}},
    ]
    assert len({checksum(state), *map(checksum, changed)}) == 1 + len(changed)
    with pytest.raises(TypeError, match="cannot hold a object"):
        checksum({"x": object()})
