"""What a sweep reports: ``sweep.json`` (every trial, the best on validation and its test
accuracy), the table printed at the end, and ``sweep.png``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from dropkit.lab.sweep.config import SweepConfig, search_space, trial_config  # noqa: E402
from dropkit.lab.sweep.promote import (  # noqa: E402
    DONE,
    FINISHED,
    config_of,
    epochs_trained,
    next_job,
    read_jobs,
    resumes_from,
)
from dropkit.lab.sweep.study import STORAGE_FILE, retry_history  # noqa: E402
from dropkit.lab.sweep.trial import TrainFn  # noqa: E402
from dropkit.lab.train import CHECKPOINT, finished_history, train  # noqa: E402

__all__ = ["PLOT_FILE", "SUMMARY_FILE", "TRIALS_DIR", "fmt", "format_table", "plot_sweep", "say", "summarise"]

TRIALS_DIR = "trials"
SUMMARY_FILE = "sweep.json"
PLOT_FILE = "sweep.png"

Log = Callable[[str], None]


def say(line: str) -> None:
    """The default log: one line to stdout, flushed so that progress shows when piped to a file."""
    print(line, flush=True)


def _trial_row(trial: FrozenTrial, promote: bool) -> dict[str, Any]:
    """A trial's line of sweep.json; with ``--pruner promote`` also its job: the configuration, the
    epoch it resumed from and the epochs it trained (its curve includes the copied epochs)."""
    values = [value for _, value in sorted(trial.intermediate_values.items())]
    note = "surplus: created past the budget, never trained" if trial.user_attrs.get("surplus") else None
    if trial.user_attrs.get("duplicate"):
        note = "duplicate: the same promotion was made first by another worker; never trained"
    job = {"config": config_of(trial), "resumes_from": resumes_from(trial),
           "epochs_trained": epochs_trained(trial)} if promote else {}
    return {
        "trial": trial.number,
        **job,
        "state": trial.state.name,
        "params": trial.params,
        "val_acc": trial.value,
        "best_val_acc": max(values) if values else None,
        "epochs": len(values),
        "val_acc_per_epoch": values,
        "retry_of": retry_history(trial)[-1] if retry_history(trial) else None,
        "note": note,
        "run_dir": trial.user_attrs.get("run_dir"),
    }


def summarise(study: optuna.Study, cfg: SweepConfig, train_fn: TrainFn = train, log: Log = say) -> dict[str, Any]:
    """Every trial, the best on validation and, once the study is complete, that trial's test accuracy.

    ``val_acc`` is a trial's value (its last epoch's validation accuracy); ``best_val_acc`` the best
    epoch's. The epoch count compares the epochs trained with a full grid: the same number of
    settings, each trained for every epoch. With ``--pruner promote`` a row is one job, the
    settings are the configurations whose first job finished (``cfg.trials`` once complete), and
    a promotion's copied epochs are not counted as spent.
    """
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    promote = cfg.pruner == "promote"
    spent = sum(epochs_trained(t) for t in trials)
    settings = len(read_jobs(trials, cfg.base.epochs).started) if promote else len(finished)
    full_grid = settings * cfg.base.epochs
    summary: dict[str, Any] = {
        "study": cfg.study_name,
        "storage": cfg.storage or str(cfg.out_dir / STORAGE_FILE),
        "model": cfg.base.model,
        "dataset": cfg.base.dataset,
        "search_space": search_space(cfg),
        "pruner": cfg.pruner,
        "trials_requested": cfg.trials,
        "trials_finished": len(finished),
        "complete": next_job(trials, cfg) == DONE if promote else len(finished) >= cfg.trials,
        "epochs": {"spent": spent, "per_full_run": cfg.base.epochs, "full_grid": full_grid,
                   "fraction_of_full_grid": spent / full_grid if full_grid else None},
        "config": cfg.base.to_dict(),
        "trials": [_trial_row(t, promote) for t in trials],
        "best": None,
    }
    if promote:
        summary["configurations"] = {"requested": cfg.trials, "started": settings}
    if complete:
        best = max(complete, key=lambda t: (t.value, -t.number))
        summary["best"] = {"trial": best.number, **({"config": config_of(best)} if promote else {}),
                           "params": best.params, "val_acc": best.value,
                           "epochs": len(best.intermediate_values), "run_dir": best.user_attrs.get("run_dir"),
                           "test_acc": None}
        if summary["complete"]:
            summary["best"]["test_acc"] = _winner_test_accuracy(cfg, best, train_fn, log)
    return summary


def _winner_test_accuracy(cfg: SweepConfig, best: FrozenTrial, train_fn: TrainFn, log: Log) -> float:
    """The winner's test accuracy at its last epoch. A finished run's is read from its checkpoint
    without taking its lock, so the workers of a sweep that summarise it at the same moment never
    clash over the folder; a winner trained on another machine (its run is not here) is trained
    again here, which the sweep does under this machine's lock (see ``run_sweep``)."""
    run_dir = Path(best.user_attrs.get("run_dir") or cfg.out_dir / TRIALS_DIR / f"{cfg.study_name}-{best.number:04d}")
    config = trial_config(cfg.base, best.params)
    history = finished_history(run_dir, config)
    if history is None:
        if not (run_dir / CHECKPOINT).exists():
            host = best.user_attrs.get("owner", {}).get("host")
            log(f"trial {best.number}'s run is not in {run_dir} (trained on {host}?): "
                f"training it again there for its test accuracy")
        history = train_fn(config, run_dir, resume=True, quiet=True).history
    return history[-1]["test_acc"]


