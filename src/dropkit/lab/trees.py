"""Dropout for tree ensembles: gradient boosting, DART and random forests, trained and scored like
the lab's networks (``pip install dropkit[trees]``, which brings LightGBM).

Three forms of the same idea, each one :class:`TreeSetting`:

- ``none``: plain gradient boosting (Friedman, "Greedy function approximation", 2001), no dropout.
- ``dart:RATE``: DART (Rashmi & Gilad-Bachrach, "DART: Dropouts meet Multiple Additive Regression
  Trees", AISTATS 2015). Before each new tree, every tree already in the ensemble is dropped with
  probability RATE; the new tree fits the residual of the thinned ensemble, and is then added with
  weight ``1/(k+1)`` while the ``k`` dropped trees are scaled by ``k/(k+1)``, so the last trees
  cannot merely patch tiny residuals of the first ones. LightGBM's ``boosting="dart"`` with
  ``drop_rate=RATE``, ``skip_drop=0`` (no round skips the dropout, as in the paper's algorithm)
  and its ``max_drop`` cap of 50 trees per round.
- ``rf`` or ``rf:RATE``: a random forest (Breiman, "Random forests", 2001): each tree sees a sample
  of 63.2 % of the rows (the share of distinct rows in a bootstrap sample) and each split a random
  subset of the features, RATE being the share of features dropped at each split (``rf`` alone:
  keep the classic ``sqrt(features)``). Trees are averaged, not boosted.

Early stopping that DART can use
--------------------------------
Boosting libraries stop early by remembering the best round and truncating the final ensemble
to it. That is exact for plain boosting, where the first ``m`` trees of the final model are the
model that was scored at round ``m``. It is wrong for DART: every later round re-weights some of
the old trees, so the first ``m`` trees of the final model are *not* the model that scored best,
and that model cannot be got back by truncation (LightGBM and XGBoost therefore refuse early
stopping with DART).

The rule here, :class:`BestSnapshot`, keeps the model itself instead of its round number. Every
``eval_every`` rounds it reads the validation accuracy of the current ensemble; when that is
strictly higher than every earlier one, it saves the whole ensemble as it stands (LightGBM's text
model format, which holds each tree's current leaf values, so DART's re-weighting so far is
captured). Training stops after ``patience`` evaluations without a new best (or at ``rounds``),
and the saved ensemble is the one returned, scored and written to disk. It costs one copy of the
model per new best, and returns exactly the model whose validation score was measured, for every
boosting type (for plain boosting it agrees with truncation). Ties keep the earlier, smaller
model. The alternative of stopping at patience and returning the final model would return a
model that was, by construction, ``patience`` evaluations past its best on validation data. With
no validation set there is nothing to select on: all ``rounds`` are trained and the final model
is returned.

What an "epoch" is here: one block of ``eval_every`` boosting rounds, so the history has one row
per evaluation with the same figures as a network's epoch (training, validation and test accuracy,
the gap, seconds), and :mod:`dropkit.lab.report` draws the same pages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dropkit.lab.tables import Part, Table, image_table, table_from_file

__all__ = [
    "BOOSTING",
    "TREE_MODELS",
    "BestSnapshot",
    "TreeConfig",
    "TreeResult",
    "TreeSetting",
    "final_figures",
    "fit",
    "load_table",
    "require_lightgbm",
    "run_tree_settings",
    "train_trees",
    "tree_settings",
]

#: names ``--model`` accepts for tree ensembles; the settings (``--reg``) choose the form
TREE_MODELS = ("gbdt",)

#: the forms of a tree ensemble and what ``--reg`` spells them
BOOSTING = {"none": "gbdt", "dart": "dart", "rf": "rf"}

#: share of distinct rows in a bootstrap sample, 1 - 1/e: the random forest's row subsample
BOOTSTRAP_SHARE = 1 - math.exp(-1)


def require_lightgbm() -> Any:
    """The ``lightgbm`` module, or a ValueError naming the package and the extra that brings it."""
    try:
        import lightgbm
    except ImportError:
        raise ValueError("tree models need the package lightgbm: pip install 'dropkit[trees]' "
                         "(or pip install lightgbm)") from None
    return lightgbm


@dataclass(frozen=True)
class TreeSetting:
    """One form of tree ensemble: ``boosting`` is ``gbdt``, ``dart`` or ``rf``; ``rate`` is DART's
    tree drop rate or the forest's per-split feature drop rate (None: the forest's sqrt rule)."""

    label: str
    boosting: str
    rate: float | None = None


def _rate(text: str, reg: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--reg {reg!r}: the rate after ':' must be a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise ValueError(f"--reg {reg!r}: the rate after ':' must be in (0, 1), got {text}")
    return value


def tree_settings(regs: list[str]) -> list[TreeSetting]:
    """Parse ``--reg`` values for a tree model: ``none``, ``dart:RATE``, ``rf`` or ``rf:RATE``.

    Example::

        tree_settings(["none", "dart:0.1", "rf"])
    """
    accepted = "none, dart:RATE (RATE in (0, 1)), rf or rf:RATE"
    if not regs:
        raise ValueError(f"--reg needs at least one setting for a tree model: {accepted}")
    settings = []
    for reg in regs:
        if not isinstance(reg, str):
            raise ValueError(f"--reg values must be strings ({accepted}), got {reg!r}")
        kind, sep, rest = reg.partition(":")
        if kind == "none" and not sep:
            settings.append(TreeSetting("none", "gbdt"))
        elif kind == "dart" and sep:
            settings.append(TreeSetting(reg, "dart", _rate(rest, reg)))
        elif kind == "dart":
            raise ValueError(f"--reg 'dart' needs its drop rate, e.g. dart:0.1 (accepted: {accepted})")
        elif kind == "rf":
            settings.append(TreeSetting(reg, "rf", _rate(rest, reg) if sep else None))
        else:
            raise ValueError(f"argument --reg: for a tree model it must be among {accepted}; got {reg!r}")
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--reg settings must differ, got {labels}")
    return settings


@dataclass
class TreeConfig:
    """Everything one tree-ensemble run depends on.

    Args:
        boosting: ``gbdt``, ``dart`` or ``rf``.
        rate: DART's drop rate (required for ``dart``), or the forest's per-split feature drop rate
            (None: keep ``sqrt(features)``); must be None for ``gbdt``.
        rounds: most boosting rounds (each adds one tree per class, or one for two classes).
        learning_rate: shrinkage of each tree (boosting; a forest averages instead).
        num_leaves, min_data_in_leaf, max_bin: tree size, smallest leaf, feature histogram bins.
        skip_drop, max_drop: DART's chance of a round without dropout, and most trees dropped at once.
        eval_every: rounds between evaluations (one history row each).
        patience: evaluations without a new best validation accuracy before stopping (None: never).
        threads: LightGBM threads.
        seed: seeds DART's drops and the forest's row and feature samples.
        dataset, data_dir, data, target: an image dataset of the lab, or a CSV/Parquet file and its
            target column (``data`` wins when given).
        val_size, limit_train, limit_test: as for networks (images); a file keeps 20 % of its rows
            for validation and 20 % for test, and ``limit_train`` caps its training rows.
    """

    boosting: str = "gbdt"
    rate: float | None = None
    rounds: int = 100
    learning_rate: float = 0.1
    num_leaves: int = 31
    min_data_in_leaf: int = 20
    max_bin: int = 63
    skip_drop: float = 0.0
    max_drop: int = 50
    eval_every: int = 10
    patience: int | None = 3
    threads: int = 1
    seed: int = 0
    dataset: str = "mnist"
    data_dir: str | None = None
    data: str | None = None
    target: str | None = None
    val_size: int = 5000
    limit_train: int | None = None
    limit_test: int | None = None
    label: str = field(default="", compare=False)

    #: the fields ``--model-arg KEY=VALUE`` may set for a tree model
    TUNABLE = ("rounds", "learning_rate", "num_leaves", "min_data_in_leaf", "max_bin", "skip_drop", "max_drop",
               "eval_every", "patience", "threads")

    def validate(self) -> None:
        """Raise ValueError naming the field and what it accepts."""
        def check_int(name: str, low: int, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

        def check_float(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
            if not ok:
                interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                raise ValueError(f"{name} must be a number in {interval}, got {value!r}")

        if self.boosting not in BOOSTING.values():
            raise ValueError(f"boosting must be one of {', '.join(BOOSTING.values())}, got {self.boosting!r}")
        if self.boosting == "dart" and self.rate is None:
            raise ValueError("boosting 'dart' needs its drop rate in (0, 1)")
        if self.boosting == "gbdt" and self.rate is not None:
            raise ValueError(f"plain boosting has no drop rate, got rate={self.rate!r}")
        if self.rate is not None:
            check_float("rate", self.rate, 0, 1, low_open=True, high_open=True)
        for name in ("rounds", "num_leaves", "eval_every", "threads"):
            check_int(name, 2 if name == "num_leaves" else 1, getattr(self, name))
        check_int("min_data_in_leaf", 1, self.min_data_in_leaf)
        check_int("max_bin", 2, self.max_bin)
        check_int("max_drop", 1, self.max_drop)
        check_int("seed", 0, self.seed)
        check_int("val_size", 0, self.val_size)
        if self.patience is not None:
            check_int("patience", 1, self.patience)
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None:
                check_int(name, 1, getattr(self, name))
        check_float("learning_rate", self.learning_rate, 0, math.inf, low_open=True, high_open=True)
        check_float("skip_drop", self.skip_drop, 0, 1, low_open=False, high_open=True)
        if self.data is not None and not self.target:
            raise ValueError("--data needs --target naming the column to predict")
        if self.target is not None and self.data is None:
            raise ValueError("--target names a column of a --data file; pass --data too")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def params(self, num_class: int, num_features: int) -> dict[str, Any]:
        """LightGBM's parameters for this run."""
        params: dict[str, Any] = {
            "boosting": self.boosting, "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf, "max_bin": self.max_bin, "num_threads": self.threads,
            "seed": self.seed, "deterministic": True, "force_col_wise": True, "verbose": -1,
        }
        if num_class > 2:
            params.update(objective="multiclass", num_class=num_class, metric="multi_error")
        else:
            params.update(objective="binary", metric="binary_error")
        if self.boosting == "dart":
            params.update(drop_rate=self.rate, skip_drop=self.skip_drop, max_drop=self.max_drop)
        elif self.boosting == "rf":
            keep = 1 - self.rate if self.rate is not None else math.sqrt(num_features) / num_features
            params.update(bagging_fraction=BOOTSTRAP_SHARE, bagging_freq=1, feature_fraction_bynode=min(1.0, keep))
        return params


