"""Figures that know their noise: mean and spread over repeated runs, and whether a difference
between two settings is larger than that noise.

A run's figures move with its seed (initial weights, batch order, dropout masks) and its timings
with the machine's load, so one run per setting cannot tell an effect from noise. A setting run
with ``n`` seeds gives an :class:`Estimate`: the mean and the sample standard deviation (the
*spread*). :func:`differs` calls a difference of two means real when it exceeds its own noise:
Welch's two-sided t-test at the 5 % level, i.e. ``|mean_a - mean_b| > t * sqrt(s_a^2 / n_a +
s_b^2 / n_b)`` with ``t`` the 97.5 % quantile of Student's t at the Welch-Satterthwaite degrees
of freedom (Welch, "The generalization of Student's problem when several different population
variances are involved", Biometrika 1947). With one run on either side there is no spread to
compare against, and the answer is "cannot tell" (None).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Estimate", "differs", "estimate", "steady_epoch_seconds", "t_quantile"]

#: 97.5 % quantiles of Student's t for 1..30 degrees of freedom (two-sided 5 % test)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


@dataclass(frozen=True)
class Estimate:
    """A figure measured ``n`` times: its mean and spread (sample standard deviation, None for n = 1)."""

    mean: float
    spread: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "spread": self.spread, "n": self.n}


def estimate(values: Iterable[float]) -> Estimate:
    """The :class:`Estimate` of some measurements of one figure.

    Example::

        estimate([0.97, 0.98, 0.99])   # mean 0.98, spread 0.01, n 3
    """
    data = [float(v) for v in values]
    if not data:
        raise ValueError("estimate needs at least one value")
    return Estimate(statistics.fmean(data), statistics.stdev(data) if len(data) > 1 else None, len(data))


def t_quantile(df: float) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (rounded down to a whole
    number, which errs towards a wider interval); the normal 1.96 from 120 on."""
    whole = max(1, math.floor(df))
    if whole <= len(_T975):
        return _T975[whole - 1]
    return 2.000 if whole < 60 else 1.980 if whole < 120 else 1.960


def differs(a: Estimate, b: Estimate) -> bool | None:
    """Whether ``a.mean`` and ``b.mean`` differ by more than their noise (see the module
    docstring); None when either was measured once. Two figures with no spread at all (a
    deterministic quantity such as the bytes a batch keeps) differ when their means differ."""
    if a.spread is None or b.spread is None:
        return None
    va, vb = a.spread ** 2 / a.n, b.spread ** 2 / b.n
    if va + vb == 0:
        return a.mean != b.mean
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    return abs(a.mean - b.mean) > t_quantile(df) * math.sqrt(va + vb)


def steady_epoch_seconds(history: Sequence[dict[str, Any]]) -> list[float]:
    """A run's training seconds per epoch without its first epoch, which also pays one-off costs
    (kernels compiled or loaded, caches and allocator warming up); the first one alone for a run
    of one epoch."""
    seconds = [row["seconds"] for row in history]
    return seconds[1:] or seconds