def format_table(summary: dict[str, Any]) -> str:
    """One line per trial: number, searched values, validation accuracy, epochs, state; * = best.
    With ``--pruner promote`` a line is one job: its configuration comes after the trial number,
    and ``epochs`` shows the epochs it trained (e.g. ``4-9`` for a promotion from rung 3)."""
    names = list(summary["search_space"])
    best = summary["best"]["trial"] if summary["best"] else None
    promote = summary["pruner"] == "promote"
    header = (f"{'trial':>6}  " + (f"{'config':>7}" if promote else "") + "".join(f"{n:>13}" for n in names)
              + f"{'val acc':>9}{'best val':>10}{'epochs':>8}  state")
    lines = [header, "-" * len(header)]
    for row in summary["trials"]:
        if row["note"]:
            continue
        config = f"{row['config']:>7}" if promote else ""
        params = "".join(f"{fmt(row['params'][n]) if n in row['params'] else '-':>13}" for n in names)
        val = f"{100 * row['val_acc']:.2f}%" if row["val_acc"] is not None else "-"
        best_val = f"{100 * row['best_val_acc']:.2f}%" if row["best_val_acc"] is not None else "-"
        epochs = _job_epochs(row) if promote else row["epochs"]
        mark = "*" if row["trial"] == best else " "
        lines.append(f"{row['trial']:>5}{mark}  {config}{params}{val:>9}{best_val:>10}{epochs:>8}  "
                     f"{row['state'].lower()}")
    return "\n".join(lines)


def _job_epochs(row: dict[str, Any]) -> str:
    """The epochs a job trained, as ``first-last`` (one number for one epoch, ``-`` for none)."""
    last, trained = row["epochs"], row["epochs_trained"]
    if not trained:
        return "-"
    return str(last) if trained == 1 else f"{last - trained + 1}-{last}"


def _plotted_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows with a value; with ``--pruner promote`` only each configuration's furthest job, so
    that a point is a configuration at the last rung it reached."""
    rows = [r for r in summary["trials"] if r["val_acc"] is not None]
    if summary["pruner"] != "promote":
        return rows
    furthest: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["config"] not in furthest or row["epochs"] > furthest[row["config"]]["epochs"]:
            furthest[row["config"]] = row
    return list(furthest.values())


def plot_sweep(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    """Validation accuracy (each trial's value) against each searched value, one panel each;
    pruned trials hollow (their value is from the epoch they stopped at), the best starred.
    With ``--pruner promote`` a point is a configuration (see :func:`_plotted_rows`)."""
    space = summary["search_space"]
    fig, axes = plt.subplots(1, len(space), figsize=(4.2 * len(space), 3.6), squeeze=False)
    rows = _plotted_rows(summary)
    best = summary["best"]
    for ax, (name, (kind, low, high, _step)) in zip(axes[0], space.items(), strict=True):
        for state, style in (("COMPLETE", {"color": "C0"}), ("PRUNED", {"facecolors": "none", "edgecolors": "C1"})):
            points = [(r["params"][name], 100 * r["val_acc"]) for r in rows if r["state"] == state]
            if points:
                ax.scatter([x for x, _ in points], [y for _, y in points], label=state.lower(), **style)
        if best is not None:
            ax.scatter([best["params"][name]], [100 * best["val_acc"]], marker="*", s=220, color="C3",
                       label=f"best (trial {best['trial']})", zorder=3)
        ax.set_xscale("log" if kind == "log" else "linear")
        ax.set(xlabel=name, ylabel="validation accuracy (%)", xlim=(low, high))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"dropkit sweep: {summary['model']} on {summary['dataset']}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def fmt(value: float) -> str:
    return f"{value:.3f}" if 1e-3 <= abs(value) < 1e3 or value == 0 else f"{value:.2e}"
