"""The training loop: one model, one dataset, one setting, measured every epoch and resumable.

:func:`train` is what ``dropkit train`` runs and what comparisons and sweeps call once per
setting. Every epoch it records, in ``metrics.jsonl``:

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
  eval-mode figures for the running average of the weights (see :class:`TrainConfig`), from
  that epoch on.

A checkpoint (model, optimiser, scheduler, RNG states, metrics so far) is written atomically
after every epoch, so ``resume=True`` after a kill ends with exactly the figures the
uninterrupted run would have produced.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

import dropkit
from dropkit import rng
from dropkit.lab import distributed
from dropkit.lab.atomic_files import atomic_write, atomic_write_text
from dropkit.concrete import concrete_rates, concrete_regularisation, regularizer_weights, to_concrete
from dropkit.convert import fuse_relu_dropout
from dropkit.lab.data import BatchIterator, Split, load_dataset, normalise, split_validation
from dropkit.lab.models import build_model, main_rate, output_layer
from dropkit.schedule import CurriculumRamp, EarlyDropout, LateDropout, OverfitController, ScheduleCallback

__all__ = [
    "ADAPTIVE_START_P",
    "INPUTS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "apply_max_norm",
    "evaluate",
    "hidden_linears",
    "iter_metrics",
    "load_splits",
    "model_p",
    "peak_rss_mib",
    "ramped_momentum",
    "train",
]

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
SCHEDULES = ("none", "cosine", "step")
#: how pixels reach the network: standardised with the training mean and std, or scaled to [0, 1]
INPUTS = ("standard", "unit")
#: how the dropout rate is set: fixed (p, optionally scheduled), auto (OverfitController), concrete (learnt)
RATES = ("fixed", "auto", "concrete")
#: where an adaptive rate (auto, concrete) starts the main rate when ``p`` is not given. Low, for two
#: reasons: the controller reads overfitting reliably (validation loss stalls while the gap widens)
#: but cannot tell underfitting from convergence, so it should add dropout, not remove it; and
#: Gal et al.'s reference code of Concrete Dropout starts its rates at 0.1.
ADAPTIVE_START_P = 0.1
#: schedules of a fixed rate over the run (dropkit.schedule)
DROP_SCHEDULES = ("constant", "curriculum", "early", "late")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
#: sub-stream of the run's seed that shuffles the training batches (see dropkit.rng.derive_seed)
SHUFFLE_STREAM = 1
#: sub-stream that seeds torch's generator (and so the dropout masks) per (rank, epoch)
MASK_STREAM = 2
#: the validation split does not depend on the run's seed: every run is judged on the same examples
VAL_SPLIT_SEED = 0
EVAL_BATCH = 1000
#: training examples scored in eval mode every epoch (train_eval_acc): enough for a 0.2-point
#: standard error at 97 % accuracy, cheap next to the epoch itself
TRAIN_EVAL_SIZE = 10_000


@dataclass
class TrainConfig:
    """Everything that determines a run; two runs with equal configs produce equal metrics.

    ``p`` sets the model's main dropout rate (see :func:`dropkit.lab.models.build_model`); None keeps
    the model's default. With ``rate="auto"`` or ``"concrete"``, ``p`` is where the rate starts
    (None: :data:`ADAPTIVE_START_P`). ``max_norm``: after every step, each hidden Linear's incoming
    weight vector (one row per unit) is rescaled to norm <= ``max_norm`` (Srivastava et al. 2014, JMLR, sec. 5.1:
    with dropout it allows large learning rates without weights blowing up; they used c of 3-4).
    ``limit_train``/``limit_test`` keep the first N examples, for quick runs and tests.
    ``momentum_ramp`` > 0 raises SGD momentum linearly from ``momentum_start`` to ``momentum`` over
    that many epochs (see :func:`ramped_momentum`).
    ``inputs="unit"`` feeds pixels in [0, 1] instead of standardised ones, as Srivastava et al. did:
    a blank background is then 0 and adds nothing to a unit's input, which matters to max-norm.
    ``planned_epochs`` is the length the learning-rate schedule and the dropout-rate schedules span
    (None: ``epochs``). A run with fewer ``epochs`` is the start of the planned run, figure for
    figure, and can be resumed to more: this is how a sweep trains a trial rung by rung.
    ``average_from`` > 0 keeps the uniform average of the weights at the end of every epoch from
    that one (1-based) on, and scores it beside the trained weights each epoch: stochastic weight
    averaging (Izmailov et al. 2018, UAI, "Averaging weights leads to wider optima and better
    generalization"), an ensemble of the late iterates at the cost of one model copy (buffers such
    as batch-norm statistics are averaged too, not recomputed). Its gain
    is largest while the learning rate is still well above 0; a cosine schedule with
    ``planned_epochs`` > ``epochs`` stops the run there.
    """

    model: str = "tutorial_mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    p: float | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    momentum_start: float = 0.5
    momentum_ramp: int = 0
    weight_decay: float = 0.0
    max_norm: float | None = None
    schedule: str = "none"
    step_epochs: int = 10
    step_gamma: float = 0.1
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    val_size: int = 5000
    dataset: str = "mnist"
    inputs: str = "standard"
    data_dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    rate: str = "fixed"
    drop_schedule: str = "constant"
    drop_cutoff: int = 0
    planned_epochs: int | None = None
    average_from: int = 0

    @property
    def span(self) -> int:
        """The epochs the schedules span: ``planned_epochs``, or ``epochs`` when it is unset."""
        return self.epochs if self.planned_epochs is None else self.planned_epochs

    def validate(self) -> None:
        """Raise ValueError naming the first setting outside its allowed range."""
        if self.p is not None and not 0.0 <= self.p <= 1.0:  # also refuses NaN
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("inputs", self.inputs, INPUTS)
        _check_positive("lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer == "nesterov" and self.momentum == 0:
            raise ValueError("optimizer nesterov needs momentum in (0, 1), got 0")
        if self.momentum_ramp < 0:
            raise ValueError(f"momentum_ramp must be >= 0 epochs, got {self.momentum_ramp}")
        if self.momentum_ramp > 0:
            if self.optimizer not in ("sgd", "nesterov"):
                raise ValueError(f"momentum_ramp applies to sgd and nesterov, not optimizer {self.optimizer!r}")
            if not 0.0 <= self.momentum_start <= self.momentum:
                raise ValueError(f"momentum_start must be in [0, momentum={self.momentum}], got {self.momentum_start}")
            if self.optimizer == "nesterov" and self.momentum_start == 0:
                raise ValueError("optimizer nesterov needs momentum_start in (0, momentum], got 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_norm is not None:
            _check_positive("max_norm", self.max_norm)
        if not 0.0 < self.step_gamma <= 1.0:
            raise ValueError(f"step_gamma must be in (0, 1], got {self.step_gamma}")
        for name in ("step_epochs", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset for all examples), got {value}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        _check_choice("rate", self.rate, RATES)
        _check_choice("drop_schedule", self.drop_schedule, DROP_SCHEDULES)
        if self.rate != "fixed" and self.drop_schedule != "constant":
            raise ValueError(f"drop_schedule {self.drop_schedule!r} applies to a fixed rate, not rate={self.rate!r}")
        if self.planned_epochs is not None and self.planned_epochs < self.epochs:
            raise ValueError(f"planned_epochs must be >= epochs ({self.epochs}), got {self.planned_epochs}")
        if self.drop_schedule in ("early", "late") and not 1 <= self.drop_cutoff < self.span:
            raise ValueError(f"drop_cutoff must be in [1, epochs={self.span}) for {self.drop_schedule} dropout, "
                             f"got {self.drop_cutoff}")
        if not 0 <= self.average_from <= self.span:
            raise ValueError(f"average_from must be in [0, {self.span}] (an epoch of the run; 0: no weight "
                             f"average), got {self.average_from}")
        if self.rate == "auto" and self.val_size == 0:
            raise ValueError("rate 'auto' steers p from the validation loss: val_size must be > 0")

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data (tuples become lists, as they would in config.json)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


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
        """What result.json holds: final figures, best validation epoch, mean seconds per epoch."""
        return {
            "config": self.config.to_dict(),
            "epochs": len(self.history),
            "final": self.final,
            "best_val": self.best_val,
            "seconds_per_epoch": sum(row["seconds"] for row in self.history) / len(self.history),
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
    so it is the same whatever slice is trained on. ``inputs`` is :data:`INPUTS`' choice.
    """
    ds = load_dataset(dataset, data_dir)
    train_part, val = split_validation(ds.train, val_size, seed=VAL_SPLIT_SEED)
    return normalise(train_part.head(limit_train), val, ds.test.head(limit_test), standardise=inputs == "standard")


