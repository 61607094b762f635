"""``dropkit compare``: one model and data under several settings, each with several seeds, and a
report that states a difference only where it exceeds the noise between seeds."""

from __future__ import annotations

import argparse
import math

from dropkit import kernels
from dropkit.lab import run_lock
from dropkit.lab.commands.options import add_run_options, config_from_args, float_in, int_at_least
from dropkit.lab.commands.trees import add_tree_options, run_compare as run_tree_compare
from dropkit.lab.compare import REGULARISERS, Setting, p_settings, reg_settings, run_settings, summarise
from dropkit.lab.report import write_report
from dropkit.lab.train import TrainConfig
from dropkit.lab.trees import TREE_MODELS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="train under several dropout rates or regularisers and write a report",
        description="Examples: dropkit compare --p 0 0.2 0.5 0.8 --out runs/p;  "
                    "dropkit compare --model srivastava_mlp --reg none l2 maxnorm dropout dropout+maxnorm;  "
                    "dropkit compare --model gbdt --reg none dart:0.1 rf --seeds 3",
    )
    settings = parser.add_mutually_exclusive_group(required=True)
    settings.add_argument("--p", type=float_in(0, 1), nargs="+", help="main dropout rates to compare, each in [0, 1]")
    settings.add_argument("--reg", nargs="+", metavar="REG",
                          help=f"regularisers to compare: {', '.join(REGULARISERS)}; for --model gbdt: none, "
                               "dart:RATE, rf, rf:RATE")
    parser.add_argument("--dropout-p", type=float_in(0, 1), default=0.5, help="main rate of the --reg dropout settings")
    parser.add_argument("--l2", type=float_in(0, math.inf, high_open=True), default=5e-4,
                        help="weight decay of the --reg l2 setting")
    parser.add_argument("--max-norm-c", type=float_in(0, math.inf, low_open=True, high_open=True), default=3.0,
                        help="max-norm bound of the --reg maxnorm settings")
    parser.add_argument("--seeds", type=int_at_least(1), default=3,
                        help="runs per setting, with seeds --seed, --seed + 1, ...; the report gives mean and spread "
                             "and calls a difference real only beyond that spread (default %(default)s)")
    parser.add_argument("--out", default="runs/compare",
                        help="folder for the runs (OUT/<setting>/seed=<seed>/) and report.html, report.json "
                             "(default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no line per epoch while the runs train")
    parser.add_argument("--resume", action="store_true", help="continue a killed comparison from its checkpoints")
    parser.add_argument("--nproc", type=int_at_least(1), default=1,
                        help="data-parallel worker processes per run (torch.distributed, gloo on CPU)")
    add_run_options(parser, extra_models=TREE_MODELS)
    add_tree_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model in TREE_MODELS:
        return run_tree_compare(args)
    base = config_from_args(args)
    if args.p is not None:
        settings = p_settings(args.p)
    else:
        settings = reg_settings(args.model, args.reg, p=args.dropout_p, l2=args.l2, max_norm=args.max_norm_c)
    with run_lock.hold(args.out):
        return _compare(args, base, settings)


def _compare(args: argparse.Namespace, base: TrainConfig, settings: list[Setting]) -> int:
    """Train the settings into the locked ``--out`` folder, then write and print the report."""
    print(f"dropkit compare: {len(settings)} settings x {args.seeds} seeds x {base.epochs} epochs of {base.model} "
          f"on {base.dataset}", flush=True)
    warmup = kernels.warmup()
    print(f"kernel warm-up: {warmup:.2f} s (compiled or loaded from the cache; outside every epoch's time)",
          flush=True)
    runs = run_settings(base, settings, args.out, seeds=args.seeds, resume=args.resume, nproc=args.nproc,
                        progress=not args.quiet)
    summary = summarise(runs)
    context = {"model": base.model, "dataset": base.dataset, "epochs": base.epochs, "optimizer": base.optimizer,
               "lr": base.lr, "batch_size": base.batch_size, "seeds": f"{base.seed}-{base.seed + args.seeds - 1}",
               "warmup_seconds": round(warmup, 3)}
    json_path, html_path = write_report(args.out, f"dropkit compare: {base.model} on {base.dataset}", runs,
                                        summary, context)
    print(format_table(summary))
    for statement in summary["statements"]:
        print("-", statement)
    print(f"report: {html_path}  data: {json_path}")
    return 0


def _figure(row: dict, key: str, fmt: str = "{:.2f}", scale: float = 100) -> str:
    """A figure with its spread over seeds (``97.12±0.08``), or ``-`` when there is none."""
    if row[key] is None:
        return "-"
    spread = row.get(f"{key}_spread")
    return fmt.format(scale * row[key]) + ("" if spread is None else "±" + f"{scale * spread:.2f}")


def format_table(summary: dict) -> str:
    """The per-setting figures as an aligned text table: means over seeds, ± one spread; time per
    epoch is the median of the epochs after each run's first."""
    header = (f"{'setting':<14}{'train acc':>13}{'train eval':>13}{'val acc':>13}{'test acc':>13}{'gap':>13}"
              f"{'s/epoch':>13}{'first s':>9}{'saved MiB':>10}")
    lines = [header, "-" * len(header)]
    for row in summary["settings"]:
        lines.append(f"{row['label']:<14}{_figure(row, 'train_acc'):>13}{_figure(row, 'train_eval_acc'):>13}"
                     f"{_figure(row, 'val_acc'):>13}{_figure(row, 'test_acc'):>13}"
                     f"{_figure(row, 'gap', '{:+.2f}'):>13}{_figure(row, 'seconds_per_epoch', '{:.3f}', 1):>13}"
                     f"{row['first_epoch_seconds']:>9.2f}{row['saved_mib']:>10.2f}")
    return "\n".join(lines)
