"""``dropkit train``: train one model at one or several dropout rates and print them side by side.

    dropkit train --model tutorial_mlp --p 0 0.5 --epochs 10 --out runs/demo

Each ``--p`` value is one run with the same seed, data and settings; the table at the end shows
what the rate changed. ``--seeds N`` trains each rate with N seeds (``--seed``, ``--seed + 1``,
...) and the table shows each figure's mean and spread over them. Time per epoch is the median of
the epochs after each run's first; the kernels are warmed up before any run, and that time is
printed on its own line. With ``--out DIR`` each run writes its metrics, config, result and
checkpoint to ``DIR/p=<p>/`` (``DIR/p=<p>/seed=<seed>/`` with several seeds) and the table's
figures go to ``DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

from dropkit import kernels
from dropkit.lab import distributed, run_lock
from dropkit.lab.commands.options import add_run_options, config_from_args, description, float_in, int_at_least
from dropkit.lab.models import main_rate
from dropkit.lab.stats import estimate, steady_epoch_seconds
from dropkit.lab.train import DROP_SCHEDULES, TrainConfig, train

RATE_MODES = ("auto", "concrete")


def _rate(text: str) -> float | str:
    """A --p value: a float in [0, 1], or ``auto`` (the overfitting controller) or ``concrete`` (learnt)."""
    return text if text in RATE_MODES else float_in(0, 1)(text)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``dropkit train`` and its arguments."""
    parser = subparsers.add_parser(
        "train",
        help="train a model at one or more dropout rates and compare them",
        description=description(__doc__),
    )
    parser.add_argument("--p", type=_rate, nargs="+", default=[None], metavar="P",
                        help="main dropout rate(s) in [0, 1], one run each (default: the model's own); "
                             "'auto' lets dropkit's controller steer p from the validation loss, "
                             "'concrete' learns p by Concrete Dropout (both start the main rate at 0.1)")
    parser.add_argument("--p-schedule", choices=DROP_SCHEDULES, default="constant",
                        help="how a fixed p evolves: constant; curriculum (ramp from 0, Morerio et al. 2017); "
                             "early (p decaying to 0 by --p-cutoff) or late (0 until --p-cutoff), Liu et al. 2023")
    parser.add_argument("--p-cutoff", type=int_at_least(1), default=0,
                        help="epoch where early dropout ends or late dropout starts")
    parser.add_argument("--nproc", type=int_at_least(1), default=1,
                        help="data-parallel worker processes on this machine (torch.distributed, gloo on CPU)")
    parser.add_argument("--seeds", type=int_at_least(1), default=1,
                        help="runs per rate, with seeds --seed, --seed + 1, ...; the table shows mean ± spread "
                             "(default %(default)s)")
    add_run_options(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, help="folder for the runs (DIR/p=<p>/) and summary.json")
    out.add_argument("--resume", action="store_true", help="continue each run from its checkpoint in --out")
    out.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    parser.set_defaults(func=run)


def _configs(args: argparse.Namespace) -> list[TrainConfig]:
    """One validated config per ``--p`` value; all are checked before any training starts."""
    return [
        config_from_args(args, p=None, rate=p, drop_schedule=args.p_schedule, drop_cutoff=args.p_cutoff)
        if p in RATE_MODES else
        config_from_args(args, p=p, drop_schedule=args.p_schedule, drop_cutoff=args.p_cutoff)
        for p in args.p
    ]


def _label(config: TrainConfig) -> str:
    """The run's folder name: its rate, or its rate mode."""
    if config.rate != "fixed":
        return f"p={config.rate}"
    return f"p={main_rate(config.model, config.p, **config.model_kwargs):g}"