def apply_max_norm(layers: Iterable[nn.Linear], max_norm: float) -> None:
    """Rescale each unit's incoming weights (each row of ``weight``) to L2 norm <= ``max_norm``.

    The max-norm constraint of Srivastava et al. 2014 (JMLR 15, sec. 5.1), applied as a projection
    after each optimiser step; rows already inside the ball are left as they are.
    """
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.renorm(layer.weight, 2, 0, max_norm))


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """Every ``nn.Linear`` except the output layer: the units that max-norm constrains."""
    out = output_layer(model)
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not out]


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser; weight decay applies to weights, never to Concrete Dropout's learnt rate logits."""
    named = list(model.named_parameters())
    rates = [p for name, p in named if name.endswith("p_logit")]
    params = [{"params": [p for name, p in named if not name.endswith("p_logit")]}]
    if rates:
        params.append({"params": rates, "weight_decay": 0.0})
    lr, wd = config.lr, config.weight_decay
    if config.optimizer in ("sgd", "nesterov"):
        nesterov = config.optimizer == "nesterov"
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd, nesterov=nesterov)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-epoch schedule: cosine from lr to 0 over ``config.span``, or x``step_gamma`` every ``step_epochs``."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.span)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_epochs, gamma=config.step_gamma)
    return None


