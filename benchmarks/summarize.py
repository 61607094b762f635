"""Write the tables of BENCHMARKS.md from the JSON in benchmarks/results/.

Every table of BENCHMARKS.md sits between two markers::

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

and is rebuilt here from the result files it names (see :data:`TABLES`), with a line saying which
file, machine and date the figures come from. Text outside the markers is left alone, so the
document's explanations are written by hand and its figures cannot drift from the data.

    python benchmarks/summarize.py            # rewrite the tables of BENCHMARKS.md in place
    python benchmarks/summarize.py --check    # exit 1, naming the tables, if any is out of date

A result file of a newer or older ``dropkit bench`` is read as far as its fields go: baselines a
run did not have leave their columns out, fields a table does not know are ignored.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENT = ROOT / "BENCHMARKS.md"

_BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)

#: the extra copy baselines older ``bench kernels`` runs timed, with what they measured
_COPY_BASELINES = {
    "copy_cached": "a copy into a reused block",
    "copy_huge": "a copy into a huge-page block",
}
_IMPLS = ("dropkit_seed", "dropkit_bits")


def load(name: str) -> dict:
    """The JSON of ``benchmarks/results/<name>``; a file that does not parse raises naming it."""
    path = RESULTS / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read benchmark result ({error})") from error


def provenance(names: list[str], datas: list[dict]) -> str:
    """One line: the files, then each distinct machine, thread count, torch, load and date they record."""
    described = []
    for data in datas:
        recorded = data.get("recorded", {})
        env = data.get("environment", {})
        parts = [recorded.get("machine") or f"{env.get('processor', '?')} ({env.get('llvm_cpu', '?')})"]
        if env.get("threads"):
            parts.append(f"{env['threads']} threads")
        if env.get("torch"):
            parts.append(f"torch {env['torch']}")
        if env.get("load_average_1min") is not None:
            parts.append(f"load {env['load_average_1min']}")
        parts.append(recorded.get("date") or env.get("date") or "date not recorded")
        if ", ".join(parts) not in described:
            described.append(", ".join(parts))
    return "Source: " + ", ".join(f"`benchmarks/results/{n}`" for n in names) + "; " + "; ".join(described) + "."


def _size(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def _pair(values: dict, keys: tuple[str, ...] = _IMPLS, fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(values[k]) for k in keys)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def kernels_table(result: dict) -> str:
    """One row per (dtype, size, p): times in ms, ratios to a copy (seed / bits), speed-up over torch
    and the bytes kept for backward. Extra copy baselines get columns only if every case has them."""
    cases = result["cases"]
    extra = [b for b in _COPY_BASELINES if all(f"fwd_over_{b}" in c for c in cases)]
    header = ["dtype", "elements", "p", "copy ms", "forward ms: torch / seed / bits",
              "forward / copy: seed / bits", "fwd+bwd / copy: seed / bits"]
    header += [f"fwd, fwd+bwd over {_COPY_BASELINES[b]}: seed / bits" for b in extra]
    header += ["forward speed-up over torch: seed / bits", "bytes kept per element: torch / seed / bits"]
    rows = []
    for case in cases:
        ms = case["ms"]
        row = [case["dtype"], _size(case["numel"]), f"{case['p']:g}", f"{ms['copy']:.3g}",
               " / ".join(f"{ms[f'{i}_fwd']:.3g}" for i in ("torch", *_IMPLS)),
               _pair(case["fwd_over_copy"]), _pair(case["fwd_bwd_over_copy"])]
        row += [f"{_pair(case[f'fwd_over_{b}'])}, {_pair(case[f'fwd_bwd_over_{b}'])}" for b in extra]
        row += [_pair(case["speedup_vs_torch"]["fwd"], fmt="{:.1f}x"),
                _pair(case["saved_bytes_per_element"], ("torch", *_IMPLS), "{:.3g}")]
        rows.append(row)
    return _table(header, rows)


def step_table(result: dict) -> str:
    """Step time of each variant and its ratio to the step without dropout."""
    names = {"none": "no dropout", "torch": "torch.nn.Dropout", "dropkit_seed": "dropkit Dropout",
             "dropkit_bits": "dropkit Dropout, 1-bit mask kept", "dropkit_fused": "dropkit ReLUDropout (fused)"}
    rows = [[names.get(name, name), f"{ms:.2f}", f"{result['over_no_dropout'].get(name, 1.0):.3f}"]
            for name, ms in result["ms"].items()]
    return _table(["dropout", "step ms", "over no dropout"], rows)


def compiled_step_table(groups_of_files: list[list[dict]]) -> str:
    """One row per ``bench step`` run: compiled or eager, threads, load, the step without dropout and
    each dropout's ratio to it."""
    names = ["torch", "dropkit_seed", "dropkit_fused"]
    rows = []
    for (data,) in groups_of_files:
        env = data["environment"]
        rows.append(["compiled" if data.get("compiled") else "eager", str(env["threads"]),
                     str(env["load_average_1min"]), f"{data['ms']['none']:.1f}",
                     *(f"{data['over_no_dropout'][n]:.3f}" for n in names)])
    return _table(["run", "threads", "load", "no dropout ms", "torch.nn.Dropout", "dropkit Dropout",
                   "dropkit ReLUDropout (fused)"], rows)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def rate_bits_table(result: dict) -> str:
    """Median (range) over the runs of each resolution, per dtype and figure."""
    runs = result["runs"]
    baseline = next(b for b in ("copy_huge", "copy_cached", "copy") if f"fwd_over_{b}" in runs[0]["cases"][0])
    figures = [("forward", f"fwd_over_{baseline}", "dropkit_seed"), ("forward, 1-bit mask kept", f"fwd_over_{baseline}",
               "dropkit_bits"), ("fwd+bwd, 1-bit mask kept", f"fwd_bwd_over_{baseline}", "dropkit_bits")]
    rows = []
    for dtype in dict.fromkeys(c["dtype"] for r in runs for c in r["cases"]):
        for label, key, impl in figures:
            row = [dtype, label]
            for bits in (16, 8):
                values = [c[key][impl] for r in runs if r["environment"]["rate_bits"] == bits
                          for c in r["cases"] if c["dtype"] == dtype]
                row.append(_spread(values))
            rows.append(row)
    n = sum(r["environment"]["rate_bits"] == 16 for r in runs)
    return _table(["dtype", f"p = 0.1, 2^24, over {_COPY_BASELINES.get(baseline, 'a copy')}",
                   f"16-bit rates: median (range) of {n} runs", f"8-bit rates: median (range) of {n} runs"], rows)


