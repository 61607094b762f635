"""Tree-ensemble settings side by side over several seeds, in the shape :mod:`dropkit.lab.report`
renders: per setting the mean and spread over seeds of training, validation and test accuracy,
the train-test gap and the training time, and plain statements.

A difference between two settings is stated only when it is larger than the noise between
seeds, by the same test as the network comparison (:func:`dropkit.lab.stats.differs`: Welch's
t-test at the 5 % level on the per-seed values). A setting whose runs do not depend on the seed
(plain boosting without row or feature sampling) has no spread of its own, and the test then
weighs the difference against the other setting's spread alone. With one seed per setting no
difference is stated at all.

The baseline is plain boosting (``none``) when present, else the first setting.
"""

from __future__ import annotations

import statistics
from typing import Any

from dropkit.lab.stats import differs, estimate

__all__ = ["FIGURES", "summarise_trees"]

#: figures of the returned model, summarised per setting over its seeds
FIGURES = ("train_acc", "train_eval_acc", "val_acc", "test_acc", "gap", "fit_seconds", "seconds_per_round",
           "best_round", "rounds_trained")


def _differs(row: dict[str, Any], baseline: dict[str, Any], key: str) -> bool | None:
    if row[key] is None or baseline[key] is None:
        return None
    return differs(estimate(row[f"{key}_values"]), estimate(baseline[f"{key}_values"]))


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise_trees(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-setting figures (mean, spread = sample standard deviation over seeds, and the values)
    and statements, from runs of :func:`dropkit.lab.trees.run_tree_settings`."""
    if not runs:
        raise ValueError("no runs to summarise")
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    rows = []
    for label, group in groups.items():
        finals = [run["final"] for run in group]
        row: dict[str, Any] = {"label": label, "p": group[0]["history"][-1]["p"],
                               "boosting": group[0]["config"]["boosting"], "rate": group[0]["config"]["rate"],
                               "seeds": [run["seed"] for run in group], "epochs": len(group[0]["history"])}
        for key in FIGURES:
            values = [final[key] for final in finals]
            row[key], row[f"{key}_spread"] = _stats(values)
            row[f"{key}_values"] = values
        # the report's columns: an "epoch" of a tree model is one block of eval_every rounds
        epoch_seconds = [r["seconds"] for run in group for r in run["history"]]
        row["seconds_per_epoch"] = statistics.median(epoch_seconds)
        row["seconds_per_epoch_values"] = epoch_seconds
        row["seconds_per_epoch_spread"] = statistics.stdev(epoch_seconds) if len(epoch_seconds) > 1 else None
        row["first_epoch_seconds"] = statistics.fmean(run["history"][0]["seconds"] for run in group)
        row["peak_rss_mib"] = None  # the runs share one process, so no run has a peak of its own
        row["saved_mib"], row["saved_mib_spread"] = 0.0, None
        rows.append(row)
    baseline = next((row for row in rows if row["boosting"] == "gbdt"), rows[0])
    with_val = [row for row in rows if row["val_acc"] is not None]
    best = max(with_val, key=lambda row: row["val_acc"]) if with_val else None
    for row in rows:
        row["gap_vs_baseline"] = row["gap"] - baseline["gap"] if None not in (row["gap"], baseline["gap"]) else None
        row["time_ratio"] = row["fit_seconds"] / baseline["fit_seconds"]
        row["saved_ratio"] = None
        row["beyond_noise"] = {key: _differs(row, baseline, key) for key in
                               ("test_acc", "train_eval_acc", "gap", "fit_seconds", "seconds_per_epoch")}
        row["beyond_noise"]["saved_mib"] = False
    return {
        "baseline": baseline["label"],
        "best_on_validation": best["label"] if best else None,
        "seeds": len(baseline["seeds"]),
        "rule": "a difference is stated when Welch's t-test at the 5 % level finds it beyond the noise between seeds",
        "settings": rows,
        "statements": _statements(rows, baseline, best),
    }


def _pct(row: dict[str, Any], key: str) -> str:
    spread = row[f"{key}_spread"]
    return f"{100 * row[key]:.2f}%" + (f" ± {100 * spread:.2f}" if spread is not None else "")


def _compare(row: dict[str, Any], baseline: dict[str, Any], key: str, higher: str, lower: str) -> str:
    """``higher``/``lower`` beyond the noise between seeds, or "within the noise"."""
    verdict = row["beyond_noise"][key]
    delta = round(100 * (row[key] - baseline[key]), 2) + 0.0  # + 0.0: no "-0.00"
    if verdict is None:
        return f"{delta:+.2f} points, one seed per setting so no difference is claimed"
    if verdict:
        return f"{higher if delta > 0 else lower} by {abs(delta):.2f} points, beyond the noise between seeds"
    return f"{delta:+.2f} points, within the noise between seeds"


def _statements(rows: list[dict[str, Any]], baseline: dict[str, Any], best: dict[str, Any] | None) -> list[str]:
    said = []
    n = len(baseline["seeds"])
    for row in rows:
        if row is baseline or row["test_acc"] is None:
            continue
        said.append(
            f"{row['label']}: test accuracy {_pct(row, 'test_acc')} against {_pct(baseline, 'test_acc')} for "
            f"{baseline['label']} ({_compare(row, baseline, 'test_acc', 'higher', 'lower')}); train-test gap "
            f"{_pct(row, 'gap')} against {_pct(baseline, 'gap')} "
            f"({_compare(row, baseline, 'gap', 'larger', 'smaller')}); training time x{row['time_ratio']:.2f}."
        )
    if best is not None:
        said.append(f"Best on validation data: {best['label']} (validation accuracy {_pct(best, 'val_acc')}, "
                    f"test accuracy {_pct(best, 'test_acc')}).")
    darts = [row for row in rows if row["boosting"] == "dart" and row["val_acc"] is not None]
    if darts and baseline["boosting"] == "gbdt":
        pick = max(darts, key=lambda row: row["val_acc"])
        wins = [what for what, key, sign in (("test accuracy", "test_acc", 1), ("train-test gap", "gap", -1))
                if pick["beyond_noise"][key] and sign * (pick[key] - baseline[key]) > 0]
        if wins:
            said.append(f"DART's best rate on validation data, {pick['label']}, beats plain boosting on "
                        f"{' and '.join(wins)} by more than the noise between seeds ({n} seeds).")
        else:
            said.append(f"DART's best rate on validation data, {pick['label']}, does not beat plain boosting on test "
                        f"accuracy or the train-test gap by more than the noise between seeds ({n} seeds).")
    return said