class _SavedForBackward:
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


def _train_epoch(
    net: nn.Module,
    batches: BatchIterator,
    optimizer: torch.optim.Optimizer,
    hooks: _StepHooks,
    progress: tqdm,
) -> dict[str, float]:
    """One pass over this rank's training batches in training mode; returns loss, accuracy and
    saved_mib, the first two summed over all ranks."""
    net.train()
    loss_sum, correct, seen = 0.0, 0, 0
    saved = _SavedForBackward(net.parameters())
    for i, (x, y) in enumerate(batches):
        hooks.before_step(i)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if i == 0 else nullcontext():
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            objective = loss + hooks.regulariser() if hooks.regulariser else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        hooks.after_step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        progress.update(1)
        if i % 20 == 0:
            progress.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
    loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen])
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "saved_mib": saved.mib}


@dataclass
class _StepHooks:
    """What happens around each optimiser step besides the step itself: the rate callback's
    per-step call, the Concrete Dropout regulariser added to the loss, and max-norm."""

    model: nn.Module
    callback: ScheduleCallback | OverfitController | None
    regulariser: Callable[[], torch.Tensor] | None
    constrained: list[nn.Linear]
    max_norm: float | None
    epoch: int = 0
    first_step: int = 0

    def before_step(self, i: int) -> None:
        if self.callback is not None:
            self.callback.on_step_begin(self.model, self.first_step + i, self.epoch)

    def after_step(self) -> None:
        if self.max_norm is not None:
            apply_max_norm(self.constrained, self.max_norm)


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


