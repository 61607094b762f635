"""Callbacks: code that :func:`dropkit.lab.train.train` runs at fixed points of every run.

A callback is any object with some of these methods; the loop calls those it has, in the order
the callbacks were given, at these points::

    cb.on_train_begin(model, total_steps, total_epochs)   # once, before the first step
    for epoch in range(first_epoch, epochs):              # 0-based; a resumed run starts later
        for batch in batches:                             # step counts from 0 across epochs
            cb.on_step_begin(model, step, epoch)          # before the forward pass
            ...                                           # forward, backward, optimiser step
            cb.on_step_end(model, step, epoch)            # after the step (and max-norm)
        cb.on_epoch_end(model, epoch, row)                # the epoch's metrics row, complete
        ...                                               # metrics.jsonl and the checkpoint
        cb.on_checkpoint(path, epoch)                     # after the checkpoint is written
    cb.on_train_end(model, history)                       # after the last epoch

``total_steps`` and ``total_epochs`` span the planned run (``planned_epochs``). This is the
interface of :class:`dropkit.schedule.ScheduleCallback` and
:class:`dropkit.schedule.OverfitController`, which the loop itself adds for ``drop_schedule`` and
``rate="auto"``, before any callback given to it. ``on_epoch_end`` must not change ``row``.

A callback may end a run early at an epoch's end: after ``on_epoch_end`` its ``stop_requested``
attribute, when true, makes the loop write that epoch's metrics and checkpoint and return (in a
distributed run, a request on any rank stops every rank). Such a run can be resumed later as
if it had been given fewer epochs. On ``on_checkpoint`` the file is complete; ``on_checkpoint``
is not called on a run without an output folder, nor on ranks other than 0.

Callbacks run in the training process; a data-parallel run started by
:func:`dropkit.lab.distributed.launch` takes them to every rank's process pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from dropkit.lab import distributed

__all__ = ["Callback", "CallbackList", "EpochLines"]

HOOKS = ("on_train_begin", "on_step_begin", "on_step_end", "on_epoch_end", "on_checkpoint", "on_train_end")


class Callback:
    """A base class for callbacks of :func:`dropkit.lab.train.train`: every hook does nothing, so
    a subclass overrides only those it needs (see the module docstring for when each runs).

    Example::

        class PrintValidation(Callback):
            def on_epoch_end(self, model, epoch, row):
                print(epoch + 1, row["val_acc"])

        train(TrainConfig(epochs=3), callbacks=[PrintValidation()])
    """

    #: set to True (in ``on_epoch_end``) to end the run after the current epoch
    stop_requested: bool = False

    def on_train_begin(self, model: nn.Module, total_steps: int, total_epochs: int) -> None:
        """Once, before the first step (of a fresh or resumed run)."""

    def on_step_begin(self, model: nn.Module, step: int, epoch: int) -> None:
        """Before each step's forward pass; ``step`` counts from 0 over the whole run."""

    def on_step_end(self, model: nn.Module, step: int, epoch: int) -> None:
        """After each optimiser step (and the max-norm projection)."""

    def on_epoch_end(self, model: nn.Module, epoch: int, row: dict[str, Any]) -> None:
        """After epoch ``epoch`` (0-based) with its metrics row, before the row is written."""

    def on_checkpoint(self, path: Path, epoch: int) -> None:
        """After the checkpoint holding epoch ``epoch`` (0-based) was written to ``path``."""

    def on_train_end(self, model: nn.Module, history: list[dict[str, Any]]) -> None:
        """After the last epoch, with every epoch's metrics row."""


class CallbackList:
    """Calls a hook on every callback that has it, in order; ``stop_requested`` is any one's."""

    def __init__(self, callbacks: Sequence[Any]) -> None:
        for cb in callbacks:
            if not any(callable(getattr(cb, hook, None)) for hook in HOOKS):
                raise TypeError(f"callbacks must have at least one of the methods {', '.join(HOOKS)}, "
                                f"got {type(cb).__name__}")
        self.callbacks = list(callbacks)

    def call(self, hook: str, *args: Any) -> None:
        """Run ``hook(*args)`` on each callback that defines it."""
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is not None:
                method(*args)

    @property
    def stop_requested(self) -> bool:
        return any(getattr(cb, "stop_requested", False) for cb in self.callbacks)


class EpochLines(Callback):
    """Prints one line per finished epoch (validation and test accuracy, seconds), flushed, on
    rank 0: progress that shows in a log file or a pipe, where a progress bar does not.

    Args:
        prefix: what each line starts with, e.g. the run's name.
        epochs: the run's length, shown as ``epoch 3/10`` (None: just the epoch).
    """

    def __init__(self, prefix: str, epochs: int | None = None) -> None:
        self.prefix, self.epochs = prefix, epochs

    def on_epoch_end(self, model: nn.Module, epoch: int, row: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        val = "-" if row["val_acc"] is None else f"{100 * row['val_acc']:.2f}%"
        total = f"/{self.epochs}" if self.epochs is not None else ""
        print(f"{self.prefix}: epoch {row['epoch']}{total}  val acc {val}  test acc {100 * row['test_acc']:.2f}%  "
              f"{row['seconds']:.2f} s", flush=True)
