"""The training loop: one model, one dataset, one setting, measured every epoch and resumable.

:func:`train` is what ``dropkit train`` runs and what comparisons and sweeps call once per
setting. Each epoch's figures are described in :mod:`dropkit.lab.train.metrics`; callbacks
(:mod:`dropkit.lab.train.hooks`) see every step and epoch. A checkpoint
(:mod:`dropkit.lab.train.checkpoint`) is written atomically after every epoch, so ``resume=True``
after a kill ends with exactly the figures the uninterrupted run would have produced.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import dropkit
from dropkit import rng
from dropkit.concrete import (
    concrete_rates,
    concrete_regularisation,
    regularizer_weights,
    to_concrete,
)
from dropkit.convert import fuse_relu_dropout
from dropkit.lab import distributed, run_lock
from dropkit.lab.atomic_files import atomic_write_text
from dropkit.lab.data import (
    BatchIterator,
    Split,
    load_dataset,
    normalise,
    split_validation,
)
from dropkit.lab.models import IMAGE_SIDE, NUM_CLASSES, build_model, main_rate
from dropkit.lab.stats import steady_epoch_seconds
from dropkit.lab.train.averaging import WeightAverage
from dropkit.lab.train.checkpoint import (
    CHECKPOINT,
    RunState,
    clear_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from dropkit.lab.train.config import TrainConfig, model_p
from dropkit.lab.train.hooks import CallbackList
from dropkit.lab.train.metrics import (
    TRAIN_EVAL_SIZE,
    SavedForBackward,
    append_metrics,
    check_finite,
    epoch_row,
    evaluate_all,
    write_metrics,
)
from dropkit.lab.train.optim import (
    apply_max_norm,
    hidden_linears,
    make_optimizer,
    make_scheduler,
    ramped_momentum,
)
from dropkit.schedule import (
    CurriculumRamp,
    EarlyDropout,
    LateDropout,
    OverfitController,
    ScheduleCallback,
)

__all__ = ["MASK_STREAM", "SHUFFLE_STREAM", "VAL_SPLIT_SEED", "TrainResult", "load_splits", "train"]

#: sub-stream of the run's seed that shuffles the training batches (see dropkit.rng.derive_seed)
SHUFFLE_STREAM = 1
#: sub-stream that seeds torch's generator (and so the dropout masks) per (rank, epoch)
MASK_STREAM = 2
#: the validation split does not depend on the run's seed: every run is judged on the same examples
VAL_SPLIT_SEED = 0


@dataclass
class TrainResult:
    """A finished run: its config, one metrics dict per epoch, the trained model (left in eval mode),
    the folder it was written to (if any) and, with ``average_from`` reached, the averaged weights
    (an ``AveragedModel``: call it as the model, or take ``.module``)."""

    config: TrainConfig
    history: list[dict[str, Any]]
    model: nn.Module
    out_dir: Path | None = None
    averaged: AveragedModel | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics."""
        return self.history[-1]

    @property
    def best_val(self) -> dict[str, Any] | None:
        """The epoch with the highest validation accuracy (None without a validation set)."""
        if self.config.val_size == 0:
            return None
        return max(self.history, key=lambda row: row["val_acc"])

    def summary(self) -> dict[str, Any]:
        """What result.json holds: final figures, best validation epoch, seconds per epoch (the
        median of the epochs after the first, see :func:`dropkit.lab.stats.steady_epoch_seconds`)
        and the first epoch's seconds."""
        return {
            "config": self.config.to_dict(),
            "epochs": len(self.history),
            "final": self.final,
            "best_val": self.best_val,
            "seconds_per_epoch": statistics.median(steady_epoch_seconds(self.history)),
            "first_epoch_seconds": self.history[0]["seconds"],
            "versions": {"dropkit": dropkit.__version__, "torch": torch.__version__},
            "threads": torch.get_num_threads(),
        }


@functools.lru_cache(maxsize=1)
def load_splits(
    dataset: str, data_dir: str | None, val_size: int, limit_train: int | None, limit_test: int | None,
    inputs: str = "standard",
) -> tuple[Split, Split, Split]:
    """Normalised ``(train, val, test)`` splits for a config; cached so that runs in a row load once.

    The validation set is carved out of the full training set before ``limit_train`` applies,
    so it is the same whatever slice is trained on. ``inputs`` is one of
    :data:`~dropkit.lab.train.config.INPUTS`.
    """
    ds = load_dataset(dataset, data_dir)
    ds.check_fits((IMAGE_SIDE, IMAGE_SIDE), NUM_CLASSES, "the lab's models")
    train_part, val = split_validation(ds.train, val_size, seed=VAL_SPLIT_SEED)
    return normalise(train_part.head(limit_train), val, ds.test.head(limit_test), standardise=inputs == "standard")