def train_runs(configs: list[TrainConfig], out: Path | None, resume: bool, quiet: bool, seeds: int = 1) -> list[dict]:
    """Train each config with ``seeds`` seeds in turn (in this process, or as one rank of a
    distributed job); returns, per run, its label, summary and history (plain data, so it can
    cross process boundaries)."""
    runs = []
    for base in configs:
        for seed in range(base.seed, base.seed + seeds):
            config = dataclasses.replace(base, seed=seed)
            run_dir = out / _label(config) if out is not None else None
            if run_dir is not None and seeds > 1:
                run_dir = run_dir / f"seed={seed}"
            result = train(config, run_dir, resume=resume, quiet=quiet)
            if not quiet and distributed.is_main():
                print(f"{_label(config)}" + (f" seed {seed}" if seeds > 1 else "")
                      + f": test acc {_percent(result.final['test_acc'])} after {len(result.history)} epochs"
                      + (f" -> {run_dir}" if run_dir else ""), file=sys.stderr)
            runs.append({"label": _label(config), "out_dir": str(run_dir) if run_dir else None,
                         "history": result.history, **result.summary()})
    return runs


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _figure(values: list[float], scale: float, fmt: str) -> str:
    """Mean ± spread of some runs' figure (just the value for one run)."""
    found = estimate(values)
    spread = "" if found.spread is None else f"±{scale * found.spread:.2f}"
    return fmt.format(scale * found.mean) + spread


def format_table(runs: list[dict]) -> str:
    """The side-by-side table: one row per rate, final-epoch figures (mean ± spread over seeds);
    s/epoch is the median of the epochs after each run's first."""
    header = (f"{'p':>9} {'train acc':>12} {'train eval':>12} {'val acc':>12} {'test acc':>12} {'gap':>12} "
              f"{'s/epoch':>8}")
    lines = [header]
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    for group in groups.values():
        finals = [run["final"] for run in group]
        rate = group[0]["config"]["rate"]
        p = f"{finals[0]['p']:g}" if rate == "fixed" else f"{rate}:{statistics.fmean(r['p'] for r in finals):.2f}"

        def cell(key: str, fmt: str = "{:.2f}%") -> str:
            values = [row[key] for row in finals]
            return "-" if None in values else _figure(values, 100, fmt)

        seconds = statistics.median(s for run in group for s in steady_epoch_seconds(run["history"]))
        lines.append(f"{p:>9} {cell('train_acc'):>12} {cell('train_eval_acc'):>12} {cell('val_acc'):>12} "
                     f"{cell('test_acc'):>12} {cell('gap', '{:+.2f}%'):>12} {seconds:>8.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Train one run per rate, print the table, and write summary.json when ``--out`` is given.

    With ``--nproc N`` the runs are trained by N worker processes; inside a job that ``torchrun``
    started (e.g. across machines) this process is one of its ranks and joins the others. The
    ``--out`` folder is locked for the whole command (by rank 0 of a ``torchrun`` job: each run's
    own folder), so a second command into it is refused.
    """
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR, the folder of the runs to continue")
    if len(set(args.p)) < len(args.p):
        raise ValueError(f"--p values must differ (each is one run), got {' '.join(str(p) for p in args.p)}")
    configs = _configs(args)
    locked = args.out is not None and not distributed.launched_by_torchrun()
    with run_lock.hold(args.out) if locked else nullcontext():
        return _run(args, configs)


def _run(args: argparse.Namespace, configs: list[TrainConfig]) -> int:
    """Train the runs (here, in worker processes or as one rank) and print and write their table."""
    if distributed.launched_by_torchrun():
        distributed.share_cores()
        with distributed.process_group():
            runs = train_runs(configs, args.out, args.resume, args.quiet, args.seeds)
            main = distributed.is_main()
    else:
        warmup = kernels.warmup()
        if not args.quiet:
            print(f"kernel warm-up: {warmup:.2f} s (compiled or loaded from the cache; outside every epoch's time)",
                  file=sys.stderr, flush=True)
        if args.nproc > 1:
            runs = distributed.launch(args.nproc, train_runs, configs, args.out, args.resume, True, args.seeds)
        else:
            runs = train_runs(configs, args.out, args.resume, args.quiet, args.seeds)
        main = True
    if not main:
        return 0
    first = configs[0]
    print(f"{first.model} on {first.dataset}: {first.epochs} epochs, {first.optimizer} lr {first.lr:g}, "
          f"batch {first.batch_size}, "
          + (f"seeds {first.seed}-{first.seed + args.seeds - 1} (mean ± spread)" if args.seeds > 1
             else f"seed {first.seed}")
          + (f", {args.nproc} processes" if args.nproc > 1 else ""))
    print(format_table(runs))
    print("train acc: during the last epoch, dropout active; train eval (10,000 training examples), val and test: "
          "eval mode, every unit; gap = train eval - test; s/epoch: median of the epochs after the first.")
    if args.out is not None:
        summary = {"runs": [{k: v for k, v in r.items() if k != "history"} for r in runs]}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0
