"""Dropout rates that change while a network trains: fixed schedules and an adaptive controller.

A fixed rate is a compromise: early in training dropout slows fitting, late in training the
network may overfit a rate that was right at the start. Two families of papers act on this:

* Curriculum dropout (Morerio et al., "Curriculum Dropout", ICCV 2017): start with no dropout and
  raise the rate towards its final value, so the problem gets harder as the network learns;
  :class:`CurriculumRamp`.
* Early and late dropout (Liu et al., "Dropout Reduces Underfitting", ICML 2023): dropout only in
  the first part of training helps models that underfit (:class:`EarlyDropout`); dropout only in
  the last part helps models that overfit (:class:`LateDropout`).

:class:`OverfitController` is dropkit's own rule, which moves the rate from the losses it sees
(documented on the class).

Schedules
---------
A schedule is any object with ``rate(t, total) -> float`` (the :class:`RateSchedule` protocol):
the drop probability at time ``t`` (0-based) out of ``total``, both counted in steps or in
epochs as the callback's ``unit`` says. Every time-like setting of a schedule (``cutoff``,
``start``, ``duration``) is counted in that same unit.

The callback interface
----------------------
:class:`ScheduleCallback` and :class:`OverfitController` share one interface, which a training
loop drives like this::

    cb.on_train_begin(model, total_steps, total_epochs)   # once, before the first step
    for epoch in range(total_epochs):
        for batch in loader:                              # step counts from 0 across epochs
            cb.on_step_begin(model, step, epoch)          # before the forward pass
            ...
        metrics = {"train_loss": ..., "val_loss": ..., "p": cb.current_p}
        cb.on_epoch_end(model, epoch, metrics)            # may set the next epoch's rate

``cb.current_p`` is the rate the callback last set, which is the rate of the most-dropped layer
(see *Which layers* below). Read before ``on_epoch_end`` it is the rate the epoch trained with
(with ``unit="step"``, that of its last step): the value to record in the epoch's metrics.
``on_epoch_end`` reads ``metrics`` (the controller needs ``train_loss`` and ``val_loss``) and
never changes it. ``OverfitController.state_dict()`` belongs in a checkpoint; the schedules
depend on ``(step, epoch)`` only, so a resumed run needs nothing saved for them.

Which layers
------------
By default a callback drives every dropkit dropout layer of the model
(:func:`dropout_layers`); ``layers=`` restricts it to the ones given. Models often use different
rates on different layers (the input layer of Srivastava et al.'s MLP drops 0.2, the hidden
layers 0.5). With ``proportional=True`` (the default) the callback keeps those ratios: at
``on_train_begin`` it records each layer's rate, and a callback value ``v`` then gives a layer
whose initial rate was ``p_i`` the rate ``v * p_i / max_j p_j``. The most-dropped layers get
``v`` itself, layers built with ``p=0`` stay at 0. (If every layer starts at 0, all get ``v``.)
With ``proportional=False`` every layer gets ``v``.

Example::

    model = dropkit.lab.models.build_model("srivastava_mlp")
    cb = ScheduleCallback(CurriculumRamp(0.5), unit="step")
    cb.on_train_begin(model, total_steps=1000, total_epochs=10)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from torch import nn

from dropkit.functional import check_p
from dropkit.nn import DropoutLayer

__all__ = [
    "Constant",
    "CurriculumRamp",
    "EarlyDropout",
    "LateDropout",
    "OverfitController",
    "RateSchedule",
    "ScheduleCallback",
    "dropout_layers",
]

Unit = Literal["step", "epoch"]


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """Every dropkit dropout layer in ``model`` (``model.modules()`` order): the modules whose
    rate ``p`` can be set. Torch's own ``nn.Dropout`` is not among them; ``dropkit.convert``
    swaps those for dropkit layers first."""
    return [m for m in model.modules() if isinstance(m, DropoutLayer)]


def _check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


@runtime_checkable
class RateSchedule(Protocol):
    """A drop probability as a function of training time."""

    def rate(self, t: int, total: int) -> float:
        """The drop probability at time ``t`` (0-based) of ``total`` steps or epochs."""
        ...


class Constant:
    """The same rate throughout: plain dropout, as a schedule (the baseline of every comparison)."""

    def __init__(self, p: float) -> None:
        self.p = check_p(p)

    def rate(self, t: int, total: int) -> float:
        return self.p

    def __repr__(self) -> str:
        return f"Constant(p={self.p})"


class CurriculumRamp:
    """Curriculum dropout (Morerio et al., ICCV 2017): the rate grows from 0 to ``p_final``.

    ``shape="exp"`` is the paper's schedule, written for the drop rather than the retain
    probability: ``p(t) = p_final * (1 - exp(-gamma * t))``. It rises fastest at the start and
    approaches ``p_final`` without reaching it. ``gamma`` defaults to ``10 / duration``, so the
    rate is within ``exp(-10)`` (4.5e-5) of ``p_final`` after ``duration``.

    ``shape="linear"`` is a straight ramp: ``p(t) = p_final * min(t / duration, 1)``.

    Args:
        p_final: the rate the ramp tends to.
        shape: ``"exp"`` or ``"linear"``.
        duration: length of the ramp in the callback's unit; ``None`` ramps over all of training.
        gamma: rate constant of the ``"exp"`` shape (per unit of ``t``); overrides ``duration``.
    """

    def __init__(self, p_final: float, *, shape: Literal["exp", "linear"] = "exp",
                 duration: int | None = None, gamma: float | None = None) -> None:
        self.p_final = check_p(p_final, "p_final")
        if shape not in ("exp", "linear"):
            raise ValueError(f"shape must be 'exp' or 'linear', got {shape!r}")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int) or duration < 1):
            raise ValueError(f"duration must be a positive int or None, got {duration!r}")
        if gamma is not None and (shape != "exp" or not gamma > 0 or math.isinf(gamma)):
            raise ValueError(f"gamma must be a positive finite float and needs shape='exp', got {gamma!r}")
        self.shape = shape
        self.duration = duration
        self.gamma = gamma

    def rate(self, t: int, total: int) -> float:
        duration = self.duration if self.duration is not None else max(total, 1)
        if self.shape == "linear":
            return self.p_final * min(t / duration, 1.0)
        gamma = self.gamma if self.gamma is not None else 10.0 / duration
        return self.p_final * -math.expm1(-gamma * t)

    def __repr__(self) -> str:
        return (f"CurriculumRamp(p_final={self.p_final}, shape={self.shape!r}, duration={self.duration}, "
                f"gamma={self.gamma})")


class EarlyDropout:
    """Early dropout (Liu et al., ICML 2023): dropout before ``cutoff``, none from then on.

    Dropout in the first phase lowers the variance of mini-batch gradients and aligns them with
    the full-batch gradient, which helps models that underfit; the rest of training fits freely.
    ``shape="constant"`` keeps ``p`` until the cutoff; ``shape="linear"`` (the paper's
    ``--drop_schedule linear``) decays it linearly, ``p(t) = p * (1 - t / cutoff)``, from ``p`` at
    ``t = 0`` to 0 at ``t = cutoff``.

    Args:
        p: the rate at the start.
        cutoff: first time (in the callback's unit) with no dropout, e.g. 50 epochs of 300.
        shape: ``"constant"`` or ``"linear"``.
    """

    def __init__(self, p: float, cutoff: int, *, shape: Literal["constant", "linear"] = "constant") -> None:
        self.p = check_p(p)
        self.cutoff = _check_count(cutoff, "cutoff")
        if shape not in ("constant", "linear"):
            raise ValueError(f"shape must be 'constant' or 'linear', got {shape!r}")
        self.shape = shape

    def rate(self, t: int, total: int) -> float:
        if t >= self.cutoff:
            return 0.0
        return self.p if self.shape == "constant" else self.p * (1.0 - t / self.cutoff)

    def __repr__(self) -> str:
        return f"EarlyDropout(p={self.p}, cutoff={self.cutoff}, shape={self.shape!r})"


class LateDropout:
    """Late dropout (Liu et al., ICML 2023): no dropout before ``start``, ``p`` from then on.

    For models that overfit: the first phase fits without noise, the regularisation comes once
    the network has learnt what it can.
    """

    def __init__(self, p: float, start: int) -> None:
        self.p = check_p(p)
        self.start = _check_count(start, "start")

    def rate(self, t: int, total: int) -> float:
        return self.p if t >= self.start else 0.0

    def __repr__(self) -> str:
        return f"LateDropout(p={self.p}, start={self.start})"


class _RateCallback:
    """What both callbacks share: which layers they drive and how a value becomes layer rates."""

    def __init__(self, layers: Iterable[nn.Module] | None, proportional: bool) -> None:
        self._chosen = None if layers is None else list(layers)
        if self._chosen is not None:
            wrong = [type(m).__name__ for m in self._chosen if not isinstance(m, DropoutLayer)]
            if wrong:
                raise TypeError(f"layers must be dropkit dropout layers, got {wrong}")
        self.proportional = proportional
        self._targets: list[tuple[nn.Module, float]] = []
        self.current_p: float | None = None

    def _bind(self, model: nn.Module) -> None:
        """Record the driven layers and their relative weights (once per set of layers)."""
        layers = self._chosen if self._chosen is not None else dropout_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no dropkit dropout layers to drive")
        if [m for m, _ in self._targets] == layers:
            return  # already bound: the layers' rates may since have been changed by this controller
        top = max(m.p for m in layers)
        self._targets = [(m, m.p / top if self.proportional and top > 0 else 1.0) for m in layers]

    def _set(self, value: float) -> None:
        if not self._targets:
            raise RuntimeError("on_train_begin must be called first: the callback has no layers yet")
        value = check_p(value)
        for layer, weight in self._targets:
            layer.p = value * weight
        self.current_p = value

    def _top_rate(self) -> float:
        """The rate of the most-dropped driven layer: the value this callback speaks in."""
        return max(m.p for m, _ in self._targets)


class ScheduleCallback(_RateCallback):
    """Applies a :class:`RateSchedule` to a model's dropout layers, per step or per epoch.

    With ``unit="step"`` the rate is ``schedule.rate(step, total_steps)``, with ``unit="epoch"``
    ``schedule.rate(epoch, total_epochs)``; it is set before each step, so a resumed run that
    starts at step ``k`` gets the same rates as an uninterrupted one. See the module docstring
    for the interface and for ``layers``/``proportional``.
    """

    def __init__(self, schedule: RateSchedule, unit: Unit = "epoch", layers: Iterable[nn.Module] | None = None,
                 *, proportional: bool = True) -> None:
        if not isinstance(schedule, RateSchedule):
            raise TypeError(f"schedule must have a rate(t, total) method, got {type(schedule).__name__}")
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")
        super().__init__(layers, proportional)
        self.schedule = schedule
        self.unit = unit
        self.total = 0

    def on_train_begin(self, model: nn.Module, total_steps: int, total_epochs: int) -> None:
        """Bind to the model's layers and set the rate for ``t = 0``."""
        self._bind(model)
        self.total = _check_count(total_steps if self.unit == "step" else total_epochs,
                                  "total_steps" if self.unit == "step" else "total_epochs")
        self._set(self.schedule.rate(0, self.total))

    def on_step_begin(self, model: nn.Module, step: int, epoch: int) -> None:
        """Set the rate for this step (``step`` counts from 0 over the whole run)."""
        self._set(self.schedule.rate(step if self.unit == "step" else epoch, self.total))

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Nothing to do: a schedule depends on time only."""

    def __repr__(self) -> str:
        return f"ScheduleCallback({self.schedule!r}, unit={self.unit!r})"


class OverfitController(_RateCallback):
    """dropkit's adaptive rate: raises p while the network overfits, lowers it while it underfits.

    The rule, applied at the end of every epoch ``e`` from the training loss ``t_e`` (the mean over
    the epoch, measured with dropout on) and the validation loss ``v_e``:

    1. relative gap ``g_e = (v_e - t_e) / |v_e|``; a loss *improves* when it falls below
       ``(1 - min_delta)`` times its best value so far (the first epoch always improves);
    2. **overfitting**: ``v_e`` did not improve, ``g_e > gap_tolerance`` and ``g_e > g_{e-1}``
       (the gap is wide and widening) -> raise p by ``step``;
    3. **underfitting**: neither loss has improved for ``patience`` epochs in a row and
       ``g_e <= gap_tolerance`` (no sign of overfitting: the network is not learning, and noise
       is what holds it back) -> lower p by ``step``;
    4. otherwise p stays. p is kept in ``[p_min, p_max]``.

    ``mode="add"`` moves p by ``±step``; ``mode="mul"`` multiplies it by ``(1 + step)`` to raise and
    divides by it to lower (needs ``p_min > 0``). After a change the best losses restart from the
    current ones and the stall counts from 0, since a new p shifts both losses (the training
    loss in particular is measured with dropout): the next decision compares like with like, and
    lowering again takes another ``patience`` stalled epochs.

    Args:
        p_init: starting rate; ``None`` takes the driven layers' current top rate.
        p_min, p_max: bounds on p.
        step: size of one change (see ``mode``).
        gap_tolerance: relative gap below which the network does not count as overfitting.
        min_delta: relative improvement a loss must make to count as improving.
        patience: stalled epochs before p is lowered.
        train_key, val_key: the names of the two losses in the ``metrics`` of ``on_epoch_end``.

    After each ``on_epoch_end``, ``last_action`` is ``"raise"``, ``"lower"`` or ``None``.
    ``state_dict()``/``load_state_dict()`` carry the controller through a checkpoint.
    """

    def __init__(self, p_init: float | None = None, *, p_min: float = 0.0, p_max: float = 0.8,
                 step: float = 0.05, mode: Literal["add", "mul"] = "add", gap_tolerance: float = 0.05,
                 min_delta: float = 0.01, patience: int = 2, layers: Iterable[nn.Module] | None = None,
                 proportional: bool = True, train_key: str = "train_loss", val_key: str = "val_loss") -> None:
        super().__init__(layers, proportional)
        self.p_min, self.p_max = check_p(p_min, "p_min"), check_p(p_max, "p_max")
        if self.p_min > self.p_max:
            raise ValueError(f"p_min ({p_min}) must not exceed p_max ({p_max})")
        if mode not in ("add", "mul"):
            raise ValueError(f"mode must be 'add' or 'mul', got {mode!r}")
        if mode == "mul" and self.p_min == 0.0:
            raise ValueError("mode='mul' needs p_min > 0: a rate of 0 would never grow")
        if not step > 0 or math.isinf(step):
            raise ValueError(f"step must be a positive finite float, got {step!r}")
        if not gap_tolerance >= 0 or not 0 <= min_delta < 1:
            raise ValueError(f"need gap_tolerance >= 0 and 0 <= min_delta < 1, got {gap_tolerance}, {min_delta}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int, got {patience!r}")
        self.p_init = None if p_init is None else check_p(p_init, "p_init")
        self.step, self.mode = step, mode
        self.gap_tolerance, self.min_delta, self.patience = gap_tolerance, min_delta, patience
        self.train_key, self.val_key = train_key, val_key
        self.last_action: str | None = None
        self._best_train = self._best_val = math.inf
        self._prev_gap: float | None = None
        self._train_stall = self._val_stall = 0

    def on_train_begin(self, model: nn.Module, total_steps: int, total_epochs: int) -> None:
        """Bind to the model's layers and set the starting rate (clipped to the bounds)."""
        self._bind(model)
        start = self.p_init if self.p_init is not None else self._top_rate()
        self._set(min(max(start, self.p_min), self.p_max))

    def on_step_begin(self, model: nn.Module, step: int, epoch: int) -> None:
        """Nothing to do: the controller acts at epoch ends only."""

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Apply the rule to this epoch's losses and set the rate for the next epoch."""
        if self.current_p is None:
            raise RuntimeError("on_train_begin must be called before on_epoch_end")
        if metrics[self.val_key] is None:
            raise ValueError(f"{self.val_key} is None: the controller needs a validation split")
        train, val = float(metrics[self.train_key]), float(metrics[self.val_key])
        if not (math.isfinite(train) and math.isfinite(val)):
            raise ValueError(f"losses must be finite, got {self.train_key}={train}, {self.val_key}={val}")
        gap = (val - train) / max(abs(val), 1e-12)
        val_improved = val < self._best_val * (1 - self.min_delta) or self._best_val == math.inf
        train_improved = train < self._best_train * (1 - self.min_delta) or self._best_train == math.inf
        self._val_stall = 0 if val_improved else self._val_stall + 1
        self._train_stall = 0 if train_improved else self._train_stall + 1
        self._best_val, self._best_train = min(self._best_val, val), min(self._best_train, train)
        widening = self._prev_gap is not None and gap > self._prev_gap
        self._prev_gap = gap

        self.last_action = None
        if not val_improved and gap > self.gap_tolerance and widening:
            self.last_action = "raise"
        elif min(self._val_stall, self._train_stall) >= self.patience and gap <= self.gap_tolerance:
            self.last_action = "lower"
        if self.last_action is None:
            return
        self._set(self._moved(self.current_p, up=self.last_action == "raise"))
        self._best_val, self._best_train = val, train
        self._train_stall = self._val_stall = 0

    def _moved(self, p: float, up: bool) -> float:
        if self.mode == "add":
            p = p + self.step if up else p - self.step
        else:
            p = p * (1 + self.step) if up else p / (1 + self.step)
        return min(max(round(p, 12), self.p_min), self.p_max)  # round: no 0.35000000000000003 in metrics

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (rate, best losses, stall counts) for a checkpoint."""
        return {"current_p": self.current_p, "best_train": self._best_train, "best_val": self._best_val,
                "prev_gap": self._prev_gap, "train_stall": self._train_stall, "val_stall": self._val_stall}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`, before or after ``on_train_begin``; either
        way the layers end up at the saved rate."""
        self._best_train, self._best_val = state["best_train"], state["best_val"]
        self._prev_gap = state["prev_gap"]
        self._train_stall, self._val_stall = state["train_stall"], state["val_stall"]
        if self._targets:
            self._set(state["current_p"])
        else:
            self.p_init = state["current_p"]

    def __repr__(self) -> str:
        return (f"OverfitController(p={self.current_p}, p_min={self.p_min}, p_max={self.p_max}, step={self.step}, "
                f"mode={self.mode!r}, gap_tolerance={self.gap_tolerance}, min_delta={self.min_delta}, "
                f"patience={self.patience})")