@dataclass
class _Step:
    """What happens around each optimiser step besides the step itself: the callbacks, the
    Concrete Dropout regulariser added to the loss, and max-norm."""

    model: nn.Module
    callbacks: CallbackList
    regulariser: Callable[[], torch.Tensor] | None
    constrained: list[nn.Linear]
    max_norm: float | None


def _train_epoch(
    net: nn.Module, batches: BatchIterator, optimizer: torch.optim.Optimizer, step: _Step, epoch: int, progress: tqdm
) -> dict[str, float]:
    """One pass over this rank's training batches in training mode (``epoch`` is 0-based); returns
    loss, accuracy and saved_mib, the first two summed over all ranks."""
    net.train()
    loss_sum, correct, seen = 0.0, 0, 0
    saved = SavedForBackward(net.parameters())
    first_step = epoch * len(batches)
    for i, (x, y) in enumerate(batches):
        step.callbacks.call("on_step_begin", step.model, first_step + i, epoch)
        with saved.hooks() if i == 0 else nullcontext():
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            objective = loss + step.regulariser() if step.regulariser else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        if step.max_norm is not None:
            apply_max_norm(step.constrained, step.max_norm)
        step.callbacks.call("on_step_end", step.model, first_step + i, epoch)
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        progress.update(1)
        if i % 20 == 0:
            progress.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
    loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen])
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "saved_mib": saved.mib}


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    quiet: bool = False,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``; write metrics and checkpoints to ``out_dir`` if given.

    With ``resume=True`` a run continues from ``out_dir``'s checkpoint (a fresh start when there is
    none; the previous one when the newest is damaged, see :mod:`dropkit.lab.sealed_files`) and
    ends with the same figures as an uninterrupted run. Without it, ``out_dir`` is overwritten.
    The run holds ``out_dir``'s lock (:mod:`dropkit.lab.run_lock`) throughout, so a second run
    into it is refused. A run whose training loss stops being a number is stopped with an error.
    The progress bar goes to stderr, and only when it is a terminal and not ``quiet``.

    ``callbacks`` run at every step and epoch, after the rate schedule or controller the config
    asks for (see :mod:`dropkit.lab.train.hooks`); one may end the run after an epoch, which then
    holds fewer than ``config.epochs`` epochs and can be resumed.

    Inside a distributed run (see :mod:`dropkit.lab.distributed`) the model is wrapped in
    DistributedDataParallel, each rank trains on its slice of every global batch with its own
    masks, metrics are reduced over the ranks, and only rank 0 prints, writes files and holds the
    lock; every rank reads the checkpoint when resuming.

    Example::

        result = train(TrainConfig(model="srivastava_mlp", p=0.5, epochs=3), "runs/p=0.5")
        result.final["test_acc"]
    """
    with run_lock.hold(out_dir) if out_dir is not None and distributed.is_main() else nullcontext():
        return _train(config, out_dir, resume=resume, quiet=quiet, callbacks=callbacks)


def _train(
    config: TrainConfig, out_dir: str | os.PathLike | None, *, resume: bool, quiet: bool, callbacks: Sequence[Any]
) -> TrainResult:
    """:func:`train`, with ``out_dir`` locked."""
    config.validate()
    if resume and out_dir is None:
        raise ValueError("resume needs an output folder (out_dir) holding the run's checkpoint")
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    p = model_p(config)
    rate = main_rate(config.model, p, **config.model_kwargs)
    train_split, val_split, test_split = load_splits(
        config.dataset, config.data_dir, config.val_size, config.limit_train, config.limit_test, config.inputs
    )
    rng.manual_seed(config.seed)
    model = build_model(config.model, p, **config.model_kwargs)
    if config.rate == "concrete":
        to_concrete(model, **dict(zip(("weight_regularizer", "dropout_regularizer"),
                                      regularizer_weights(len(train_split)))))
    else:
        fuse_relu_dropout(model)  # the same numbers, one memory pass less each way
    optimizer = make_optimizer(config, model)
    rate_callback = _rate_callback(config, rate)
    run = RunState(model, optimizer, make_scheduler(config, optimizer),
                   torch.Generator().manual_seed(rng.derive_seed(config.seed, SHUFFLE_STREAM)),
                   rate_callback if isinstance(rate_callback, OverfitController) else None,
                   WeightAverage(model, config.average_from) if config.average_from else None)
    hooks = CallbackList([rate_callback, *callbacks] if rate_callback is not None else list(callbacks))
    history: list[dict[str, Any]] = []
    out = Path(out_dir) if out_dir is not None else None

    if out is not None:
        if resume:
            history = load_checkpoint(out, config, run)
        elif main:
            clear_checkpoints(out)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
            write_metrics(out, history)

    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batches = BatchIterator(train_split, config.batch_size, generator=run.shuffle, rank=rank, world=world)
    train_eval = train_split.head(TRAIN_EVAL_SIZE)  # the training examples scored in eval mode each epoch
    score = functools.partial(evaluate_all, train_part=train_eval, val=val_split, test=test_split)
    step = _Step(model, hooks, (lambda: concrete_regularisation(model)) if config.rate == "concrete" else None,
                 hidden_linears(model) if config.max_norm is not None else [], config.max_norm)
    hooks.call("on_train_begin", model, config.span * len(batches), config.span)
    for epoch in range(len(history) + 1, config.epochs + 1):
        torch.manual_seed(rng.derive_seed(config.seed, MASK_STREAM, rank, epoch))
        lr = optimizer.param_groups[0]["lr"]
        momentum = ramped_momentum(config, epoch)
        if config.momentum_ramp > 0:
            for group in optimizer.param_groups:
                group["momentum"] = momentum
        start = time.perf_counter()
        with _progress(len(batches), f"epoch {epoch}/{config.epochs}", quiet or not main) as bar:
            fit = _train_epoch(net, batches, optimizer, step, epoch - 1, bar)
        seconds = time.perf_counter() - start
        if run.scheduler is not None:
            run.scheduler.step()
        row = epoch_row(epoch, _current_rate(config, model, rate_callback, rate), lr, fit, score(model), seconds)
        if config.momentum_ramp > 0:
            row["momentum"] = momentum
        if config.rate == "concrete":
            row["concrete_p"] = concrete_rates(model)
        if run.average is not None:
            averaged = run.average.update(model, epoch, score)
            row["eval_seconds"] += averaged.pop("eval_seconds", 0.0)
            row.update(averaged)
        check_finite(epoch, row, config.optimizer, config.lr)
        history.append(row)
        hooks.call("on_epoch_end", model, epoch - 1, row)
        if out is not None and main:
            append_metrics(out, row)
            save_checkpoint(out, config, run, history)
            hooks.call("on_checkpoint", out / CHECKPOINT, epoch - 1)
        if distributed.all_reduce_sum([float(hooks.stop_requested)])[0] > 0:
            break

    model.eval()
    hooks.call("on_train_end", model, history)
    reached = run.average is not None and run.average.reached(len(history))
    result = TrainResult(config, history, model, out, run.average.averaged.eval() if reached else None)
    if out is not None and main:
        atomic_write_text(out / "result.json", json.dumps(result.summary(), indent=2) + "\n")
    return result


def _rate_callback(config: TrainConfig, rate: float) -> ScheduleCallback | OverfitController | None:
    """The callback that moves p during the run: a schedule of the fixed rate, or the controller."""
    if config.rate == "auto":
        return OverfitController(p_init=rate)
    schedules = {
        "curriculum": lambda: ScheduleCallback(CurriculumRamp(rate), unit="step"),
        "early": lambda: ScheduleCallback(EarlyDropout(rate, config.drop_cutoff, shape="linear"), unit="epoch"),
        "late": lambda: ScheduleCallback(LateDropout(rate, config.drop_cutoff), unit="epoch"),
    }
    return schedules[config.drop_schedule]() if config.drop_schedule in schedules else None


def _current_rate(config: TrainConfig, model: nn.Module, callback: Any, rate: float) -> float:
    """The main rate the epoch trained with: the callback's, the largest learnt rate, or the fixed one."""
    if callback is not None:
        return callback.current_p
    if config.rate == "concrete":
        return max(concrete_rates(model).values())
    return rate


def _progress(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=True, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty())
