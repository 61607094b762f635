"""Is a trained run's uncertainty any good? Monte Carlo dropout against the deterministic network.

:func:`evaluate_uncertainty` loads a run folder written by ``dropkit train`` (``config.json`` and
``checkpoint.pt``, read with ``weights_only=True``), scores its test set once in eval mode (every
unit on) and with Monte Carlo dropout (:func:`dropkit.mc.mc_samples`), and reports accuracy, NLL,
Brier score and ECE for both, the MC figures after T = 1, 10, 30, 100 passes (up to the T asked
for) to show where averaging levels off and, given an out-of-distribution test set, how well each
uncertainty score tells it from the run's own test set (AUROC and AUPR, out-of-distribution inputs
as positives). :func:`write_uncertainty` writes ``uncertainty.json`` and ``uncertainty.html``
(reliability diagrams, score histograms). The out-of-distribution images are scaled with the
run's own training statistics, as the model saw its inputs.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dropkit import mc_metrics, rng  # noqa: E402
from dropkit.concrete import regularizer_weights, to_concrete  # noqa: E402
from dropkit.convert import fuse_relu_dropout  # noqa: E402
from dropkit.lab.atomic_files import atomic_write_text  # noqa: E402
from dropkit.lab.data import load_dataset, normalise, split_validation  # noqa: E402
from dropkit.lab.models import build_model  # noqa: E402
from dropkit.lab.report import _png  # noqa: E402
from dropkit.lab.train import CHECKPOINT, TrainConfig, model_p  # noqa: E402
from dropkit.lab.train.loop import VAL_SPLIT_SEED  # noqa: E402
from dropkit.lab.train.metrics import EVAL_BATCH  # noqa: E402
from dropkit.mc import DEFAULT_MEMORY_BUDGET, mc_samples  # noqa: E402

__all__ = ["LEVELS", "evaluate_uncertainty", "load_run", "write_uncertainty"]

#: the pass counts reported on the way to T, to show where the MC figures level off
LEVELS = (1, 10, 30, 100)
#: the metrics computed for each way of predicting
METRICS = ("accuracy", "nll", "brier", "ece")
#: inputs per call of mc_samples (its memory budget then decides the passes per forward)
MC_CHUNK = 1000
#: stream of derive_seed for the per-chunk MC seeds
_CHUNK_STREAM = 4


def load_run(folder: str | Path) -> tuple[TrainConfig, nn.Module]:
    """The run's config and its model with the checkpoint's weights, in eval mode.

    Raises ``FileNotFoundError`` for a folder without ``config.json`` or ``checkpoint.pt`` and
    ``ValueError`` naming the file for one that cannot be read.
    """
    folder = Path(folder)
    config_path, checkpoint = folder / "config.json", folder / CHECKPOINT
    for path in (config_path, checkpoint):
        if not path.is_file():
            runs = sorted(p.parent.name for p in folder.glob(f"*/{CHECKPOINT}")) if folder.is_dir() else []
            hint = f"; runs inside it: {', '.join(runs)}" if runs else ""
            raise FileNotFoundError(f"{path} not found: RUN_DIR must be a folder written by dropkit train{hint}")
    try:
        config = TrainConfig(**json.loads(config_path.read_text()))
        config.validate()
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: not a dropkit run config ({err})") from err
    model = build_model(config.model, model_p(config), **config.model_kwargs)
    if config.rate == "concrete":
        # the regulariser weights only shape training; the rates come from the checkpoint
        to_concrete(model, **dict(zip(("weight_regularizer", "dropout_regularizer"), regularizer_weights(1))))
    else:
        fuse_relu_dropout(model)  # as training did; the state dict keys are the same
    try:
        state = torch.load(checkpoint, weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
    except Exception as err:  # a truncated file, a foreign pickle, other weights: name the file
        raise ValueError(f"{checkpoint}: cannot load the run's weights ({err})") from err
    return config, model.eval()


def _test_sets(config: TrainConfig, ood: str | None, ood_dir: str | None, limit: int | None) -> tuple[Any, Any | None]:
    """The run's test split and the out-of-distribution test split (the first ``limit`` inputs of
    each, if given), both scaled as the run's inputs."""
    data = load_dataset(config.dataset, config.data_dir)
    train_part, _ = split_validation(data.train, config.val_size, seed=VAL_SPLIT_SEED)
    test = data.test.head(config.limit_test)
    splits = [test.head(limit)]
    if ood is not None or ood_dir is not None:
        splits.append(load_dataset(ood or "ood", ood_dir).test.head(limit))
    scaled = normalise(train_part.head(config.limit_train), *splits, standardise=config.inputs == "standard")[1:]
    return scaled[0], (scaled[1] if len(scaled) > 1 else None)