def _check_resumable(saved: dict[str, Any], done: int, config: TrainConfig) -> None:
    """A checkpoint may only be continued with the config it was made with (``epochs`` may grow
    when no schedule spans it: with ``planned_epochs`` set, or without cosine and curriculum).
    A field that an older dropkit did not save ran with its default, and is compared as such."""
    new, default = config.to_dict(), TrainConfig().to_dict()
    saved = {**default, **saved}
    differ = sorted(k for k in new if k != "epochs" and new[k] != saved[k])
    if differ:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {new[k]!r}" for k in differ)
        raise ValueError(f"cannot resume: the checkpoint was made with other settings ({detail})")
    if done > config.epochs:
        raise ValueError(f"cannot resume: the checkpoint already holds {done} epochs, more than epochs={config.epochs}")
    # planned_epochs matched above, so only a run without it has its schedules span ``epochs``
    spanned = "the cosine schedule" if config.schedule == "cosine" else (
        "the curriculum ramp" if config.drop_schedule == "curriculum" else None)
    if spanned and config.planned_epochs is None and saved["epochs"] != config.epochs:
        raise ValueError(f"cannot resume: epochs {saved['epochs']} -> {config.epochs} would change {spanned} "
                         f"(set planned_epochs to train the start of a longer run)")


def train(
    config: TrainConfig, out_dir: str | os.PathLike | None = None, *, resume: bool = False, quiet: bool = False
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``; write metrics and checkpoints to ``out_dir`` if given.

    With ``resume=True`` a run continues from ``out_dir``'s checkpoint (a fresh start when there is
    none) and ends with the same figures as an uninterrupted run. Without it, ``out_dir`` is
    overwritten. The progress bar goes to stderr, and only when it is a terminal and not ``quiet``.

    Inside a distributed run (see :mod:`dropkit.lab.distributed`) the model is wrapped in
    DistributedDataParallel, each rank trains on its slice of every global batch with its own
    masks, metrics are reduced over the ranks, and only rank 0 prints and writes files; every rank
    reads the checkpoint when resuming.
    """
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
    optimizer = _make_optimizer(config, model)
    scheduler = _make_scheduler(config, optimizer)
    callback = _rate_callback(config, rate)
    average = AveragedModel(model, use_buffers=True) if config.average_from else None
    shuffle = torch.Generator().manual_seed(rng.derive_seed(config.seed, SHUFFLE_STREAM))
    history: list[dict[str, Any]] = []
    out = Path(out_dir) if out_dir is not None else None

    if out is not None:
        if resume and (out / CHECKPOINT).exists():
            history = _load_checkpoint(out / CHECKPOINT, config, model, optimizer, scheduler, shuffle, callback,
                                       average)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
            atomic_write_text(out / METRICS, "".join(json.dumps(row) + "\n" for row in history))

    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batches = BatchIterator(train_split, config.batch_size, generator=shuffle, rank=rank, world=world)
    train_eval = train_split.head(TRAIN_EVAL_SIZE)  # the training examples scored in eval mode each epoch
    hooks = _StepHooks(model, callback, (lambda: concrete_regularisation(model)) if config.rate == "concrete" else None,
                       hidden_linears(model) if config.max_norm is not None else [], config.max_norm)
    if callback is not None:
        callback.on_train_begin(model, config.span * len(batches), config.span)
    for epoch in range(len(history) + 1, config.epochs + 1):
        torch.manual_seed(rng.derive_seed(config.seed, MASK_STREAM, rank, epoch))
        hooks.epoch, hooks.first_step = epoch - 1, (epoch - 1) * len(batches)
        lr = optimizer.param_groups[0]["lr"]
        momentum = ramped_momentum(config, epoch)
        if config.momentum_ramp > 0:
            for group in optimizer.param_groups:
                group["momentum"] = momentum
        start = time.perf_counter()
        with _progress(len(batches), f"epoch {epoch}/{config.epochs}", quiet or not main) as bar:
            fit = _train_epoch(net, batches, optimizer, hooks, bar)
        seconds = time.perf_counter() - start
        if scheduler is not None:
            scheduler.step()
        row = _epoch_row(epoch, _current_rate(config, model, callback, rate), lr, fit,
                         _evaluate_all(model, train_eval, val_split, test_split), seconds)
        if config.momentum_ramp > 0:
            row["momentum"] = momentum
        if config.rate == "concrete":
            row["concrete_p"] = concrete_rates(model)
        if average is not None and epoch >= config.average_from:
            average.update_parameters(model)
            scores = _evaluate_all(average.module, train_eval, val_split, test_split)
            row["eval_seconds"] += scores.pop("eval_seconds")
            row.update({f"avg_{key}": value for key, value in scores.items()})
        history.append(row)
        if callback is not None:
            callback.on_epoch_end(model, epoch - 1, row)
        if out is not None and main:
            with open(out / METRICS, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            _save_checkpoint(out / CHECKPOINT, config, model, optimizer, scheduler, shuffle, history, callback,
                             average)

    model.eval()
    reached = average is not None and len(history) >= config.average_from
    result = TrainResult(config, history, model, out, average.eval() if reached else None)
    if out is not None and main:
        atomic_write_text(out / "result.json", json.dumps(result.summary(), indent=2) + "\n")
    return result


def ramped_momentum(config: TrainConfig, epoch: int) -> float:
    """SGD momentum in ``epoch`` (1-based): ``momentum_start`` rising linearly to ``momentum`` over
    the first ``momentum_ramp`` epochs, then constant.

    Dropout nets want 10-100x the learning rate of standard nets, or momentum 0.95-0.99
    (Srivastava et al. 2014, JMLR, appendix A.2); Hinton et al. 2012 (arXiv:1207.0580) started
    momentum at 0.5 and raised it linearly to 0.99, so that the first steps, far from any minimum,
    do not blow up. The value is a function of the epoch alone, so a resumed run sets the same one.
    """
    if config.momentum_ramp == 0:
        return config.momentum
    frac = min(1.0, (epoch - 1) / config.momentum_ramp)
    return config.momentum_start + (config.momentum - config.momentum_start) * frac


def model_p(config: TrainConfig) -> float | None:
    """The main rate the model is built with: ``config.p``, or :data:`ADAPTIVE_START_P` where an
    adaptive rate is given no start (None keeps the model's default for a fixed rate)."""
    return ADAPTIVE_START_P if config.p is None and config.rate != "fixed" else config.p


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


def _evaluate_all(model: nn.Module, train_part: Split, val: Split, test: Split) -> dict[str, Any]:
    """Eval-mode loss and accuracy on part of the training set, the validation set (None when it is
    empty) and the test set."""
    start = time.perf_counter()
    train_loss, train_acc = evaluate(model, train_part)
    val_loss, val_acc = evaluate(model, val) if len(val) else (None, None)
    test_loss, test_acc = evaluate(model, test)
    return {"train_eval_loss": train_loss, "train_eval_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
            "test_loss": test_loss, "test_acc": test_acc, "eval_seconds": time.perf_counter() - start}


def _epoch_row(
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


def _progress(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=True, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty())


def _save_checkpoint(
    path: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    shuffle: torch.Generator,
    history: list[dict[str, Any]],
    callback: Any,
    average: AveragedModel | None,
) -> None:
    """Everything a resumed run needs, written atomically. torch's global generator is not saved:
    it is reseeded from (seed, rank, epoch) at each epoch, which also keeps every rank's masks apart."""
    state = {
        "config": config.to_dict(),
        "epoch": len(history),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "shuffle": shuffle.get_state(),
        "rate_controller": callback.state_dict() if isinstance(callback, OverfitController) else None,
        "average": average.state_dict() if average is not None else None,
        "history": history,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(
    path: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    shuffle: torch.Generator,
    callback: Any,
    average: AveragedModel | None,
) -> list[dict[str, Any]]:
    """Restore a run from ``path`` into the objects given; returns the metrics of the epochs done."""
    state = torch.load(path, weights_only=True)
    _check_resumable(state["config"], state["epoch"], config)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    shuffle.set_state(state["shuffle"])
    if isinstance(callback, OverfitController):
        callback.load_state_dict(state["rate_controller"])
    if average is not None:
        average.load_state_dict(state["average"])
    return state["history"]


def iter_metrics(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (or of the file itself when given), one dict per epoch."""
    path = Path(path)
    with open(path / METRICS if path.is_dir() else path) as handle:
        for line in handle:
            yield json.loads(line)