def load_table(config: TreeConfig) -> Table:
    """The run's data: the ``data`` file, or else the lab image dataset."""
    if config.data is not None:
        return table_from_file(config.data, config.target, limit_train=config.limit_train)
    return image_table(config.dataset, config.data_dir, val_size=config.val_size, limit_train=config.limit_train,
                       limit_test=config.limit_test)


def _predict_classes(booster: Any, X: np.ndarray) -> np.ndarray:
    """Class indices the booster predicts for ``X``."""
    scores = booster.predict(X)
    return scores.argmax(axis=1) if scores.ndim == 2 else (scores > 0.5).astype(np.int64)


def _accuracy(booster: Any, part: Part) -> float | None:
    return float((_predict_classes(booster, part.X) == part.y).mean()) if len(part) else None


class BestSnapshot:
    """LightGBM callback: the early-stopping rule of the module docstring.

    Every ``eval_every`` rounds (and at the last round) it appends one history row of the current
    ensemble's accuracies, read from LightGBM's own incremental error metric on the data sets named
    ``train``, ``val`` and ``test``; when the validation accuracy beats every earlier one it keeps
    ``model_to_string()`` of the whole ensemble; after ``patience`` evaluations without a new best
    it ends training.

    Args:
        eval_every: rounds between evaluations.
        patience: evaluations without a new best before stopping; None trains every round.
        rate: the row's ``p`` (DART's drop rate; 0 for plain boosting, None for a forest).

    Example::

        snapshot = BestSnapshot(eval_every=10, patience=3, rate=0.1)
        lightgbm.train(params, train_set, 300, valid_sets=[train_set, val_set], valid_names=["train", "val"],
                       callbacks=[snapshot])
        best = lightgbm.Booster(model_str=snapshot.best_model)
    """

    order = 30

    def __init__(self, eval_every: int, patience: int | None, rate: float | None) -> None:
        self.eval_every, self.patience, self.rate = eval_every, patience, rate
        self.history: list[dict[str, Any]] = []
        self.best_val: float | None = None
        self.best_round: int | None = None
        self.best_model: str | None = None
        self._since_best = 0
        self._clock = time.perf_counter()

    def __call__(self, env: Any) -> None:
        rounds = env.iteration + 1
        if rounds % self.eval_every and rounds != env.end_iteration:
            return
        seconds = time.perf_counter() - self._clock
        acc = {name: 1.0 - value for name, _, value, *_ in env.evaluation_result_list}
        train, val, test = acc.get("train"), acc.get("val"), acc.get("test")
        self.history.append({
            "epoch": len(self.history) + 1, "rounds": rounds, "p": self.rate, "lr": env.params.get("learning_rate"),
            "train_loss": None, "train_acc": train, "train_eval_acc": train, "val_loss": None, "val_acc": val,
            "test_loss": None, "test_acc": test, "gap": train - test if None not in (train, test) else None,
            "seconds": seconds, "eval_seconds": 0.0, "peak_rss_mib": None, "saved_mib": 0.0,
        })
        if val is not None:
            if self.best_val is None or val > self.best_val:
                self.best_val, self.best_round, self._since_best = val, rounds, 0
                self.best_model = env.model.model_to_string(num_iteration=-1)
            else:
                self._since_best += 1
        self._clock = time.perf_counter()
        if self.patience is not None and self._since_best >= self.patience:
            lightgbm = require_lightgbm()
            raise lightgbm.callback.EarlyStopException(self.best_round - 1, env.evaluation_result_list)