def _deterministic_probs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(images[i:i + EVAL_BATCH]).float().softmax(-1)
                          for i in range(0, len(images), EVAL_BATCH)])


def _mc_probs(model: nn.Module, images: torch.Tensor, samples: int, seed: int, memory_budget: int,
              shared_masks: bool) -> torch.Tensor:
    """Per-pass probabilities (samples, N, classes); chunk ``i`` of the inputs is sampled with
    ``derive_seed(seed, i)``, so the figures do not depend on anything but the seed."""
    parts = [mc_samples(model, images[i:i + MC_CHUNK], samples, seed=rng.derive_seed(seed, _CHUNK_STREAM, i // MC_CHUNK),
                        memory_budget=memory_budget, shared_masks=shared_masks).float().softmax(-1)
             for i in range(0, len(images), MC_CHUNK)]
    return torch.cat(parts, 1)


def _scores(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> dict[str, float]:
    return {
        "accuracy": mc_metrics.accuracy(probs, labels),
        "nll": mc_metrics.nll(probs, labels),
        "brier": mc_metrics.brier_score(probs, labels),
        "ece": mc_metrics.expected_calibration_error(probs, labels, bins),
    }


def _ood(inside: dict[str, torch.Tensor], outside: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    return {
        "auroc": {name: mc_metrics.auroc(inside[name], outside[name]) for name in inside},
        "aupr": {name: mc_metrics.average_precision(inside[name], outside[name]) for name in inside},
    }


def evaluate_uncertainty(run_dir: str | Path, samples: int = 100, *, ood: str | None = None,
                         ood_dir: str | None = None, seed: int = 0, bins: int = mc_metrics.DEFAULT_BINS,
                         memory_budget: int = DEFAULT_MEMORY_BUDGET, limit: int | None = None,
                         shared_masks: bool = False) -> dict[str, Any]:
    """Deterministic and Monte Carlo dropout figures of a trained run, as ``uncertainty.json`` holds them.

    Args:
        run_dir: a run folder of ``dropkit train`` (``config.json``, ``checkpoint.pt``).
        samples: T, the Monte Carlo passes per input.
        ood: name of an out-of-distribution dataset (``mnist``, ``fashion-mnist``), or None.
        ood_dir: a folder of the four IDX files to use as out-of-distribution data instead.
        seed: seed of the passes.
        bins: ECE and reliability bins.
        memory_budget: bytes of module outputs per batched forward (see :func:`dropkit.mc.mc_samples`).
        limit: score only the first ``limit`` inputs of the test and out-of-distribution sets.
        shared_masks: sample thinned networks, one per pass for a chunk of inputs, skipping the
            dropped units' work (MLP runs only; see :func:`dropkit.mc.mc_samples`).

    Returns a dict with ``deterministic`` and ``mc`` (each ``accuracy``, ``nll``, ``brier``,
    ``ece`` and, with out-of-distribution data, ``auroc``/``aupr`` per score), ``levels`` (the MC
    figures after each of :data:`LEVELS` up to T), ``reliability`` (the bins of both) and
    ``histograms`` data for the report.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
    start = time.perf_counter()
    config, model = load_run(run_dir)
    test, ood_test = _test_sets(config, ood, ood_dir, limit)
    labels = test.labels
    det = _deterministic_probs(model, test.images)
    passes = _mc_probs(model, test.images, samples, seed, memory_budget, shared_masks)
    mean = passes.mean(0)
    result: dict[str, Any] = {
        "run": str(run_dir), "model": config.model, "dataset": config.dataset, "test_size": len(labels),
        "samples": samples, "seed": seed, "bins": bins, "shared_masks": shared_masks,
        "deterministic": _scores(det, labels, bins),
        "mc": _scores(mean, labels, bins),
        "levels": {str(t): _scores(passes[:t].mean(0), labels, bins)
                   for t in sorted({t for t in LEVELS if t <= samples} | {samples})},
        "reliability": {"deterministic": mc_metrics.reliability_diagram(det, labels, bins).to_dict(),
                        "mc": mc_metrics.reliability_diagram(mean, labels, bins).to_dict()},
    }
    if ood_test is not None:
        det_in, mc_in = mc_metrics.uncertainty_scores(det), mc_metrics.uncertainty_scores(passes)
        ood_passes = _mc_probs(model, ood_test.images, samples, rng.derive_seed(seed, 1), memory_budget, shared_masks)
        det_out = mc_metrics.uncertainty_scores(_deterministic_probs(model, ood_test.images))
        mc_out = mc_metrics.uncertainty_scores(ood_passes)
        result["ood"] = {"dataset": ood or str(ood_dir), "size": len(ood_test.labels)}
        result["deterministic"].update(_ood(det_in, det_out))
        result["mc"].update(_ood(mc_in, mc_out))
        result["histograms"] = {name: {"inside": mc_in[name].tolist(), "outside": mc_out[name].tolist()}
                                for name in mc_in}
    result["seconds"] = time.perf_counter() - start
    return result


def _reliability_figure(reliability: dict[str, dict[str, list]], figures: dict[str, dict[str, float]]) -> str:
    """Accuracy per confidence bin (bars) against the bin's mean confidence (dots), both ways."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, (name, bins) in zip(axes, reliability.items()):
        edges = bins["edges"]
        width = edges[1] - edges[0]
        filled = [i for i, n in enumerate(bins["counts"]) if n]
        ax.bar([edges[i] for i in filled], [bins["accuracy"][i] for i in filled], width=width, align="edge",
               edgecolor="black", label="accuracy")
        ax.plot([edges[i] + width / 2 for i in filled], [bins["confidence"][i] for i in filled], "o", color="C3",
                markersize=4, label="mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set(xlabel="confidence", title=f"{name}: ECE {figures[name]['ece']:.4f}", xlim=(0, 1), ylim=(0, 1))
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    return _png(fig)


def _histogram_figure(histograms: dict[str, dict[str, list[float]]], auroc: dict[str, float]) -> str:
    """Each MC score's distribution on the test set and on the out-of-distribution set."""
    fig, axes = plt.subplots(1, len(histograms), figsize=(4 * len(histograms), 3.4))
    for ax, (name, data) in zip(axes, histograms.items()):
        ax.hist(data["inside"], bins=40, alpha=0.6, density=True, label="test set")
        ax.hist(data["outside"], bins=40, alpha=0.6, density=True, label="out of distribution")
        label = "1 - max probability" if name == "max_probability" else name.replace("_", " ")
        ax.set(xlabel=label, title=f"AUROC {auroc[name]:.4f}")
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8)
    return _png(fig)


def _table(result: dict[str, Any]) -> str:
    rows = [("deterministic", result["deterministic"])] + [(f"MC, T = {t}", v) for t, v in result["levels"].items()]
    head = "".join(f"<th>{m}</th>" for m in METRICS)
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{v[m]:.4f}</td>" for m in METRICS) + "</tr>"
                   for name, v in rows)
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _ood_table(result: dict[str, Any]) -> str:
    names = list(result["mc"]["auroc"])
    head = "".join(f"<th>{html.escape(n.replace('_', ' '))}</th>" for n in names)
    rows = ""
    for way in ("deterministic", "mc"):
        for metric in ("auroc", "aupr"):
            cells = "".join(f"<td>{result[way][metric][n]:.4f}</td>" if n in result[way][metric] else "<td>-</td>"
                            for n in names)
            rows += f"<tr><td>{way} {metric.upper()}</td>{cells}</tr>"
    return f"<table><tr><th></th>{head}</tr>{rows}</table>"


def render_html(result: dict[str, Any]) -> str:
    """The report page: the figures by T, the reliability diagrams and, with OOD data, the score histograms."""
    title = f"Uncertainty of {result['model']} on {result['dataset']}"
    sections = [f"<h2>Accuracy, NLL, Brier score, ECE ({result['bins']} bins)</h2>{_table(result)}",
                "<h2>Reliability diagrams</h2>"
                f"<img alt='reliability' src='data:image/png;base64,"
                f"{_reliability_figure(result['reliability'], result)}'>"]
    if "ood" in result:
        sections.append(f"<h2>Out-of-distribution detection: {html.escape(result['ood']['dataset'])}</h2>"
                        f"{_ood_table(result)}<p>Monte Carlo scores, T = {result['samples']}:</p>"
                        f"<img alt='scores' src='data:image/png;base64,"
                        f"{_histogram_figure(result['histograms'], result['mc']['auroc'])}'>")
    setup = html.escape(f"run {result['run']}, {result['test_size']} test inputs, T = {result['samples']}, "
                        f"seed {result['seed']}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}
img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{setup}</p>{''.join(sections)}</body></html>
"""


def write_uncertainty(out_dir: str | Path, result: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``uncertainty.json`` (without the per-input histogram data) and ``uncertainty.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "uncertainty.json", out / "uncertainty.html"
    saved = {k: v for k, v in result.items() if k != "histograms"}
    atomic_write_text(json_path, json.dumps(saved, indent=2) + "\n")
    atomic_write_text(html_path, render_html(result))
    return json_path, html_path
