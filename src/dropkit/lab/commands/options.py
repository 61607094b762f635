"""Command-line options shared by every subcommand that trains: model, data, optimiser, epochs, seed.

One definition, so ``train``, ``compare`` and ``sweep`` accept the same flags with the same
meaning and the same range checks, and one conversion to :class:`dropkit.lab.train.TrainConfig`
(which validates again, for callers that build configs in code).
"""

from __future__ import annotations

import argparse
import ast
import math
import re
from collections.abc import Callable
from typing import Any

from dropkit.lab.data import DATASETS
from dropkit.lab.models import MODELS, check_model_args
from dropkit.lab.train import INPUTS, OPTIMIZERS, SCHEDULES, TrainConfig, model_p


def description(doc: str) -> str:
    """A module docstring's first paragraph as plain text for ``--help``: reST literals (````x````)
    and roles (``:class:`~a.b.C```) become their bare text."""
    first = doc.strip().split("\n\n")[0]
    first = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", first)
    return " ".join(first.replace("``", "").split())


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
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


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (and <= ``high`` when given)."""
    interval = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {interval}, got {text}")
        return value

    return parse


#: the largest learning rate accepted: far beyond any that trains (training stops with an error
#: when the loss diverges), but it refuses values such as 1e308 before any work is done
MAX_LR = 1e3
#: a learning rate: > 0 and at most MAX_LR
LEARNING_RATE = float_in(0, MAX_LR, low_open=True)

#: a drop rate with something to drop and something kept: strictly between 0 and 1 (the benchmarks' ``--p``)
OPEN_RATE = float_in(0, 1, low_open=True, high_open=True)


def model_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE a Python literal (``0.2``, ``True``, ``(32, 64)``) or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def add_run_options(parser: argparse.ArgumentParser, extra_models: tuple[str, ...] = ()) -> None:
    """Register the flags that describe one training run, except the dropout rate and the output;
    ``--model`` also accepts ``extra_models`` (the tree ensembles, for ``compare`` and ``sweep``)."""
    defaults = TrainConfig()
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=[*MODELS, *extra_models], default=defaults.model,
                       help="network to train (default %(default)s)")
    model.add_argument("--model-arg", type=model_arg, action="append", default=[], metavar="KEY=VALUE",
                       help="extra model argument, repeatable, e.g. width=512 or batchnorm=True")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                     help="optimiser; nesterov is SGD with Nesterov momentum (default %(default)s)")
    opt.add_argument("--lr", type=LEARNING_RATE, default=defaults.lr,
                     help=f"learning rate in (0, {MAX_LR:g}] (default %(default)g)")
    opt.add_argument("--momentum", type=float_in(0, 1, high_open=True), default=defaults.momentum,
                     help="SGD momentum in [0, 1) (default %(default)g)")
    opt.add_argument("--momentum-ramp", type=int_at_least(0), default=defaults.momentum_ramp, metavar="EPOCHS",
                     help="raise SGD momentum linearly from --momentum-start to --momentum over this many epochs "
                          "(default %(default)s: constant)")
    opt.add_argument("--momentum-start", type=float_in(0, 1, high_open=True), default=defaults.momentum_start,
                     help="momentum in the first epoch of a ramp, <= --momentum (default %(default)g)")
    opt.add_argument("--weight-decay", type=float_in(0, math.inf, high_open=True), default=defaults.weight_decay,
                     help="L2 penalty, >= 0 (default %(default)g)")
    opt.add_argument("--max-norm", type=float_in(0, math.inf, low_open=True, high_open=True), default=None,
                     help="cap each hidden unit's incoming weight norm (Srivastava et al. 2014; 3-4 typical)")
    opt.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                     help="learning-rate schedule (default %(default)s)")
    opt.add_argument("--step-epochs", type=int_at_least(1), default=defaults.step_epochs,
                     help="step schedule: epochs between lr drops (default %(default)s)")
    opt.add_argument("--step-gamma", type=float_in(0, 1, low_open=True), default=defaults.step_gamma,
                     help="step schedule: lr factor in (0, 1] (default %(default)g)")
    opt.add_argument("--epochs", type=int_at_least(1), default=defaults.epochs,
                     help="passes over the training data (default %(default)s)")
    opt.add_argument("--average-from", type=int_at_least(0), default=defaults.average_from, metavar="EPOCH",
                     help="also score the running average of the weights from this epoch on, as avg_* metrics "
                          "(stochastic weight averaging; default %(default)s: off)")
    opt.add_argument("--batch-size", type=int_at_least(1), default=defaults.batch_size,
                     help="global batch size (default %(default)s)")
    opt.add_argument("--seed", type=int_at_least(0), default=defaults.seed,
                     help="seeds weights, dropout masks and shuffling (default %(default)s)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=defaults.dataset,
                      help=f"{' or '.join(DATASETS)}, or any name with --data-dir (default %(default)s)")
    data.add_argument("--data-dir", default=None, help="folder holding the four IDX files")
    data.add_argument("--inputs", choices=INPUTS, default=defaults.inputs,
                      help="pixels standardised with the training mean and std, or in [0, 1] (default %(default)s)")
    data.add_argument("--val-size", type=int_at_least(0), default=defaults.val_size,
                      help="training examples held out for validation (default %(default)s)")
    data.add_argument("--limit-train", type=int_at_least(1), default=None, help="train on the first N examples")
    data.add_argument("--limit-test", type=int_at_least(1), default=None, help="test on the first N examples")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The validated :class:`TrainConfig` the flags describe, with ``overrides`` applied."""
    config = TrainConfig(
        model=args.model, model_kwargs=dict(args.model_arg), optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, momentum_ramp=args.momentum_ramp, momentum_start=args.momentum_start,
        weight_decay=args.weight_decay, max_norm=args.max_norm, schedule=args.schedule,
        step_epochs=args.step_epochs, step_gamma=args.step_gamma, epochs=args.epochs,
        average_from=args.average_from, batch_size=args.batch_size,
        seed=args.seed, val_size=args.val_size, dataset=args.dataset, inputs=args.inputs, data_dir=args.data_dir,
        limit_train=args.limit_train, limit_test=args.limit_test,
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    config.validate()
    try:
        check_model_args(config.model, model_p(config), **config.model_kwargs)
    except ValueError as err:
        raise ValueError(f"--model-arg: {err}") from None
    return config
