"""One question, several answers: the same model, data and seed trained under several settings.

``dropkit compare --p 0 0.2 0.5`` varies the dropout rate; ``--reg none l2 maxnorm dropout
dropout+maxnorm batchnorm`` puts regularisers side by side (Srivastava et al. 2014, Table 9, did
this for MNIST). Each setting is one :func:`dropkit.lab.train.train` run with everything else equal,
in a fresh worker process so that its peak memory is its own. :func:`summarise` turns the runs
into the figures and plain statements that :mod:`dropkit.lab.report` renders.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropkit.lab import distributed
from dropkit.lab.models import MODELS
from dropkit.lab.train import TrainConfig, train

#: the regularisers ``--reg`` knows, and what each changes in the base config
REGULARISERS = ("none", "l2", "maxnorm", "dropout", "dropout+maxnorm", "batchnorm", "dropout+batchnorm")


@dataclass(frozen=True)
class Setting:
    """A labelled change to the base config: field overrides and extra model keyword arguments."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def apply(self, base: TrainConfig) -> TrainConfig:
        return dataclasses.replace(base, **self.overrides, model_kwargs={**base.model_kwargs, **self.model_kwargs})


def _other_rates(model: str) -> list[str]:
    """The model's dropout-rate arguments other than its main rate (e.g. ``p_input``)."""
    builder, main = MODELS[model]
    return [name for name in inspect.signature(builder).parameters if name.startswith("p") and name != main]


def p_settings(ps: list[float]) -> list[Setting]:
    """One setting per main dropout rate (the model's other rates keep their defaults)."""
    return [Setting(f"p={p:g}", {"p": p}) for p in ps]


def reg_settings(model: str, regs: list[str], *, p: float, l2: float, max_norm: float) -> list[Setting]:
    """One setting per regulariser. Settings without dropout set every dropout rate of the model
    to 0; ``dropout`` settings use ``p`` for the main rate and the model's defaults for the rest."""
    no_dropout = {"p": 0.0}, {name: 0.0 for name in _other_rates(model)}
    settings = []
    for reg in regs:
        if reg not in REGULARISERS:
            raise ValueError(f"--reg must be among {', '.join(REGULARISERS)}, got {reg!r}")
        parts = set(reg.split("+"))
        overrides, kwargs = ({"p": p}, {}) if "dropout" in parts else (dict(no_dropout[0]), dict(no_dropout[1]))
        if "l2" in parts:
            overrides["weight_decay"] = l2
        if "maxnorm" in parts:
            overrides["max_norm"] = max_norm
        if "batchnorm" in parts:
            kwargs["batchnorm"] = True
        settings.append(Setting(reg, overrides, kwargs))
    return settings


def _run_one(config: TrainConfig, out_dir: str, resume: bool) -> dict[str, Any]:
    result = train(config, out_dir, resume=resume, quiet=True)
    return {"history": result.history, "summary": result.summary()}


def run_settings(
    base: TrainConfig, settings: list[Setting], out_dir: str | Path, *, resume: bool = False, isolate: bool = True,
    nproc: int = 1,
) -> list[dict[str, Any]]:
    """Train every setting (one after another, so timings are not shared) under ``out_dir/<label>``.

    With ``isolate`` each run gets a fresh process, so its ``peak_rss_mib`` is its own; with
    ``nproc`` > 1 each run is a data-parallel job of that many processes (rank 0's figures); with
    ``resume`` finished runs are read back and a killed one continues from its checkpoint.
    """
    if not settings:
        raise ValueError("compare needs at least one setting (--p or --reg)")
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise ValueError(f"settings must differ, got {labels}")
    out = Path(out_dir)
    runs = []
    for setting in settings:
        config = setting.apply(base)
        config.validate()
        run_dir = str(out / setting.label)
        if nproc > 1:
            outcome = distributed.launch(nproc, _run_one, config, run_dir, resume)
        elif isolate:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                outcome = pool.submit(_run_one, config, run_dir, resume).result()
        else:
            outcome = _run_one(config, run_dir, resume)
        runs.append({"label": setting.label, "config": config.to_dict(), **outcome})
    return runs


