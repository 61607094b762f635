"""A search over DART's drop rate with Optuna, pruned like the network sweep
(``dropkit sweep --model gbdt``).

Each trial trains one DART ensemble (:func:`dropkit.lab.trees.fit`) at the rate the sampler
proposes and reports its validation accuracy at every evaluation point (every ``eval_every``
rounds, the tree counterpart of an epoch; steps counted from 1). The pruners are the network
sweep's: successive halving with rungs at 1, 3, 9, ... evaluations (reduction factor 3), or the
median rule after 2 unpruned trials and from the second evaluation on; ``none`` trains every
trial in full. The network sweep's default, ``promote``, pauses trials and resumes them from
checkpoints; a DART ensemble cannot be paused and resumed exactly (its drops depend on the whole
run), so tree sweeps run ``promote`` as ``halving``, which prunes at the same rungs.

A trial's value is the validation accuracy of the model it returns, which is the best-validation
snapshot of :class:`~dropkit.lab.trees.BestSnapshot` (patience applies within a trial). The study
lives in a journal file in the output folder; running the same command again continues it until
``trials`` trials have finished. ``sweep.json`` lists every trial and the best one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from dropkit.lab.trees import BestSnapshot, TreeConfig, final_figures, fit, load_table, require_lightgbm

__all__ = ["TREE_PRUNERS", "TreeSweepConfig", "open_study", "run_tree_sweep", "summarise"]

#: pruners a tree sweep accepts (``promote`` runs as ``halving``, see the module docstring)
TREE_PRUNERS = ("halving", "median", "none", "promote")
JOURNAL_FILE = "study.journal"
SUMMARY_FILE = "sweep.json"
#: sampler seed offset, apart from the ensembles' own seeds
SAMPLER_STREAM = 11


@dataclass
class TreeSweepConfig:
    """A sweep of DART's drop rate.

    Args:
        base: every trial's config but the rate (``boosting`` becomes ``dart``).
        out_dir: journal, ``trials/<number>/`` and ``sweep.json``.
        trials: finished trials (complete or pruned) the study should hold.
        pruner: ``halving``, ``median``, ``none`` (or ``promote``, run as ``halving``).
        rate_range: lowest and highest drop rate, ``0 <= LOW < HIGH < 1``.
        rate_step: lattice step of the rates (None: continuous); with LOW 0 the lattice starts at
            one step, since a rate of 0 is plain boosting.
    """

    base: TreeConfig
    out_dir: Path
    trials: int = 12
    pruner: str = "halving"
    rate_range: tuple[float, float] = (0.0, 0.5)
    rate_step: float | None = 0.05

    def validate(self) -> None:
        self.base.validate()
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"--trials must be an int >= 1, got {self.trials!r}")
        if self.pruner not in TREE_PRUNERS:
            raise ValueError(f"--pruner must be one of {', '.join(TREE_PRUNERS)}, got {self.pruner!r}")
        low, high = self.rate_range
        if not 0.0 <= low < high < 1.0:
            raise ValueError(f"--p-range must satisfy 0 <= LOW < HIGH < 1, got {low:g} {high:g}")
        if self.rate_step is None and low == 0:
            raise ValueError("a continuous search of DART's drop rate needs --p-range LOW > 0 (a rate of 0 is plain "
                             "boosting); or give --p-step")
        if self.rate_step is not None and not 0 < self.rate_step <= high - low:
            raise ValueError(f"--p-step must be in (0, HIGH - LOW] = (0, {high - low:g}], got {self.rate_step:g}")
        if self.base.val_size < 1 and self.base.data is None:
            raise ValueError("--val-size must be >= 1: the sweep selects on validation accuracy")

    def lattice(self) -> tuple[float, float, float | None]:
        """``(low, high, step)`` as handed to Optuna: the lattice's first and last points."""
        low, high = self.rate_range
        step = self.rate_step
        if step is None:
            return low, high, None
        first = low if low > 0 else step
        last = round(first + math.floor((high - first) / step + 1e-9) * step, 12)
        return first, last, step


def _pruner(name: str) -> optuna.pruners.BasePruner:
    if name in ("halving", "promote"):
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    return optuna.pruners.NopPruner()


class _Reporter:
    """LightGBM callback run after :class:`BestSnapshot`: reports each new evaluation to the trial
    and ends the trial when the pruner says so."""

    order = BestSnapshot.order + 1

    def __init__(self, trial: optuna.Trial, snapshot_history: list[dict[str, Any]]) -> None:
        self.trial, self.history, self.seen = trial, snapshot_history, 0

    def __call__(self, env: Any) -> None:
        if len(self.history) == self.seen:
            return
        self.seen = len(self.history)
        row = self.history[-1]
        self.trial.report(row["val_acc"], row["epoch"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {row['rounds']} rounds")


def open_study(cfg: TreeSweepConfig) -> optuna.Study:
    """The study in ``out_dir``'s journal file (created, or continued)."""
    from optuna.storages.journal import JournalFileBackend

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(cfg.out_dir / JOURNAL_FILE)))
    sampler = optuna.samplers.TPESampler(seed=cfg.base.seed * 1000 + SAMPLER_STREAM, n_startup_trials=4)
    return optuna.create_study(study_name="tree-sweep", storage=storage, direction="maximize", sampler=sampler,
                               pruner=_pruner(cfg.pruner), load_if_exists=True)


def run_tree_sweep(cfg: TreeSweepConfig) -> dict[str, Any]:
    """Run trials until ``cfg.trials`` have finished; write and return the summary."""
    cfg.validate()
    require_lightgbm()
    table = load_table(cfg.base)
    study = open_study(cfg)
    low, high, step = cfg.lattice()
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial: optuna.Trial) -> float:
        rate = round(trial.suggest_float("drop_rate", low, high, step=step), 12)
        config = dataclasses.replace(cfg.base, boosting="dart", rate=rate, label=f"dart:{rate:g}")
        result = fit(config, table, callbacks=lambda snapshot: [_Reporter(trial, snapshot.history)])
        final = final_figures(result, table)
        trial.set_user_attr("test_acc", final["test_acc"])
        trial.set_user_attr("rounds", result.rounds_trained)
        run_dir = cfg.out_dir / "trials" / str(trial.number)
        run_dir.mkdir(parents=True, exist_ok=True)
        result.booster.save_model(str(run_dir / "model.txt"))
        return final["val_acc"]

    while sum(t.state in finished for t in study.get_trials(deepcopy=False)) < cfg.trials:
        study.optimize(objective, n_trials=1)
    summary = summarise(study, cfg)
    (cfg.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarise(study: optuna.Study, cfg: TreeSweepConfig) -> dict[str, Any]:
    """Every trial (rate, state, value, evaluations reached) and the best complete one."""
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"trial": t.number, "drop_rate": t.params.get("drop_rate"), "state": t.state.name.lower(),
                       "val_acc": t.value, "test_acc": t.user_attrs.get("test_acc"),
                       "evaluations": len(t.intermediate_values), "rounds": t.user_attrs.get("rounds")})
    complete = [t for t in trials if t["state"] == "complete"]
    best = max(complete, key=lambda t: t["val_acc"]) if complete else None
    return {"pruner": cfg.pruner if cfg.pruner != "promote" else "halving", "trials": trials, "best": best,
            "config": cfg.base.to_dict(), "rate_lattice": list(cfg.lattice())}
