"""One question, several answers: the same model, data and seed trained under several settings.

``dropkit compare --p 0 0.2 0.5`` varies the dropout rate; ``--reg none l2 maxnorm dropout
dropout+maxnorm batchnorm`` puts regularisers side by side (Srivastava et al. 2014, Table 9, did
this for MNIST). Each setting is trained with ``seeds`` seeds (``base.seed``, ``base.seed + 1``,
...), each seed one :func:`dropkit.lab.train.train` run with everything else equal, in a fresh
worker process so that its peak memory is its own. :func:`summarise` turns the runs into each
setting's mean and spread over its seeds (:mod:`dropkit.lab.stats`) and plain statements, each
made only when the difference it states is larger than the noise between seeds; otherwise the
statement says the difference is within noise. :mod:`dropkit.lab.report` renders them.

Time per epoch is the median of the epochs after each run's first (:func:`dropkit.lab.stats.
steady_epoch_seconds`); the first epochs, which also pay one-off costs, are reported apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dropkit.lab import distributed
from dropkit.lab.models import MODELS
from dropkit.lab.stats import Estimate, differs, estimate, steady_epoch_seconds
from dropkit.lab.train import TrainConfig, train
from dropkit.lab.train.hooks import EpochLines

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
            raise ValueError(f"argument --reg: must be among {', '.join(REGULARISERS)}, got {reg!r}")
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


def _run_one(config: TrainConfig, out_dir: str, resume: bool, name: str | None = None) -> dict[str, Any]:
    """Train one run; with ``name``, one line per epoch goes to stdout."""
    callbacks = [EpochLines(name, config.epochs)] if name is not None else []
    result = train(config, out_dir, resume=resume, quiet=True, callbacks=callbacks)
    return {"history": result.history, "summary": result.summary()}


def run_settings(
    base: TrainConfig, settings: list[Setting], out_dir: str | Path, *, seeds: int = 1, resume: bool = False,
    isolate: bool = True, nproc: int = 1, progress: bool = False,
) -> list[dict[str, Any]]:
    """Train every setting with ``seeds`` seeds (one run after another, so timings are not shared)
    under ``out_dir/<label>/seed=<seed>``; returns one dict per run (label, seed, config, history).

    With ``isolate`` each run gets a fresh process, so its ``peak_rss_mib`` is its own; with
    ``nproc`` > 1 each run is a data-parallel job of that many processes (rank 0's figures); with
    ``resume`` finished runs are read back and a killed one continues from its checkpoint.
    With ``progress`` each run prints one line per epoch (see
    :class:`~dropkit.lab.train.hooks.EpochLines`).
    """
    if not settings:
        raise ValueError("compare needs at least one setting (--p or --reg)")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise ValueError(f"settings must differ, got {labels}")
    out = Path(out_dir)
    runs = []
    for setting in settings:
        for seed in range(base.seed, base.seed + seeds):
            config = dataclasses.replace(setting.apply(base), seed=seed)
            config.validate()
            run_dir = str(out / setting.label / f"seed={seed}")
            args = (config, run_dir, resume, f"{setting.label} seed {seed}" if progress else None)
            if nproc > 1:
                outcome = distributed.launch(nproc, _run_one, *args)
            elif isolate:
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    outcome = pool.submit(_run_one, *args).result()
            else:
                outcome = _run_one(*args)
            runs.append({"label": setting.label, "seed": seed, "config": config.to_dict(), **outcome})
    return runs


#: the figures summarised per setting: mean and spread over its seeds
FIGURES = ("train_acc", "train_eval_acc", "val_acc", "test_acc", "gap", "saved_mib")


def by_label(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    return groups


def _estimates(group: list[dict[str, Any]]) -> dict[str, Estimate | None]:
    """A setting's figures over its seeds: final-epoch figures, and time per epoch from every
    epoch after each run's first (pooled: the epochs are the samples of the epoch time)."""
    finals = [run["history"][-1] for run in group]
    found: dict[str, Estimate | None] = {
        key: estimate(row[key] for row in finals) if all(row[key] is not None for row in finals) else None
        for key in FIGURES}
    steady = [s for run in group for s in steady_epoch_seconds(run["history"])]
    found["seconds_per_epoch"] = estimate(steady)
    found["first_epoch_seconds"] = estimate(run["history"][0]["seconds"] for run in group)
    return found


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-setting figures (mean and spread over seeds) and the statements a reader wants.

    The baseline is the first setting without any dropout (``p`` 0 and every other rate 0), or
    else the first setting. Overfitting is read from the final epoch's gap between training and
    test accuracy, both in eval mode (every unit), so dropout's own noise does not enter it.
    ``seconds_per_epoch`` is the median of the steady epochs (every epoch after a run's first)
    of all seeds, ``seconds_per_epoch_spread`` their standard deviation.
    """
    groups = by_label(runs)
    estimates = {label: _estimates(group) for label, group in groups.items()}
    rows = []
    for label, group in groups.items():
        est = estimates[label]
        steady = [s for run in group for s in steady_epoch_seconds(run["history"])]
        row: dict[str, Any] = {"label": label, "p": group[0]["history"][-1]["p"], "seeds": [r["seed"] for r in group],
                               "epochs": group[0]["history"][-1]["epoch"]}
        for key in FIGURES:
            row[key] = est[key].mean if est[key] is not None else None
            row[f"{key}_spread"] = est[key].spread if est[key] is not None else None
        row["seconds_per_epoch"] = statistics.median(steady)
        row["seconds_per_epoch_spread"] = est["seconds_per_epoch"].spread
        row["first_epoch_seconds"] = est["first_epoch_seconds"].mean
        row["peak_rss_mib"] = max(r["peak_rss_mib"] for run in group for r in run["history"])
        rows.append(row)
    baseline = next((row for row in rows if _no_dropout(groups[row["label"]][0]["config"])), rows[0])
    with_val = [r for r in rows if r["val_acc"] is not None]
    best = max(with_val, key=lambda r: r["val_acc"]) if with_val else None
    for row in rows:
        row["gap_vs_baseline"] = row["gap"] - baseline["gap"]
        row["time_ratio"] = row["seconds_per_epoch"] / baseline["seconds_per_epoch"]
        row["saved_ratio"] = row["saved_mib"] / baseline["saved_mib"] if baseline["saved_mib"] else None
        base_est, est = estimates[baseline["label"]], estimates[row["label"]]
        row["beyond_noise"] = {key: differs(est[key], base_est[key]) if est[key] and base_est[key] else None
                               for key in ("test_acc", "train_eval_acc", "gap", "seconds_per_epoch", "saved_mib")}
    return {
        "baseline": baseline["label"],
        "best_on_validation": best["label"] if best else None,
        "seeds": len(baseline["seeds"]),
        "settings": rows,
        "statements": _statements(rows, baseline, best, estimates),
    }


def _no_dropout(config: dict[str, Any]) -> bool:
    rates = [config["p"]] + [v for k, v in config["model_kwargs"].items() if k.startswith("p")]
    return config["p"] is not None and all(rate == 0 for rate in rates)


def _pct(x: float, spread: float | None = None) -> str:
    return f"{100 * x:.2f}%" + (f" ± {100 * spread:.2f}" if spread is not None else "")


def _noise_clause(verdict: bool | None) -> str:
    return "one seed per setting, so this cannot be told from noise" if verdict is None else "within noise"


def _statements(rows: list[dict[str, Any]], baseline: dict[str, Any], best: dict[str, Any] | None,
                estimates: dict[str, dict[str, Estimate | None]]) -> list[str]:
    """Plain sentences that answer: did it reduce overfitting, what did it cost, which was best;
    each claim only where the difference exceeds the noise between seeds (± is one spread)."""
    said = []
    base = baseline["label"]
    for row in rows:
        if row is baseline:
            continue
        real = row["beyond_noise"]
        gap = (f"the train-test gap was {_pct(row['gap'], row['gap_spread'])} against "
               f"{_pct(baseline['gap'], baseline['gap_spread'])} for {base}")
        if real["gap"]:
            gap += f", so it {'reduced' if row['gap'] < baseline['gap'] else 'increased'} overfitting"
        else:
            gap += f": the difference is {_noise_clause(real['gap'])}"
        test = f"test accuracy {_pct(row['test_acc'], row['test_acc_spread'])} " \
               f"({100 * (row['test_acc'] - baseline['test_acc']):+.2f} points" \
               + ("" if real["test_acc"] else f", {_noise_clause(real['test_acc'])}") + ")"
        if real["seconds_per_epoch"]:
            time = f"costs x{row['time_ratio']:.2f} per epoch"
        else:
            time = f"time per epoch x{row['time_ratio']:.2f}, {_noise_clause(real['seconds_per_epoch'])}"
        memory = (f", memory kept for backward x{row['saved_ratio']:.2f}"
                  if row["saved_ratio"] is not None and real["saved_mib"] is not False else "")
        said.append(f"{row['label']}: {gap}; {test}; {time}{memory}.")
        if real["train_eval_acc"] and real["test_acc"] and row["train_eval_acc"] < baseline["train_eval_acc"] \
                and row["test_acc"] < baseline["test_acc"]:
            said.append(
                f"{row['label']} fits the training data less well ({_pct(row['train_eval_acc'])} against "
                f"{_pct(baseline['train_eval_acc'])}, every unit on) and scores lower on the test set, both beyond "
                f"noise: at this rate the network underfits in {row['epochs']} epochs, rather than merely "
                f"overfitting less."
            )
    if best is not None:
        verdicts = {r["label"]: differs(estimates[best["label"]]["val_acc"], estimates[r["label"]]["val_acc"])
                    for r in rows if r is not best and r["val_acc"] is not None}
        line = (f"Best on validation data: {best['label']} (validation accuracy {_pct(best['val_acc'])}, "
                f"test accuracy {_pct(best['test_acc'])})")
        ties = [label for label, verdict in verdicts.items() if verdict is False]
        if any(verdict is None for verdict in verdicts.values()):
            line += "; with one seed per setting the ranking cannot be told from noise"
        elif ties:
            line += f"; {', '.join(ties)} {'is' if len(ties) == 1 else 'are'} within noise of it"
        said.append(line + ".")
    return said


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2) + "\n")
