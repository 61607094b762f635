"""dropkit.lab.train's callbacks: when each hook runs, what it is given, and ending a run early."""

from __future__ import annotations

import pytest

from dropkit.lab.train import CHECKPOINT, Callback, TrainConfig, iter_metrics, train

#: 600 examples in batches of 128: 5 steps an epoch
TINY = dict(limit_train=600, limit_test=200, val_size=200, epochs=3)
TIMINGS = ("seconds", "eval_seconds", "peak_rss_mib")


def figures(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in history]


class Recorder(Callback):
    """Records every hook call as a tuple; optionally requests a stop after epoch ``stop_after`` (0-based)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.stop_after = stop_after

    def on_train_begin(self, model, total_steps, total_epochs):
        self.calls.append(("begin", total_steps, total_epochs))

    def on_step_begin(self, model, step, epoch):
        self.calls.append(("step_begin", step, epoch))

    def on_step_end(self, model, step, epoch):
        self.calls.append(("step_end", step, epoch))

    def on_epoch_end(self, model, epoch, row):
        self.calls.append(("epoch_end", epoch, row["epoch"]))
        self.stop_requested = epoch == self.stop_after

    def on_checkpoint(self, path, epoch):
        self.calls.append(("checkpoint", path.name, epoch, path.exists()))

    def on_train_end(self, model, history):
        self.calls.append(("end", len(history)))


def test_hooks_run_in_order_with_steps_counted_over_the_run(tmp_path):
    recorder = Recorder()
    train(TrainConfig(**TINY), tmp_path, quiet=True, callbacks=[recorder])
    expected = [("begin", 15, 3)]
    for epoch in range(3):
        for step in range(5 * epoch, 5 * epoch + 5):
            expected += [("step_begin", step, epoch), ("step_end", step, epoch)]
        expected += [("epoch_end", epoch, epoch + 1), ("checkpoint", CHECKPOINT, epoch, True)]
    assert recorder.calls == expected + [("end", 3)]


def test_without_an_output_folder_there_is_no_checkpoint_hook():
    recorder = Recorder()
    train(TrainConfig(**{**TINY, "epochs": 1}), quiet=True, callbacks=[recorder])
    assert [c for c in recorder.calls if c[0] == "checkpoint"] == []
    assert recorder.calls[-2:] == [("epoch_end", 0, 1), ("end", 1)]


def test_a_stop_request_ends_the_run_after_its_epoch_and_the_run_resumes_to_the_same_figures(tmp_path):
    straight = train(TrainConfig(**TINY), quiet=True)
    stopped = train(TrainConfig(**TINY), tmp_path, quiet=True, callbacks=[Recorder(stop_after=0)])
    assert [row["epoch"] for row in stopped.history] == [1]
    assert [row["epoch"] for row in iter_metrics(tmp_path)] == [1]
    resumed = train(TrainConfig(**TINY), tmp_path, resume=True, quiet=True)
    assert figures(resumed.history) == figures(straight.history)


def test_a_callback_without_any_hook_is_refused():
    with pytest.raises(TypeError, match="callbacks must have at least one of the methods on_train_begin"):
        train(TrainConfig(**TINY), quiet=True, callbacks=[object()])
