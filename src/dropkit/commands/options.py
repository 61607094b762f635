"""Command-line options shared by every subcommand that trains: model, data, optimiser, epochs, seed.

One definition, so ``train``, ``compare`` and ``sweep`` accept the same flags with the same
meaning, and one conversion to :class:`dropkit.train.TrainConfig`, which validates the values.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dropkit.data import DATASETS
from dropkit.models import MODELS
from dropkit.train import OPTIMIZERS, SCHEDULES, TrainConfig


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Register the flags that describe one training run (everything but the dropout rate)."""
    group = parser.add_argument_group("training run")
    group.add_argument("--model", default="tutorial_mlp", choices=sorted(MODELS), help="reference model")
    group.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON",
                       help='extra model arguments as JSON, e.g. \'{"hidden": 256}\'')
    group.add_argument("--dataset", default="mnist", choices=DATASETS)
    group.add_argument("--data-dir", help="folder holding the four IDX files (overrides --dataset's location)")
    group.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    group.add_argument("--lr", type=float, default=1e-3, help="learning rate (> 0)")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum in [0, 1)")
    group.add_argument("--weight-decay", type=float, default=0.0, help="L2 penalty (>= 0)")
    group.add_argument("--max-norm", type=float, default=None, help="max-norm bound c on hidden weight rows (> 0)")
    group.add_argument("--schedule", default="none", choices=SCHEDULES, help="learning-rate schedule")
    group.add_argument("--epochs", type=int, default=10, help="epochs (>= 1)")
    group.add_argument("--batch-size", type=int, default=128, help="batch size (>= 1)")
    group.add_argument("--seed", type=int, default=0, help="seed for weights, masks and shuffling")
    group.add_argument("--val-size", type=int, default=5000, help="validation examples carved from training (>= 0)")
    group.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
    group.add_argument("--limit-test", type=int, default=None, help="use only the first N test examples")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The validated :class:`TrainConfig` the flags describe, with ``overrides`` applied."""
    config = TrainConfig(
        model=args.model, model_kwargs=dict(args.model_kwargs), optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, max_norm=args.max_norm, schedule=args.schedule,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, val_size=args.val_size,
        dataset=args.dataset, data_dir=args.data_dir, limit_train=args.limit_train, limit_test=args.limit_test,
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    config.validate()
    return config
