"""``dropkit train``: train one model at one or several dropout rates and print them side by side.

    dropkit train --model tutorial_mlp --p 0 0.5 --epochs 10 --out runs/demo

Each ``--p`` value is one run with the same seed, data and settings; the table at the end shows
what the rate changed. With ``--out DIR`` each run writes its metrics, config, result and
checkpoint to ``DIR/p=<p>/`` and the table's figures go to ``DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dropkit.commands.options import add_run_options, config_from_args, float_in
from dropkit.models import main_rate
from dropkit.train import TrainConfig, TrainResult, train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``dropkit train`` and its arguments."""
    parser = subparsers.add_parser(
        "train",
        help="train a model at one or more dropout rates and compare them",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--p", type=float_in(0, 1), nargs="+", default=[None], metavar="P",
                        help="main dropout rate(s) in [0, 1], one run each (default: the model's own)")
    add_run_options(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, help="folder for the runs (DIR/p=<p>/) and summary.json")
    out.add_argument("--resume", action="store_true", help="continue each run from its checkpoint in --out")
    out.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    parser.set_defaults(func=run)


def _configs(args: argparse.Namespace) -> list[TrainConfig]:
    """One validated config per ``--p`` value; all are checked before any training starts."""
    return [config_from_args(args, p=p) for p in args.p]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def format_table(results: list[TrainResult]) -> str:
    """The side-by-side table: one row per rate, final-epoch figures."""
    header = f"{'p':>5} {'train acc':>10} {'val acc':>9} {'test acc':>9} {'gap':>8} {'s/epoch':>8}"
    lines = [header]
    for result in results:
        row = result.final
        lines.append(
            f"{row['p']:>5g} {_percent(row['train_acc']):>10} {_percent(row['val_acc']):>9} "
            f"{_percent(row['test_acc']):>9} {100 * row['gap']:>+7.2f}% {result.summary()['seconds_per_epoch']:>8.2f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Train one run per rate, print the table, and write summary.json when ``--out`` is given."""
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR, the folder of the runs to continue")
    if len(set(args.p)) < len(args.p):
        raise ValueError(f"--p values must differ (each is one run), got {' '.join(f'{p:g}' for p in args.p)}")
    results = []
    for config in _configs(args):
        rate = main_rate(config.model, config.p, **config.model_kwargs)
        run_dir = args.out / f"p={rate:g}" if args.out is not None else None
        result = train(config, run_dir, resume=args.resume, quiet=args.quiet)
        if not args.quiet:
            print(f"p={result.final['p']:g}: test acc {_percent(result.final['test_acc'])} after "
                  f"{len(result.history)} epochs" + (f" -> {run_dir}" if run_dir else ""), file=sys.stderr)
        results.append(result)
    first = results[0].config
    print(f"{first.model} on {first.dataset}: {first.epochs} epochs, {first.optimizer} lr {first.lr:g}, "
          f"batch {first.batch_size}, seed {first.seed}")
    print(format_table(results))
    print("train acc: measured during the last epoch with dropout active; val/test acc: eval mode, every unit.")
    if args.out is not None:
        summary = {"runs": [{"out_dir": str(r.out_dir), **r.summary()} for r in results]}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0