@dataclass
class TreeResult:
    """A trained ensemble: the returned booster, its history and where training stood."""

    booster: Any
    history: list[dict[str, Any]]
    best_round: int | None
    rounds_trained: int
    fit_seconds: float


def fit(config: TreeConfig, table: Table,
        callbacks: Callable[[BestSnapshot], list[Callable[[Any], None]]] | None = None) -> TreeResult:
    """Train one ensemble on ``table`` under ``config`` with the :class:`BestSnapshot` rule.

    Args:
        config: the run (validated here).
        table: training, validation and test rows; validation drives the snapshot and patience,
            test is only recorded.
        callbacks: given the run's :class:`BestSnapshot`, returns more LightGBM callbacks (a
            sweep's reporter reads the snapshot's history).

    Returns:
        A :class:`TreeResult` whose booster is the best-validation snapshot (the last model when
        there is no validation set).

    Example::

        table = image_table("mnist", limit_train=2000, limit_test=1000)
        result = fit(TreeConfig(boosting="dart", rate=0.1, rounds=50), table)
        result.best_round, result.booster.num_trees()
    """
    config.validate()
    lightgbm = require_lightgbm()
    if table.num_classes < 2:
        raise ValueError(f"{table.name}: need at least 2 classes, found {table.num_classes}")
    params = config.params(table.num_classes, table.train.X.shape[1])
    train_set = lightgbm.Dataset(table.train.X, table.train.y, params={"max_bin": config.max_bin, "verbose": -1},
                                 free_raw_data=False)
    sets, names = [train_set], ["train"]
    for name, part in (("val", table.val), ("test", table.test)):
        if len(part):
            sets.append(lightgbm.Dataset(part.X, part.y, reference=train_set))
            names.append(name)
    tree_drop_rate = {"gbdt": 0.0, "dart": config.rate, "rf": None}[config.boosting]
    snapshot = BestSnapshot(config.eval_every, config.patience if len(table.val) else None, tree_drop_rate)
    start = time.perf_counter()
    booster = lightgbm.train(params, train_set, num_boost_round=config.rounds, valid_sets=sets, valid_names=names,
                             callbacks=[snapshot, *(callbacks(snapshot) if callbacks else [])])
    fit_seconds = time.perf_counter() - start
    rounds_trained = snapshot.history[-1]["rounds"] if snapshot.history else 0
    if snapshot.best_model is not None:
        booster = lightgbm.Booster(model_str=snapshot.best_model)
    return TreeResult(booster, snapshot.history, snapshot.best_round, rounds_trained, fit_seconds)