def structured_step_table(result: dict) -> str:
    """Step time over the no-dropout step per (width, batch, p); bold where a cell meets its bound."""
    groups = sorted({v["groups"] for r in result["results"] for v in r["variants"] if v["kind"] == "structured"})
    rows = []
    for r in sorted(result["results"], key=lambda r: (r["p"], r["width"], r["batch"])):
        by_kind = {v["kind"]: v for v in r["variants"] if v["kind"] != "structured"}
        cells = {v["groups"]: v for v in r["variants"] if v["kind"] == "structured"}
        row = [str(r["width"]), str(r["batch"]), f"{r['p']:g}", f"{r['none_ms']:.1f}",
               f"{by_kind['torch']['vs_none']:.2f}", f"{by_kind['dropkit']['vs_none']:.2f}"]
        for g in groups:
            v = cells.get(g)
            row.append("-" if v is None else (f"**{v['vs_none']:.2f}**" if v["meets_target"] else f"{v['vs_none']:.2f}"))
        rows.append(row)
    bounds = ", ".join(f"{bound} at p = {p}" for p, bound in sorted(result["targets_vs_none"].items()))
    return (_table(["W", "batch", "p", "no dropout ms", "torch dropout", "dropkit dropout", *[f"G = {g}" for g in groups]],
                   rows) + f"\n\nBold: at most the bound ({bounds}).")