def _final(run: dict[str, Any]) -> dict[str, Any]:
    return run["history"][-1]


def _mean(run: dict[str, Any], key: str) -> float:
    return sum(row[key] for row in run["history"]) / len(run["history"])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-setting figures and the statements a reader wants, from this comparison's own numbers.

    The baseline is the first setting without any dropout (``p`` 0 and every other rate 0), or
    else the first setting. Overfitting is read from the final epoch's gap between training and
    test accuracy, both in eval mode (every unit), so dropout's own noise does not enter it.
    """
    rows = []
    for run in runs:
        final = _final(run)
        rows.append({
            "label": run["label"],
            "p": final["p"],
            "train_acc": final["train_acc"],
            "train_eval_acc": final["train_eval_acc"],
            "val_acc": final["val_acc"],
            "test_acc": final["test_acc"],
            "gap": final["gap"],
            "epochs": final["epoch"],
            "seconds_per_epoch": _mean(run, "seconds"),
            "peak_rss_mib": max(row["peak_rss_mib"] for row in run["history"]),
            "saved_mib": final["saved_mib"],
        })
    baseline = next((r for r, run in zip(rows, runs) if _no_dropout(run["config"])), rows[0])
    with_val = [r for r in rows if r["val_acc"] is not None]
    best = max(with_val, key=lambda r: r["val_acc"]) if with_val else None
    for row in rows:
        row["gap_vs_baseline"] = row["gap"] - baseline["gap"]
        row["time_ratio"] = row["seconds_per_epoch"] / baseline["seconds_per_epoch"]
        row["saved_ratio"] = row["saved_mib"] / baseline["saved_mib"] if baseline["saved_mib"] else None
    return {
        "baseline": baseline["label"],
        "best_on_validation": best["label"] if best else None,
        "settings": rows,
        "statements": _statements(rows, baseline, best),
    }


def _no_dropout(config: dict[str, Any]) -> bool:
    rates = [config["p"]] + [v for k, v in config["model_kwargs"].items() if k.startswith("p")]
    return config["p"] is not None and all(rate == 0 for rate in rates)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _statements(rows: list[dict[str, Any]], baseline: dict[str, Any], best: dict[str, Any] | None) -> list[str]:
    """Plain sentences that answer: did it reduce overfitting, what did it cost, which was best."""
    said = []
    for row in rows:
        if row is baseline:
            continue
        shrank = row["gap"] < baseline["gap"]
        said.append(
            f"{row['label']}: the train-test gap was {_pct(row['gap'])} against {_pct(baseline['gap'])} for "
            f"{baseline['label']}, so it {'reduced' if shrank else 'did not reduce'} overfitting; "
            f"test accuracy {_pct(row['test_acc'])} ({100 * (row['test_acc'] - baseline['test_acc']):+.2f} points); "
            f"accuracy on training data {_pct(row['train_eval_acc'])} against {_pct(baseline['train_eval_acc'])}; "
            f"time per epoch x{row['time_ratio']:.2f}"
            + (f", memory kept for backward x{row['saved_ratio']:.2f}" if row["saved_ratio"] is not None else "")
            + "."
        )
        if row["train_eval_acc"] < baseline["train_eval_acc"] and row["test_acc"] < baseline["test_acc"]:
            said.append(
                f"{row['label']} fits the training data less well ({_pct(row['train_eval_acc'])} against "
                f"{_pct(baseline['train_eval_acc'])}, every unit on) and scores lower on the test set: at this rate the "
                f"network underfits in {row['epochs']} epochs, rather than merely overfitting less."
            )
    if best is not None:
        said.append(
            f"Best on validation data: {best['label']} (validation accuracy {_pct(best['val_acc'])}, "
            f"test accuracy {_pct(best['test_acc'])})."
        )
    return said


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2) + "\n")
