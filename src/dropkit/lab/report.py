"""Render a comparison as ``report.json`` and a self-contained ``report.html`` (plots embedded as PNG).

The page answers, with this run's numbers: how training and test accuracy moved per epoch under
each setting (learning curves), how large the generalisation gap ended, how test accuracy depends
on p, and what each setting cost in time per epoch and memory.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dropkit.lab.compare import write_json  # noqa: E402


def _png(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def learning_curves(runs: list[dict[str, Any]]) -> str:
    """Training-data (dashed) and test (solid) accuracy per epoch, per setting, both in eval mode."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, run in enumerate(runs):
        epochs = [row["epoch"] for row in run["history"]]
        colour = f"C{index % 10}"
        ax.plot(epochs, [100 * row["train_eval_acc"] for row in run["history"]], "--", color=colour)
        ax.plot(epochs, [100 * row["test_acc"] for row in run["history"]], "-", color=colour, label=run["label"])
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Learning curves (solid: test, dashed: train)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _bars(labels: list[str], values: list[float], ylabel: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(labels, values, color=[f"C{i % 10}" for i in range(len(labels))])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def accuracy_against_p(rows: list[dict[str, Any]]) -> str | None:
    """Train, validation and test accuracy against p, when the settings differ in p (None otherwise)."""
    ps = [row["p"] for row in rows]
    if len(set(ps)) < 2:
        return None
    order = sorted(range(len(rows)), key=lambda i: ps[i])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for key, style in (("train_eval_acc", "--o"), ("val_acc", ":s"), ("test_acc", "-o")):
        if any(rows[i][key] is None for i in order):
            continue
        label = {"train_eval_acc": "train (eval mode)", "val_acc": "validation", "test_acc": "test"}[key]
        ax.plot([ps[i] for i in order], [100 * rows[i][key] for i in order], style, label=label)
    ax.set(xlabel="p (drop probability)", ylabel="final accuracy (%)", title="Accuracy against p")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _table(rows: list[dict[str, Any]], best: str | None) -> str:
    columns = [("setting", "label", "{}"), ("train acc (dropout on)", "train_acc", "{:.2%}"),
               ("train acc (eval)", "train_eval_acc", "{:.2%}"), ("val acc", "val_acc", "{:.2%}"),
               ("test acc", "test_acc", "{:.2%}"), ("gap", "gap", "{:+.2%}"), ("s/epoch", "seconds_per_epoch", "{:.2f}"),
               ("time x", "time_ratio", "{:.2f}"), ("saved MiB", "saved_mib", "{:.2f}"),
               ("peak RSS MiB", "peak_rss_mib", "{:.0f}")]
    head = "".join(f"<th>{name}</th>" for name, _, _ in columns)
    body = []
    for row in rows:
        cells = "".join(
            f"<td>{html.escape(fmt.format(row[key]) if row[key] is not None else '-')}</td>" for _, key, fmt in columns
        )
        body.append(f"<tr{' class=best' if row['label'] == best else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(title: str, runs: list[dict[str, Any]], summary: dict[str, Any], context: dict[str, Any]) -> str:
    """The whole report page as one HTML string, images inline."""
    rows = summary["settings"]
    labels = [row["label"] for row in rows]
    figures = [
        ("Learning curves", learning_curves(runs)),
        ("Generalisation gap (final train accuracy - test accuracy)",
         _bars(labels, [100 * r["gap"] for r in rows], "gap (points)", "Generalisation gap per setting")),
        ("Accuracy against p", accuracy_against_p(rows)),
        ("Time per epoch", _bars(labels, [r["seconds_per_epoch"] for r in rows], "seconds", "Training time per epoch")),
        ("Memory kept for backward (one batch)",
         _bars(labels, [r["saved_mib"] for r in rows], "MiB", "Tensors saved for backward per batch")),
    ]
    sections = "".join(
        f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
        for name, data in figures if data is not None
    )
    statements = "".join(f"<li>{html.escape(s)}</li>" for s in summary["statements"])
    setup = html.escape(", ".join(f"{k}={v}" for k, v in context.items()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}
tr.best{{background:#e6f4e6}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{setup}</p>
<h2>What dropout did</h2><ul>{statements}</ul>
<h2>Figures per setting</h2>{_table(rows, summary['best_on_validation'])}
<p>Highlighted: best on validation data. "Train acc (dropout on)" is measured during training; "train acc
(eval)" on 10,000 training examples with every unit, like the test figure; the gap is eval train minus test.
Peak RSS is each run's own process.</p>
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