def _summaries(data: dict) -> list[dict]:
    """The per-variant summary rows of a structured_accuracy.py result, one file or one per seed."""
    if "per_seed" in data:
        return [row for part in data["per_seed"] for row in part["summary"]]
    return data["summary"]


def _settings(data: dict) -> dict:
    return data["per_seed"][0]["settings"] if "per_seed" in data else data["settings"]


def _merged(files: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(dataset, variant) -> summary rows over all files (each row carries its seeds' figures)."""
    merged: dict[tuple[str, str], list[dict]] = {}
    for data in files:
        for row in _summaries(data):
            merged.setdefault((row["dataset"], row["variant"]), []).append(row)
    return merged


def structured_accuracy_table(groups_of_files: list[list[dict]]) -> str:
    """Mean final test accuracy over the seeds, standard against each group count, at equal epochs."""
    all_groups = sorted({int(v.rsplit("G", 1)[1]) for files in groups_of_files for d in files
                         for row in _summaries(d) for v in [row["variant"]] if v.startswith("structured_G")})
    rows = []
    for files in groups_of_files:
        settings = _settings(files[0])
        merged = _merged(files)
        for dataset in dict.fromkeys(d for d, _ in merged):
            standard = [a for row in merged[(dataset, "standard")] for a in row["final_acc"]]
            base = statistics.fmean(standard)
            row = [dataset, f"{settings['p']:g}", str(settings["epochs"]), str(len(standard)), f"{base:.2f}"]
            for g in all_groups:
                accs = [a for r in merged.get((dataset, f"structured_G{g}"), []) for a in r["final_acc"]]
                if accs:
                    mean = statistics.fmean(accs)
                    row.append(f"{mean:.2f} ({mean - base:+.2f})")
                else:
                    row.append("-")
            rows.append(row)
    return _table(["dataset", "p", "epochs", "seeds", "standard dropout", *[f"G = {g}" for g in all_groups]], rows)


def time_to_accuracy_table(groups_of_files: list[list[dict]]) -> str:
    """Structured runs trained longer than standard: their final accuracy and how much sooner (wall
    clock) they reached standard dropout's final accuracy, per seed."""
    rows = []
    for files in groups_of_files:
        settings = _settings(files[0])
        merged = _merged(files)
        for dataset in dict.fromkeys(d for d, _ in merged):
            standard = [a for row in merged[(dataset, "standard")] for a in row["final_acc"]]
            for variant in (v for d, v in merged if d == dataset and v != "standard"):
                parts = merged[(dataset, variant)]
                accs = [a for row in parts for a in row["final_acc"]]
                speedups = [s for row in parts for s in row["speedup_to_standard_final_acc"]]
                reached = ", ".join("never" if s is None else f"{s:.2f}x" for s in speedups)
                rows.append([dataset, variant.replace("structured_G", "G = "),
                             f"{statistics.fmean(standard):.2f} ({settings['epochs']})",
                             f"{statistics.fmean(accs):.2f} ({settings['structured_epochs']})", reached])
    return _table(["dataset", "groups", "standard: mean final % (epochs)", "structured: mean final % (epochs)",
                   "reached standard's final accuracy sooner, per seed"], rows)


def grad_noise_table(result: dict) -> str:
    rows = [[name, f"{s['vs_standard']:.2f}", f"{s['cosine_of_mean_with_standard']:.3f}"]
            for name, s in result["schemes"].items()]
    rows.append(["standard, over 32 different batches (data + mask noise)",
                 f"{result['standard_over_batches_variance'] / result['schemes']['standard']['mask_noise_variance']:.2f}",
                 "-"])
    return _table(["masks", "gradient variance over mask draws, relative to standard", "cosine of mean gradient with standard's"],
                  rows)


def reference_table(result: dict) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"
    rows = [[f"`{r['name']}`", r["what"], str(r["epochs"]), pct(r["train_eval_acc"]), pct(r["val_acc"]),
             f"**{r['test_acc']:.2f}**", r["target"], "yes" if r["met"] else "no",
             "-" if r["s_per_epoch"] is None else f"{r['s_per_epoch']:g}"] for r in result["runs"]]
    return _table(["run", "what", "epochs", "train (eval mode)", "val", "test", "target", "met", "s/epoch"], rows)


def tutorial_table(result: dict) -> str:
    rows = [[f"{r['p']:g}", f"{r['train_acc']:.2f}", f"{r['train_eval_acc']:.2f}", f"{r['val_acc']:.2f}",
             f"{r['test_acc']:.2f}", f"{r['train_eval_acc'] - r['test_acc']:.2f}"] for r in result["rows"]]
    return _table(["p", "train (dropout on)", "train (eval mode)", "val", "test", "gap (train eval - test)"], rows)


def seeds_table(result: dict) -> str:
    rows = [[str(r["seed"]), str(r["epochs"]), f"{100 * r['final_test_acc']:.2f}",
             f"{100 - 100 * r['final_test_acc']:.2f}", f"{100 * r['best_val_acc']:.2f}"]
            for r in sorted((r for r in result.values() if isinstance(r, dict) and "seed" in r), key=lambda r: r["seed"])]
    return _table(["seed", "epochs", "test %", "test error %", "best val %"], rows)


def weight_averaging_table(result: dict) -> str:
    rows = []
    for name, run in result["runs"].items():
        last = run["epochs"][-1]
        rows.append([f"`{name}`", str(run["config"]["average_from"]), f"{100 * last['test_acc']:.2f}",
                     f"{100 * last['avg_test_acc']:.2f}", f"{last['test_loss']:.4f}", f"{last['avg_test_loss']:.4f}"])
    return _table(["run", "averaged from epoch", "test % (trained)", "test % (averaged)", "test loss (trained)",
                   "test loss (averaged)"], rows)


def mc_table(result: dict) -> str:
    rows = [[f"T = {t}", f"{100 * a:.2f}"] for t, a in result["mc_acc"].items()]
    rows.append(["weight scaling (every unit on, one pass)", f"{100 * result['weight_scaling_acc']:.2f}"])
    return _table(["prediction", "test %"], rows)


def _mc_run_label(run: dict) -> tuple[str, str, str, str]:
    """Model (with its arguments), training data -> OOD data, main dropout rate and MC masks
    (per element, or thinned networks) of an ``uncertainty`` entry."""
    c, u = run["config"], run["uncertainty"]
    ood = u.get("ood", {}).get("dataset", "-")
    # a run at the model's own rate has p None in its config; its folder is still named p=RATE
    p = f"{c['p']:g}" if c["p"] is not None else u["run"].rsplit("p=", 1)[-1].split("/", 1)[0]
    model = " ".join([f"`{c['model']}`", *(f"{k}={v}" for k, v in (c.get("model_kwargs") or {}).items())])
    masks = "thinned" if u.get("shared_masks") else "per element"
    return model, f"{u.get('dataset', c.get('dataset', '?'))} -> {ood}", p, masks


def mc_uncertainty_table(result: dict) -> str:
    """Per run: eval mode against MC dropout (T passes) on the test set, and OOD detection AUROC."""
    rows = []
    for run in result["runs"]:
        c, u = run["config"], run["uncertainty"]
        det, mc = u["deterministic"], u["mc"]
        auroc = mc.get("auroc", {})
        rows.append([*_mc_run_label(run), str(c["seed"]), str(c["epochs"]), str(u["samples"]),
                     f"{100 * det['accuracy']:.2f} / {100 * mc['accuracy']:.2f}",
                     f"{det['nll']:.4f} / {mc['nll']:.4f}", f"{det['ece']:.4f} / {mc['ece']:.4f}",
                     f"{det['brier']:.4f} / {mc['brier']:.4f}",
                     f"{det['auroc']['total_entropy']:.4f}" if "auroc" in det else "-",
                     " / ".join(f"{auroc[k]:.4f}" for k in ("total_entropy", "mutual_information", "max_probability")
                                if k in auroc) or "-"])
    return _table(["model", "data -> OOD", "p", "MC masks", "seed", "epochs", "T", "test % (eval / MC)",
                   "NLL (eval / MC)",
                   "ECE (eval / MC)", "Brier (eval / MC)", "OOD AUROC, eval: entropy",
                   "OOD AUROC, MC: entropy / mutual information / 1 - max p"], rows)


def mc_levels_table(result: dict) -> str:
    """MC figures after T passes, mean over the seeds of each model, data and rate."""
    groups: dict[tuple[str, str, str, str], list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault(_mc_run_label(run), []).append(run["uncertainty"])
    rows = []
    for label, runs in groups.items():
        ways = [("eval mode", [r["deterministic"] for r in runs])]
        ways += [(f"MC, T = {t}", [r["levels"][t] for r in runs]) for t in runs[0]["levels"]]
        for name, figures in ways:
            mean = {k: sum(f[k] for f in figures) / len(figures) for k in ("accuracy", "nll", "ece")}
            rows.append([*label, str(len(runs)), name, f"{100 * mean['accuracy']:.2f}", f"{mean['nll']:.4f}",
                         f"{mean['ece']:.4f}"])
    return _table(["model", "data -> OOD", "p", "MC masks", "seeds", "prediction", "test %", "NLL", "ECE"], rows)


def mc_speed_table(result: dict) -> str:
    """Seconds for T passes per variant and batch size, and the speed-up over sequential passes:
    medians over the processes, with the range of the speed-ups across them."""
    names = [k for k in ("loop", "sequential", "batched", "batched_first_call", "thinned", "baal")
             if k in result["rows"][0]["seconds"]]

    def speedup(row: dict, name: str) -> str:
        low, high = row["speedup_range"][name]
        return f"{row['speedup_vs_sequential'][name]:.2f} ({low:.2f}-{high:.2f})"

    rows = [[str(r["batch"])] + [f"{1000 * r['seconds'][k]:.1f}" for k in names]
            + [speedup(r, k) for k in names if k != "sequential"]
            for r in result["rows"]]
    return _table(["batch"] + [f"{k} (ms)" for k in names] + [f"{k} speed-up" for k in names if k != "sequential"],
                  rows)


def choosing_p_table(result: dict) -> str:
    best = {}
    rows = []
    for g in result["grid"]:
        i = max(range(len(g["val_acc"])), key=lambda k: g["val_acc"][k])
        best[g["seed"]] = (g["test_acc"][i], max(g["test_acc"]))
        cells = ", ".join(f"{p:g}: {v:.2f} / {t:.2f}" for p, v, t in zip(g["p_hidden"], g["val_acc"], g["test_acc"]))
        rows.append(["grid of 6 fixed rates (p_hidden, val / test)", str(g["seed"]), cells,
                     f"{g['test_acc'][i]:.2f}", "0.00", str(g["epochs"]), f"{g['seconds']} s"])
    for m in result["methods"]:
        chosen, _ = best[m["seed"]]
        rows.append([f"`{m['method']}`", str(m["seed"]), m["rates"], f"{m['test_acc']:.2f}",
                     f"{m['test_acc'] - chosen:+.2f}", str(m["epochs"]),
                     "-" if m.get("seconds") is None else f"{m['seconds']} s"])
    return _table(["method", "seed", "rates", "test %", "vs the grid's best-on-validation rate", "epochs", "wall"], rows)


def ddp_table(result: dict) -> str:
    rows = [[str(r["nproc"]), f"{r['samples_per_s']:,.0f}", f"{r['speedup_vs_first']:.2f}", f"{100 * r['test_acc']:.1f}"]
            for r in result["results"]]
    return _table(["processes", "samples/s", "speed-up", "test % (1,000 examples)"], rows)


def residual_vit_step_table(groups_of_files: list[list[dict]]) -> str:
    """ViT step per drop rate and shape: timm's DropPath, DropPathResidual and rate 0, in the run's timer."""
    rows = []
    for files in groups_of_files:
        for data in files:
            shape = data["step_model"]
            tokens = (shape["img"] // shape["patch"]) ** 2 + 1
            for row in data["steps"]:
                sec = row["seconds"]
                rows.append([f"{row['rate']:g}", f"{tokens} tokens, batch {shape['batch']}", row.get("timer", "wall seconds"),
                             f"{sec['timm']:.3f}", f"{sec['dropkit']:.3f}", f"{sec['no_drop']:.3f}",
                             f"**{row['dropkit_over_timm']:.2f}**", f"{row['no_drop_over_timm']:.2f}"])
    return _table(["rate", "step", "timer", "timm", "dropkit", "rate 0", "dropkit / timm", "rate 0 / timm"], rows)


def residual_vit_accuracy_table(groups_of_files: list[list[dict]]) -> str:
    """Final test accuracy per seed of the short ViT runs with timm's DropPath and DropPathResidual."""
    rows = []
    for files in groups_of_files:
        runs: dict[str, dict[int, float]] = {"timm": {}, "dropkit": {}}
        for data in files:
            acc = data["accuracy"]
            for variant, values in acc["accuracy"].items():
                runs[variant].update(zip(acc["seeds"], values))
        seeds = sorted(runs["timm"])
        settings = files[0]["accuracy"]
        for variant, by_seed in runs.items():
            values = [by_seed[s] for s in seeds]
            rows.append([f"{settings['steps']} steps, rate {settings['rate']:g}", variant,
                         " / ".join(f"{100 * v:.1f}" for v in values),
                         f"{100 * statistics.mean(values):.2f}", f"{100 * (max(values) - min(values)):.1f}"])
    return _table(["run", "drop path", "test % by seed", "mean", "spread (points)"], rows)


def lora_step_table(groups_of_files: list[list[dict]]) -> str:
    """Bytes kept for backward and step time of each LoRA variant, per run."""
    names = {"dropout0": "lora_dropout = 0", "peft": "PEFT's dropout", "dropkit": "dropkit.convert"}
    rows = []
    for files in groups_of_files:
        for data in files:
            threads = data["environment"]["threads"]
            cpu = data.get("cpu_seconds") or {}
            for name, label in names.items():
                mem = data["memory"][name]
                rows.append([f"{threads} thread{'s' if threads > 1 else ''}", f"{label} ({data['model']['rate']:g})"
                             if name != "dropout0" else label, f"{mem['saved_bytes']:,}",
                             f"{mem['saved_bytes'] / data['memory']['dropout0']['saved_bytes']:.6f}",
                             f"{data['seconds'][name]:.3f}", f"{cpu[name]:.4f}" if name in cpu else "-"])
    return _table(["run", "LoRA dropout", "bytes kept for backward", "over lora_dropout = 0", "wall s per step",
                   "CPU s per step"], rows)


def _mean_spread(row: dict, key: str, scale: float = 100, fmt: str = "{:.2f}") -> str:
    spread = row.get(f"{key}_spread")
    return fmt.format(scale * row[key]) + ("" if spread is None else " ± " + fmt.format(scale * spread))


def _beyond_noise(a: list[float], b: list[float]) -> bool:
    """Welch's t-test at 5 % on two settings' per-seed values (:func:`dropkit.lab.stats.differs`)."""
    from dropkit.lab.stats import differs, estimate

    return bool(differs(estimate(a), estimate(b)))


def trees_table(groups_of_files: list[list[dict]]) -> str:
    """Per dataset: tree settings and the MLP, mean ± spread over seeds, which figures differ from
    plain boosting beyond the noise between seeds, and whether DART's best rate beats it."""
    blocks = []
    for files in groups_of_files:
        for data in files:
            for dataset, result in data["datasets"].items():
                base = next(r for r in result["trees"] if r["label"] == result["baseline"])
                rows = []
                for row in result["trees"]:
                    beyond = [what for what, key in (("test", "test_acc"), ("gap", "gap"))
                              if row is not base and _beyond_noise(row[f"{key}_values"], base[f"{key}_values"])]
                    rows.append([f"`{row['label']}`", _mean_spread(row, "train_acc"), _mean_spread(row, "val_acc"),
                                 f"**{_mean_spread(row, 'test_acc')}**", _mean_spread(row, "gap"),
                                 f"{row['rounds_trained']:.0f} rounds", _mean_spread(row, "fit_seconds", 1, "{:.0f}"),
                                 ", ".join(beyond) or "-"])
                for row in result["mlp"]:
                    rows.append([f"`{row['label']}`", _mean_spread(row, "train_eval_acc"), _mean_spread(row, "val_acc"),
                                 f"**{_mean_spread(row, 'test_acc')}**", _mean_spread(row, "gap"),
                                 f"{row['epochs']} epochs", _mean_spread(row, "seconds", 1, "{:.0f}"), ""])
                table = _table(["setting", "train %", "val %", "test %", "gap (points)", "length", "train s",
                                f"beyond the noise of `{result['baseline']}`"], rows)
                darts = [r for r in result["trees"] if r["boosting"] == "dart"]
                pick = max(darts, key=lambda r: r["val_acc"])
                wins = [what for what, key, sign in (("test accuracy", "test_acc", 1), ("train-test gap", "gap", -1))
                        if sign * (pick[key] - base[key]) > 0 and _beyond_noise(pick[f"{key}_values"],
                                                                                 base[f"{key}_values"])]
                verdict = (f"DART's best rate on validation data, `{pick['label']}`, "
                           + (f"beats plain boosting on {' and '.join(wins)}" if wins else
                              "does not beat plain boosting on test accuracy or the train-test gap")
                           + f" by more than the noise between seeds ({len(base['seeds'])} seeds).")
                blocks.append(f"**{dataset}** ({len(base['seeds'])} seeds; mean ± standard deviation)"
                              f"\n\n{table}\n\n{verdict}")
    return "\n\n".join(blocks)


def _single(files: list[str], fn: Callable[[dict], str]) -> Callable[[], str]:
    def render() -> str:
        data = load(files[0])
        return provenance(files, [data]) + "\n\n" + fn(data)
    return render


def _grouped(groups: list[list[str]], fn: Callable[[list[list[dict]]], str]) -> Callable[[], str]:
    def render() -> str:
        loaded = [[load(n) for n in names] for names in groups]
        names = [n for names in groups for n in names]
        return provenance(names, [d for files in loaded for d in files]) + "\n\n" + fn(loaded)
    return render


#: table name (as in the document's markers) -> how it is made
TABLES: dict[str, Callable[[], str]] = {
    "kernels_cpu": _single(["kernels_cpu.json"], kernels_table),
    "kernels_cpu_rate_bits": _single(["kernels_cpu_rate_bits_8_vs_16.json"], rate_bits_table),
    "step_mlp_cpu": _single(["step_mlp_cpu.json"], step_table),
    "step_mlp_cpu_compiled": _grouped([["step_mlp_cpu_compiled_2threads.json"],
                                       ["step_mlp_cpu_compiled_2threads_second_run.json"],
                                       ["step_mlp_cpu_compiled_1thread.json"],
                                       ["step_mlp_cpu_eager_1thread_beside_compiled.json"]], compiled_step_table),
    "structured_step": _single(["structured_step_grid.json"], structured_step_table),
    "structured_accuracy": _grouped([
        ["structured_accuracy_p05_mnist_8ep.json"], ["structured_accuracy_p05_fashion_8ep.json"],
        ["structured_accuracy_p05_fashion_20ep.json"], ["structured_accuracy_p05_fashion_40ep.json"],
        ["structured_accuracy_p03_mnist_8ep.json"],
        ["structured_accuracy_p03_fashion_8ep_seeds01.json", "structured_accuracy_p03_fashion_8ep_seed2.json"],
    ], structured_accuracy_table),
    "structured_time_to_accuracy": _grouped([
        ["structured_time_to_accuracy_p05_mnist.json"],
        ["structured_time_to_accuracy_p05_fashion_seeds01.json", "structured_time_to_accuracy_p05_fashion_seed2.json"],
    ], time_to_accuracy_table),
    "structured_grad_noise": _single(["structured_grad_noise_fashion.json"], grad_noise_table),
    "choosing_p": _single(["choosing_p_mlp1024.json"], choosing_p_table),
    "reference_runs": _single(["reference_runs.json"], reference_table),
    "reference_tutorial": _single(["reference_tutorial_compare.json"], tutorial_table),
    "reference_seeds": _single(["reference_srivastava_seeds.json"], seeds_table),
    "reference_weight_averaging": _single(["reference_srivastava_weight_averaging.json"], weight_averaging_table),
    "reference_mc_averaging": _single(["reference_srivastava_mc_averaging.json"], mc_table),
    "ddp_cpu": _single(["ddp_throughput_cpu.json"], ddp_table),
    "residual_vit_step": _grouped([["residual_vit_step_t1_cpu_time.json", "residual_vit_step_t1_cpu_time_65tokens.json",
                                    "residual_vit_step_t2_wall.json"]],
                                  residual_vit_step_table),
    "residual_vit_accuracy": _grouped([["residual_vit_accuracy.json"], ["residual_vit_accuracy_1000steps_seed0.json",
                                       "residual_vit_accuracy_1000steps_seed1.json",
                                       "residual_vit_accuracy_1000steps_seed2.json"]], residual_vit_accuracy_table),
    "lora_step": _grouped([["lora_step_t1_cpu_time.json", "lora_step_saved_bytes.json"]], lora_step_table),
    "mc_uncertainty": _single(["mc_uncertainty_mnist_fashion.json"], mc_uncertainty_table),
    "mc_levels": _single(["mc_uncertainty_mnist_fashion.json"], mc_levels_table),
    "mc_speed": _single(["mc_speed_srivastava_mlp_t20.json"], mc_speed_table),
    "trees_dart": _grouped([["trees_dart_reference_fashion.json"], ["trees_dart_reference_mnist.json"]], trees_table),
}


def render(text: str, tables: dict[str, Callable[[], str]] = TABLES) -> str:
    """``text`` with every generated block rebuilt; a marker naming an unknown table raises."""
    def block(match: re.Match) -> str:
        name = match.group("name")
        if name not in tables:
            raise KeyError(f"BENCHMARKS.md names an unknown generated table {name!r} (known: {', '.join(tables)})")
        return match.group(1) + tables[name]() + "\n" + match.group(4)
    return _BLOCK.sub(block, text)


def stale_tables(text: str) -> list[str]:
    """Names of the generated blocks whose content differs from what the data gives."""
    return [m.group("name") for m in _BLOCK.finditer(text) if render(m.group(0)) != m.group(0)]


def stamp(path: Path, date: str | None = None) -> None:
    """Record ``date`` (default: today, UTC) as ``recorded.date`` in the result file at ``path``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    recorded = {**data.get("recorded", {}), "date": date or datetime.now(timezone.utc).date().isoformat()}
    path.write_text(json.dumps({"recorded": recorded, **{k: v for k, v in data.items() if k != "recorded"}}, indent=1)
                    + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report tables that differ from the data; exit 1 if any")
    parser.add_argument("--document", type=Path, default=DOCUMENT, help="the Markdown file to update (default: BENCHMARKS.md)")
    parser.add_argument("--stamp", nargs="+", type=Path, default=[], metavar="FILE",
                        help="first record today's date (UTC) in these result files, as benchmarks/run.sh does")
    args = parser.parse_args(argv)
    for path in args.stamp:
        stamp(path)
    text = args.document.read_text(encoding="utf-8")
    if args.check:
        stale = stale_tables(text)
        if stale:
            print(f"{args.document}: out of date: {', '.join(stale)} (run python benchmarks/summarize.py)", file=sys.stderr)
            return 1
        return 0
    new = render(text)
    if new != text:
        args.document.write_text(new, encoding="utf-8")
        print(f"{args.document}: tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
