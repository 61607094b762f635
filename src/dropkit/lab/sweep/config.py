"""What a sweep searches: :class:`SweepConfig`, the search space, and a trial's training config."""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropkit.lab.models import MODELS
from dropkit.lab.storage import DEFAULT_TIMEOUT
from dropkit.lab.train import TrainConfig

__all__ = ["PRUNERS", "SweepConfig", "rate_arguments", "search_space", "trial_config"]

PRUNERS = ("halving", "median", "none", "promote")


@dataclass
class SweepConfig:
    """A sweep: the base run, what to search, how many trials, where the study lives.

    ``base`` is every trial's config except the searched values; its ``epochs`` is the full
    length of a trial. ``p_step`` puts the searched dropout rates on a lattice (``low``,
    ``low + p_step``, ... up to ``high``); None searches them continuously. Rates closer than a few
    hundredths give the same accuracy within a run's noise, and a lattice lets the sampler land
    exactly on the values a person would try (0 among them, which a continuous search only
    approaches). Error messages name the command-line flag of the setting at fault.
    """

    base: TrainConfig
    out_dir: Path
    trials: int = 20
    workers: int = 1
    pruner: str = "promote"
    storage: str | None = None
    study_name: str = "sweep"
    p_range: tuple[float, float] = (0.0, 0.8)
    p_step: float | None = 0.05
    lr_range: tuple[float, float] | None = None
    weight_decay_range: tuple[float, float] | None = None
    stale_after: float = 120.0
    storage_timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    def validate(self) -> None:
        """Raise ValueError naming the first flag outside its range (the base config included)."""
        self.base.validate()
        if self.base.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {self.base.model!r}")
        accepted = inspect.signature(MODELS[self.base.model][0]).parameters
        unknown = sorted(set(self.base.model_kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"--model-arg: model {self.base.model!r} has no argument {', '.join(unknown)} "
                             f"(it takes: {', '.join(accepted)})")
        if self.base.val_size < 1:
            raise ValueError(f"--val-size must be >= 1: the sweep selects on validation accuracy, "
                             f"got {self.base.val_size}")
        if self.base.rate != "fixed":
            raise ValueError(f"a sweep searches fixed rates, not rate={self.base.rate!r}")
        for name, value in (("--trials", self.trials), ("--workers", self.workers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        low, high = self.p_range
        if not 0.0 <= low < high < 1.0:
            raise ValueError(f"--p-range must satisfy 0 <= LOW < HIGH < 1, got {low:g} {high:g}")
        if self.p_step is not None and not 0.0 < self.p_step <= high - low:
            raise ValueError(f"--p-step must be in (0, HIGH - LOW] = (0, {high - low:g}] (or 0 to search "
                             f"continuously), got {self.p_step:g}")
        for flag, bounds in (("--lr-range", self.lr_range), ("--weight-decay-range", self.weight_decay_range)):
            if bounds is not None and not (0.0 < bounds[0] < bounds[1] and math.isfinite(bounds[1])):
                raise ValueError(f"{flag} must satisfy 0 < LOW < HIGH (searched log-uniform), "
                                 f"got {bounds[0]:g} {bounds[1]:g}")
        if not (self.stale_after > 0 and math.isfinite(self.stale_after)):
            raise ValueError(f"--stale-after must be a number of seconds > 0, got {self.stale_after}")
        if not (self.storage_timeout > 0 and math.isfinite(self.storage_timeout)):
            raise ValueError(f"--storage-timeout must be a number of seconds > 0, got {self.storage_timeout}")
        if not self.study_name:
            raise ValueError("--study must be a non-empty name")
        if not search_space(self):
            raise ValueError(f"nothing to search: every dropout rate of {self.base.model!r} is fixed by --model-arg "
                             f"and neither --search-lr nor --search-weight-decay is given")


def rate_arguments(config: TrainConfig) -> list[str]:
    """The model's dropout-rate arguments (those starting with ``p``) that ``config`` leaves free:
    a rate given in ``model_kwargs``, or the main rate when ``config.p`` is set, stays fixed."""
    builder, main = MODELS[config.model]
    fixed = set(config.model_kwargs) | ({main} if config.p is not None else set())
    return [name for name in inspect.signature(builder).parameters if name.startswith("p") and name not in fixed]


def search_space(cfg: SweepConfig) -> dict[str, tuple[str, float, float, float | None]]:
    """Name -> (``"uniform"`` or ``"log"``, low, high, step) for every searched value.

    ``step`` is None for a continuous value; with a lattice, ``high`` is its last point (the given
    high rounded down to ``low`` plus a whole number of steps)."""
    low, high = cfg.p_range
    step = cfg.p_step
    if step is not None:
        high = round(low + math.floor((high - low) / step + 1e-9) * step, 12)
    space: dict[str, tuple[str, float, float, float | None]] = {
        name: ("uniform", low, high, step) for name in rate_arguments(cfg.base)}
    if cfg.lr_range is not None:
        space["lr"] = ("log", *cfg.lr_range, None)
    if cfg.weight_decay_range is not None:
        space["weight_decay"] = ("log", *cfg.weight_decay_range, None)
    return space


def trial_config(base: TrainConfig, params: dict[str, float], epochs: int | None = None) -> TrainConfig:
    """``base`` with a trial's values: the main rate goes to ``p``, other rates to ``model_kwargs``.

    ``epochs`` stops the run early (a rung). Every job of a trial plans ``base.epochs``
    (``planned_epochs``), so the learning-rate and dropout schedules span the full trial whatever
    rung a job stops at, and a job resumes the previous one's checkpoint exactly.
    """
    main = MODELS[base.model][1]
    changes: dict[str, Any] = {k: params[k] for k in ("lr", "weight_decay") if k in params}
    # a lattice point such as 0.15000000000000002 (low + 3 * 0.05 in floating point) trains as 0.15
    rates = {k: round(v, 12) for k, v in params.items() if k not in changes}
    if main in rates:
        changes["p"] = rates.pop(main)
    changes["model_kwargs"] = {**base.model_kwargs, **rates}
    changes["planned_epochs"] = base.epochs
    if epochs is not None:
        changes["epochs"] = epochs
    return dataclasses.replace(base, **changes)