def final_figures(result: TreeResult, table: Table) -> dict[str, Any]:
    """The returned model's accuracies, each predicted afresh, and the run's cost."""
    train, val, test = (_accuracy(result.booster, part) for part in (table.train, table.val, table.test))
    return {
        "train_acc": train, "train_eval_acc": train, "val_acc": val, "test_acc": test,
        "gap": train - test if None not in (train, test) else None,
        "best_round": result.best_round, "rounds_trained": result.rounds_trained,
        "trees": result.booster.num_trees(), "fit_seconds": result.fit_seconds,
        "seconds_per_round": result.fit_seconds / max(1, result.rounds_trained),
    }


def train_trees(config: TreeConfig, out_dir: str | Path | None = None, *, table: Table | None = None) -> dict[str, Any]:
    """Train one run and return ``{"history", "final"}``; with ``out_dir``, also write
    ``metrics.jsonl`` (one row per evaluation), ``final.json`` and ``model.txt`` (LightGBM's text
    format) there. ``table`` is the data when already loaded (else :func:`load_table`)."""
    table = load_table(config) if table is None else table
    result = fit(config, table)
    final = final_figures(result, table)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in result.history))
        (out / "final.json").write_text(json.dumps({"config": config.to_dict(), **final}, indent=2) + "\n")
        result.booster.save_model(str(out / "model.txt"))
    return {"history": result.history, "final": final}


