"""What determines a run: :class:`TrainConfig`, its allowed values, and when a checkpoint may be continued."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADAPTIVE_START_P",
    "DROP_SCHEDULES",
    "INPUTS",
    "OPTIMIZERS",
    "RATES",
    "SCHEDULES",
    "TrainConfig",
    "check_resumable",
    "model_p",
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


def model_p(config: TrainConfig) -> float | None:
    """The main rate the model is built with: ``config.p``, or :data:`ADAPTIVE_START_P` where an
    adaptive rate is given no start (None keeps the model's default for a fixed rate)."""
    return ADAPTIVE_START_P if config.p is None and config.rate != "fixed" else config.p


def check_resumable(saved: dict[str, Any], done: int, config: TrainConfig) -> None:
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
