"""What a run measures every epoch, and the file it is kept in.

Every epoch :func:`dropkit.lab.train.train` records one row, also appended to ``metrics.jsonl``:

* ``train_loss``/``train_acc``: averaged over the epoch's batches *in training mode*, i.e. with
  dropout active (the network the optimiser actually sees);
* ``val_*`` and ``test_*``: in eval mode, every unit present; the validation set is carved out
  of the training set (:func:`dropkit.lab.data.split_validation`) and is what choices are made on,
  the test set gives the final figure;
* ``train_eval_loss``/``train_eval_acc``: in eval mode on a fixed subset of the training
  examples (the first :data:`TRAIN_EVAL_SIZE`): how well the network with every unit fits the
  data it learns from; ``train_acc`` cannot say this, since dropout lowers it by design;
* ``gap``: ``train_eval_acc - test_acc``, the generalisation gap dropout is meant to shrink (a
  network that fits its training data less well than another *and* scores lower on the test set
  underfits);
* ``lr``, ``p`` (the model's main dropout rate), ``seconds`` (the training pass; evaluation is
  ``eval_seconds``), and memory: ``peak_rss_mib``, the process's peak resident set size so far
  (``getrusage``; whole process: data, Python, torch; it never goes down, so it is an upper
  bound for any one run in a process that ran several), and ``saved_mib``, the tensors autograd
  keeps for backward in one training batch (activations and masks, parameters excluded),
  measured on the epoch's first batch: the part of memory that dropout's masks change;
* with ``average_from`` set, ``avg_train_eval_*``, ``avg_val_*`` and ``avg_test_*``: the same
  eval-mode figures for the running average of the weights (see :class:`~dropkit.lab.train.TrainConfig`),
  from that epoch on.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dropkit.lab import distributed
from dropkit.lab.atomic_files import atomic_write_text
from dropkit.lab.data import BatchIterator, Split

__all__ = [
    "EVAL_BATCH",
    "METRICS",
    "TRAIN_EVAL_SIZE",
    "SavedForBackward",
    "append_metrics",
    "check_finite",
    "epoch_row",
    "evaluate",
    "evaluate_all",
    "iter_metrics",
    "peak_rss_mib",
    "write_metrics",
]

METRICS = "metrics.jsonl"
EVAL_BATCH = 1000
#: training examples scored in eval mode every epoch (train_eval_acc): enough for a 0.2-point
#: standard error at 97 % accuracy, cheap next to the epoch itself
TRAIN_EVAL_SIZE = 10_000


class SavedForBackward:
    """Counts the bytes autograd saves for backward, once per storage, parameters excluded."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """A context in which every tensor saved for backward is counted (and kept as it is)."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``split`` in eval mode (every unit, no dropout); in a
    distributed run each rank scores its shard and the sums are reduced."""
    model.eval()
    part = split.shard(distributed.rank(), distributed.world_size())
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for x, y in BatchIterator(part, EVAL_BATCH, shuffle=False):
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    loss_sum, correct, n = distributed.all_reduce_sum([loss_sum, correct, len(part)])
    return loss_sum / n, correct / n


def evaluate_all(model: nn.Module, train_part: Split, val: Split, test: Split) -> dict[str, Any]:
    """Eval-mode loss and accuracy on part of the training set, the validation set (None when it is
    empty) and the test set."""
    start = time.perf_counter()
    train_loss, train_acc = evaluate(model, train_part)
    val_loss, val_acc = evaluate(model, val) if len(val) else (None, None)
    test_loss, test_acc = evaluate(model, test)
    return {"train_eval_loss": train_loss, "train_eval_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
            "test_loss": test_loss, "test_acc": test_acc, "eval_seconds": time.perf_counter() - start}


def check_finite(epoch: int, row: dict[str, Any], optimizer: str, lr: float) -> None:
    """Stop a run whose training loss is no longer a number (NaN or infinite): it has diverged,
    and every later figure would be meaningless.

    Raises:
        ValueError: naming the epoch, the loss, the optimiser and the learning rate.
    """
    if not math.isfinite(row["train_loss"]):
        raise ValueError(f"training diverged in epoch {epoch}: the training loss is {row['train_loss']} "
                         f"(optimizer {optimizer}, lr {lr:g}; a smaller lr usually trains)")


def epoch_row(
    epoch: int, p: float, lr: float, fit: dict[str, float], scores: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """One line of metrics.jsonl, keys in reading order (see the module docstring for each one)."""
    return {
        "epoch": epoch, "p": p, "lr": lr,
        "train_loss": fit["train_loss"], "train_acc": fit["train_acc"],
        "train_eval_loss": scores["train_eval_loss"], "train_eval_acc": scores["train_eval_acc"],
        "val_loss": scores["val_loss"], "val_acc": scores["val_acc"],
        "test_loss": scores["test_loss"], "test_acc": scores["test_acc"],
        "gap": scores["train_eval_acc"] - scores["test_acc"],
        "seconds": seconds, "eval_seconds": scores["eval_seconds"],
        "peak_rss_mib": peak_rss_mib(), "saved_mib": fit["saved_mib"],
    }


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """Start ``out``'s ``metrics.jsonl`` with the rows of the epochs done (none for a fresh run), atomically."""
    atomic_write_text(out / METRICS, "".join(json.dumps(row) + "\n" for row in history))


def append_metrics(out: Path, row: dict[str, Any]) -> None:
    """Add one epoch's row to ``out``'s ``metrics.jsonl``."""
    with open(out / METRICS, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def iter_metrics(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (or of the file itself when given), one dict per epoch."""
    path = Path(path)
    with open(path / METRICS if path.is_dir() else path) as handle:
        for line in handle:
            yield json.loads(line)
