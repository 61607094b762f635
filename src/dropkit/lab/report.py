"""Render a comparison as ``report.json`` and a self-contained ``report.html`` (plots embedded as PNG).

The page answers, with this comparison's numbers: how training and test accuracy moved per epoch
under each setting (learning curves: the mean over seeds, shaded one spread either side), how
large the generalisation gap ended, how accuracy depends on p, and what each setting cost in time
per epoch and memory. Every figure is a mean over seeds with its spread (``±``). A chart that
would carry no information is left out, with a line saying why: a bar chart whose bars differ
from the baseline by no more than noise (or by nothing, for memory), accuracy against p with
fewer than three rates (the table already holds two points).
"""

from __future__ import annotations

import base64
import html
import io
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dropkit.lab.compare import by_label, write_json  # noqa: E402


def _png(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _curve(group: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and spread over seeds of ``key`` (in %), over the epochs every seed reached."""
    epochs = min(len(run["history"]) for run in group)
    means, spreads = [], []
    for i in range(epochs):
        values = [100 * run["history"][i][key] for run in group]
        means.append(statistics.fmean(values))
        spreads.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return list(range(1, epochs + 1)), means, spreads


def learning_curves(runs: list[dict[str, Any]]) -> str:
    """Training-data (dashed) and test (solid) accuracy per epoch, per setting, both in eval mode;
    the mean over seeds, with a band of one spread either side of the test curve."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, (label, group) in enumerate(by_label(runs).items()):
        colour = f"C{index % 10}"
        epochs, train_mean, _ = _curve(group, "train_eval_acc")
        _, test_mean, test_spread = _curve(group, "test_acc")
        ax.plot(epochs, train_mean, "--", color=colour)
        ax.plot(epochs, test_mean, "-", color=colour, label=label)
        if len(group) > 1:
            ax.fill_between(epochs, [m - s for m, s in zip(test_mean, test_spread)],
                            [m + s for m, s in zip(test_mean, test_spread)], color=colour, alpha=0.15, linewidth=0)
    seeds = len(next(iter(by_label(runs).values())))
    ax.set(xlabel="epoch", ylabel="accuracy (%)",
           title="Learning curves (solid: test, dashed: train" + (f"; mean of {seeds} seeds)" if seeds > 1 else ")"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _bars(labels: list[str], values: list[float], spreads: list[float | None], ylabel: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    errors = [s or 0.0 for s in spreads] if any(s is not None for s in spreads) else None
    ax.bar(labels, values, yerr=errors, capsize=4, color=[f"C{i % 10}" for i in range(len(labels))])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def accuracy_against_p(rows: list[dict[str, Any]]) -> str | None:
    """Train, validation and test accuracy against p (mean over seeds, one spread as error bar),
    when the settings hold three rates or more (None otherwise); settings without a p (a random
    forest) are left out."""
    rows = [row for row in rows if row["p"] is not None]
    ps = [row["p"] for row in rows]
    if len(set(ps)) < 3:
        return None
    order = sorted(range(len(rows)), key=lambda i: ps[i])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key, style in (("train_eval_acc", "--o"), ("val_acc", ":s"), ("test_acc", "-o")):
        if any(rows[i][key] is None for i in order):
            continue
        label = {"train_eval_acc": "train (eval mode)", "val_acc": "validation", "test_acc": "test"}[key]
        spreads = [rows[i][f"{key}_spread"] for i in order]
        errors = [100 * s for s in spreads] if all(s is not None for s in spreads) else None
        ax.errorbar([ps[i] for i in order], [100 * rows[i][key] for i in order], yerr=errors, fmt=style,
                    capsize=3, label=label)
    ax.set(xlabel="p (drop probability)", ylabel="final accuracy (%)", title="Accuracy against p")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _cell(row: dict[str, Any], key: str, fmt: str, scale: float) -> str:
    value = row[key]
    if value is None:
        return "-"
    spread = row.get(f"{key}_spread")
    return fmt.format(scale * value) + (f" ± {fmt.format(scale * spread).lstrip('+')}" if spread is not None else "")


def _table(rows: list[dict[str, Any]], best: str | None) -> str:
    columns = [("train acc % (dropout on)", "train_acc", "{:.2f}", 100), ("train acc % (eval)", "train_eval_acc",
               "{:.2f}", 100), ("val acc %", "val_acc", "{:.2f}", 100), ("test acc %", "test_acc", "{:.2f}", 100),
               ("gap (points)", "gap", "{:+.2f}", 100), ("s/epoch", "seconds_per_epoch", "{:.3f}", 1),
               ("first epoch s", "first_epoch_seconds", "{:.2f}", 1), ("time x", "time_ratio", "{:.2f}", 1),
               ("saved MiB", "saved_mib", "{:.2f}", 1), ("peak RSS MiB", "peak_rss_mib", "{:.0f}", 1)]
    head = "<th>setting</th>" + "".join(f"<th>{html.escape(name)}</th>" for name, _, _, _ in columns)
    body = []
    for row in rows:
        cells = f"<td>{html.escape(row['label'])}</td>" + "".join(
            f"<td>{html.escape(_cell(row, key, fmt, scale))}</td>" for _, key, fmt, scale in columns)
        body.append(f"<tr{' class=best' if row['label'] == best else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _beyond_noise(rows: list[dict[str, Any]], key: str) -> bool:
    """Whether any setting differs from the baseline by more than noise in ``key``."""
    return any(row["beyond_noise"][key] for row in rows)


def figures(runs: list[dict[str, Any]], summary: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """The charts of the page: (heading, PNG as base64 or None when left out, why it was left out)."""
    rows = summary["settings"]
    labels = [row["label"] for row in rows]
    one_seed = summary["seeds"] == 1
    noise = ("one seed per setting, so differences cannot be told from noise" if one_seed
             else "no setting differs from the baseline by more than the noise between seeds")
    saved = [r["saved_mib"] for r in rows]
    charts: list[tuple[str, str | None, str]] = [("Learning curves", learning_curves(runs), "")]
    charts.append(("Generalisation gap (final train accuracy - test accuracy)",
                   _bars(labels, [100 * r["gap"] for r in rows],
                         [100 * r["gap_spread"] if r["gap_spread"] is not None else None for r in rows],
                         "gap (points)", "Generalisation gap per setting") if _beyond_noise(rows, "gap") else None,
                   noise))
    charts.append(("Accuracy against p", accuracy_against_p(rows),
                   "fewer than three rates: the table holds every point"))
    charts.append(("Time per epoch",
                   _bars(labels, [r["seconds_per_epoch"] for r in rows], [r["seconds_per_epoch_spread"] for r in rows],
                         "seconds (median of epochs after the first)", "Training time per epoch")
                   if _beyond_noise(rows, "seconds_per_epoch") else None,
                   "no setting's epochs differ from the baseline's by more than their noise"))
    charts.append(("Memory kept for backward (one batch)",
                   _bars(labels, saved, [None] * len(rows), "MiB", "Tensors saved for backward per batch")
                   if max(saved) > 1.01 * min(saved) else None, "every setting keeps the same memory"))
    return charts


def render_html(title: str, runs: list[dict[str, Any]], summary: dict[str, Any], context: dict[str, Any]) -> str:
    """The whole report page as one HTML string, images inline."""
    rows = summary["settings"]
    sections = "".join(
        f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
        if data is not None else f"<p class=omitted>{html.escape(name)}: chart left out ({html.escape(why)}).</p>"
        for name, data, why in figures(runs, summary)
    )
    statements = "".join(f"<li>{html.escape(s)}</li>" for s in summary["statements"])
    setup = html.escape(", ".join(f"{k}={v}" for k, v in context.items() if k != "warmup_seconds"))
    seeds = summary["seeds"]
    warmup = context.get("warmup_seconds")
    timing = ("Kernel warm-up (compiled, or loaded from the cache) took "
              f"{warmup:.2f} s, before any run and outside every epoch's time. " if warmup is not None else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:64em;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}
td{{white-space:nowrap}}
td:first-child{{text-align:left}}tr.best{{background:#e6f4e6}}img{{max-width:100%}}p.omitted{{color:#666}}</style>
</head>
<body><h1>{html.escape(title)}</h1><p>{setup}</p>
<h2>What dropout did</h2><ul>{statements}</ul>
<p>{"Each setting was trained with " + str(seeds) + " seeds; ± is the spread (standard deviation) over them. "
     "A difference is called real only when Welch's t-test at the 5 % level says it exceeds that noise."
     if seeds > 1 else "Each setting was trained with one seed: no difference in accuracy can be told from noise "
     "(use --seeds 3 or more)."}</p>
<h2>Figures per setting</h2>{_table(rows, summary['best_on_validation'])}
<p>Highlighted: best on validation data. "Train acc (dropout on)" is measured during training; "train acc
(eval)" on 10,000 training examples with every unit, like the test figure; the gap is eval train minus test.
{html.escape(timing)}Time per epoch is the median of the epochs after each run's first (± their spread); the first
epoch, which also pays one-off costs, is shown apart. Peak RSS is each run's own process.</p>
{sections}</body></html>
"""


def write_report(out_dir: str | Path, title: str, runs: list[dict[str, Any]], summary: dict[str, Any],
                 context: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` (everything, machine-readable) and ``report.html``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    write_json(json_path, {"title": title, "context": context, "summary": summary, "runs": runs})
    html_path.write_text(render_html(title, runs, summary, context))
    return json_path, html_path