def run_tree_settings(
    base: TreeConfig, settings: list[TreeSetting], out_dir: str | Path, *, seeds: int = 1, progress: bool = False,
) -> list[dict[str, Any]]:
    """Train every setting with ``seeds`` seeds (``base.seed``, ``base.seed + 1``, ...), one run
    after another in this process, under ``out_dir/<label>/seed=<seed>``; the data is read once.
    Returns one dict per run: label, seed, config, history, final."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    if not settings:
        raise ValueError("compare needs at least one setting (--reg)")
    require_lightgbm()
    base.validate()
    table = load_table(base)
    runs = []
    for setting in settings:
        for seed in range(base.seed, base.seed + seeds):
            config = dataclasses.replace(base, boosting=setting.boosting, rate=setting.rate, seed=seed,
                                         label=setting.label)
            config.validate()
            run_dir = str(Path(out_dir) / setting.label / f"seed={seed}")
            outcome = train_trees(config, run_dir, table=table)
            if progress:
                final = outcome["final"]
                print(f"{setting.label} seed {seed}: test {100 * final['test_acc']:.2f}%, "
                      f"{final['rounds_trained']} rounds in {final['fit_seconds']:.1f} s", flush=True)
            runs.append({"label": setting.label, "seed": seed, "config": config.to_dict(), **outcome})
    return runs
