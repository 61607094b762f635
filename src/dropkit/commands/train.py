"""``dropkit train``: train one model at one or several dropout rates and print them side by side.

    dropkit train --model tutorial_mlp --p 0 0.5 --epochs 10 --out runs/demo

Each ``--p`` value is one run with the same seed, data and settings; the table at the end shows
what the rate changed. With ``--out DIR`` each run writes its metrics, config, result and
checkpoint to ``DIR/p=<p>/`` and the table's figures go to ``DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dropkit.data import DATASETS
from dropkit.models import MODELS, main_rate
from dropkit.train import OPTIMIZERS, SCHEDULES, TrainConfig, TrainResult, train


def _float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval given; the error states the interval."""
    if math.isinf(high):
        interval = f"{'>' if low_open else '>='} {low:g}"
    else:
        interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {interval}, got {text}")
        return value

    return parse


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value

    return parse


def _model_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE a Python literal (``0.2``, ``True``, ``(32, 64)``) or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``dropkit train`` and its arguments."""
    parser = subparsers.add_parser(
        "train",
        help="train a model at one or more dropout rates and compare them",
        description=__doc__.split("\n\n")[0],
    )
    defaults = TrainConfig()
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=list(MODELS), default=defaults.model,
                       help="network to train (default %(default)s)")
    model.add_argument("--p", type=_float_in(0, 1), nargs="+", default=[None], metavar="P",
                       help="main dropout rate(s) in [0, 1], one run each (default: the model's own)")
    model.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
                       help="extra model argument, repeatable, e.g. width=512 or batchnorm=True")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer, help="(default %(default)s)")
    opt.add_argument("--lr", type=_float_in(0, math.inf, low_open=True, high_open=True), default=defaults.lr,
                     help="learning rate, > 0 (default %(default)g)")
    opt.add_argument("--momentum", type=_float_in(0, 1, high_open=True), default=defaults.momentum,
                     help="SGD momentum in [0, 1) (default %(default)g)")
    opt.add_argument("--weight-decay", type=_float_in(0, math.inf, high_open=True), default=defaults.weight_decay,
                     help="L2 penalty, >= 0 (default %(default)g)")
    opt.add_argument("--max-norm", type=_float_in(0, math.inf, low_open=True, high_open=True), default=None,
                     help="cap each hidden unit's incoming weight norm (Srivastava et al. 2014; 3-4 typical)")
    opt.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                     help="learning-rate schedule (default %(default)s)")
    opt.add_argument("--step-epochs", type=_int_at_least(1), default=defaults.step_epochs,
                     help="step schedule: epochs between lr drops (default %(default)s)")
    opt.add_argument("--step-gamma", type=_float_in(0, 1, low_open=True), default=defaults.step_gamma,
                     help="step schedule: lr factor in (0, 1] (default %(default)g)")
    opt.add_argument("--epochs", type=_int_at_least(1), default=defaults.epochs, help="(default %(default)s)")
    opt.add_argument("--batch-size", type=_int_at_least(1), default=defaults.batch_size, help="(default %(default)s)")
    opt.add_argument("--seed", type=_int_at_least(0), default=defaults.seed,
                     help="seeds weights, dropout masks and shuffling (default %(default)s)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=defaults.dataset,
                      help=f"{' or '.join(DATASETS)}, or any name with --data-dir (default %(default)s)")
    data.add_argument("--data-dir", default=None, help="folder holding the four IDX files")
    data.add_argument("--val-size", type=_int_at_least(0), default=defaults.val_size,
                      help="training examples held out for validation (default %(default)s)")
    data.add_argument("--limit-train", type=_int_at_least(1), default=None, help="train on the first N examples")
    data.add_argument("--limit-test", type=_int_at_least(1), default=None, help="test on the first N examples")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, help="folder for the runs (DIR/p=<p>/) and summary.json")
    out.add_argument("--resume", action="store_true", help="continue each run from its checkpoint in --out")
    out.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    parser.set_defaults(func=run)


def _configs(args: argparse.Namespace) -> list[TrainConfig]:
    """One validated config per ``--p`` value; all are checked before any training starts."""
    configs = [
        TrainConfig(
            model=args.model, model_kwargs=dict(args.model_arg), p=p, optimizer=args.optimizer, lr=args.lr,
            momentum=args.momentum, weight_decay=args.weight_decay, max_norm=args.max_norm,
            schedule=args.schedule, step_epochs=args.step_epochs, step_gamma=args.step_gamma,
            epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, val_size=args.val_size,
            dataset=args.dataset, data_dir=args.data_dir, limit_train=args.limit_train, limit_test=args.limit_test,
        )
        for p in args.p
    ]
    for config in configs:
        config.validate()
    return configs


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
