"""The tree-ensemble paths of ``dropkit compare`` (``--model gbdt --reg none dart:0.1 rf``, with
``--seeds``) and ``dropkit sweep`` (``--model gbdt``: DART's drop rate searched over ``--p-range``),
with the extra flags ``--data FILE --target COLUMN``; tree parameters come as
``--model-arg KEY=VALUE`` (see :class:`dropkit.lab.trees.TreeConfig`)."""

from __future__ import annotations

import argparse
from typing import Any

from dropkit.lab.commands.options import int_at_least
from dropkit.lab.train import TrainConfig
from dropkit.lab.trees import TREE_MODELS, TreeConfig, run_tree_settings, tree_settings

#: network flags (argparse dest) that a tree model does not use, and what to use instead
NETWORK_ONLY = {
    "lr": "--model-arg learning_rate=...", "epochs": "--model-arg rounds=...", "optimizer": None, "momentum": None,
    "momentum_ramp": None, "momentum_start": None, "weight_decay": None, "max_norm": None, "schedule": None,
    "step_epochs": None, "step_gamma": None, "average_from": None, "batch_size": None, "inputs": None,
}


def add_tree_options(parser: argparse.ArgumentParser, *, seeds: bool = True) -> None:
    """Register ``--data``, ``--target`` and, with ``seeds`` (unless the command has it already), ``--seeds``."""
    group = parser.add_argument_group(f"tree models ({', '.join(TREE_MODELS)})")
    group.add_argument("--data", default=None, metavar="FILE",
                       help="a CSV or Parquet table to train on instead of --dataset (tree models)")
    group.add_argument("--target", default=None, metavar="COLUMN", help="the column of --data to predict")
    if not seeds:
        return
    try:
        group.add_argument("--seeds", type=int_at_least(1), default=3,
                           help="runs per setting, with seeds --seed, --seed + 1, ... (default %(default)s)")
    except argparse.ArgumentError:
        pass  # the command already defines --seeds with this meaning


def tree_config_from_args(args: argparse.Namespace) -> TreeConfig:
    """The base :class:`TreeConfig` the flags describe; a network-only flag is refused by name."""
    defaults = TrainConfig()
    for dest, instead in NETWORK_ONLY.items():
        if hasattr(args, dest) and getattr(args, dest) != getattr(defaults, dest):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} applies to networks, not to --model {args.model}"
                             + (f"; use {instead}" if instead else ""))
    if getattr(args, "nproc", 1) != 1 or getattr(args, "resume", False):
        raise ValueError(f"--nproc and --resume apply to networks, not to --model {args.model}")
    tunable: dict[str, Any] = {}
    for key, value in args.model_arg:
        if key not in TreeConfig.TUNABLE:
            raise ValueError(f"--model-arg {key}: not a parameter of --model {args.model}; "
                             f"accepted: {', '.join(TreeConfig.TUNABLE)}")
        tunable[key] = value
    config = TreeConfig(seed=args.seed, dataset=args.dataset, data_dir=args.data_dir, data=args.data,
                        target=args.target, val_size=args.val_size, limit_train=args.limit_train,
                        limit_test=args.limit_test, **tunable)
    config.validate()
    return config


def run_compare(args: argparse.Namespace) -> int:
    """``dropkit compare --model gbdt --reg ...``: train, summarise, write the report."""
    from dropkit.lab.report import write_report
    from dropkit.lab.tree_compare import summarise_trees

    if args.p is not None:
        raise ValueError(f"--p sets a network's dropout rate; for --model {args.model} compare "
                         "--reg none dart:RATE ... rf")
    if args.reg is None:
        raise ValueError(f"--model {args.model} compares --reg settings: none, dart:RATE, rf or rf:RATE")
    settings = tree_settings(args.reg)
    base = tree_config_from_args(args)
    source = base.data or base.dataset
    print(f"dropkit compare: {len(settings)} settings x {args.seeds} seeds of {args.model} on {source}, "
          f"up to {base.rounds} rounds", flush=True)
    runs = run_tree_settings(base, settings, args.out, seeds=args.seeds, progress=True)
    summary = summarise_trees(runs)
    context = {"model": args.model, "dataset": source, "rounds": base.rounds, "eval_every": base.eval_every,
               "patience": base.patience, "learning_rate": base.learning_rate, "num_leaves": base.num_leaves,
               "seeds": f"{base.seed}-{base.seed + args.seeds - 1}",
               "epoch": f"one evaluation every {base.eval_every} rounds"}
    json_path, html_path = write_report(args.out, f"dropkit compare: {args.model} on {source}", runs, summary,
                                        context)
    print(format_tree_table(summary))
    for statement in summary["statements"]:
        print("-", statement)
    print(f"report: {html_path}  data: {json_path}")
    return 0


def _figure(row: dict, key: str, scale: float = 100, fmt: str = "{:.2f}") -> str:
    if row[key] is None:
        return "-"
    spread = row[f"{key}_spread"]
    return fmt.format(scale * row[key]) + ("" if spread is None else f"±{scale * spread:.2f}")


def format_tree_table(summary: dict) -> str:
    """Per-setting means ± spread over seeds as an aligned text table."""
    header = (f"{'setting':<12}{'train acc':>14}{'val acc':>14}{'test acc':>14}{'gap':>14}{'rounds':>9}"
              f"{'fit s':>14}")
    lines = [header, "-" * len(header)]
    for row in summary["settings"]:
        lines.append(f"{row['label']:<12}{_figure(row, 'train_acc'):>14}{_figure(row, 'val_acc'):>14}"
                     f"{_figure(row, 'test_acc'):>14}{_figure(row, 'gap', fmt='{:+.2f}'):>14}"
                     f"{row['rounds_trained']:>9.0f}{_figure(row, 'fit_seconds', 1, '{:.1f}'):>14}")
    return "\n".join(lines)


def run_sweep(args: argparse.Namespace) -> int:
    """``dropkit sweep --model gbdt``: search DART's drop rate, print every trial and the best."""
    from dropkit.lab.tree_sweep import SUMMARY_FILE, TreeSweepConfig, run_tree_sweep

    for flag, used in (("--workers", args.workers != 1), ("--storage", args.storage is not None),
                       ("--search-lr", args.search_lr), ("--search-weight-decay", args.search_weight_decay)):
        if used:
            raise ValueError(f"{flag} applies to network sweeps, not to --model {args.model}")
    cfg = TreeSweepConfig(base=tree_config_from_args(args), out_dir=args.out, trials=args.trials,
                          pruner=args.pruner, rate_range=tuple(args.p_range), rate_step=args.p_step or None)
    cfg.validate()
    if cfg.pruner == "promote":
        print("tree models cannot pause and resume a trial: pruner promote runs as halving (the same rungs)")
    low, high, step = cfg.lattice()
    print(f"dropkit sweep: DART drop rate in [{low:g}, {high:g}]" + (f" step {step:g}" if step else "")
          + f", {cfg.trials} trials of up to {cfg.base.rounds} rounds", flush=True)
    summary = run_tree_sweep(cfg)
    print(f"{'trial':>5} {'drop rate':>10} {'state':>9} {'val acc':>8} {'test acc':>9} {'evaluations':>12}")
    for t in summary["trials"]:
        val = "-" if t["val_acc"] is None else f"{100 * t['val_acc']:.2f}"
        test = "-" if t["test_acc"] is None else f"{100 * t['test_acc']:.2f}"
        print(f"{t['trial']:>5} {t['drop_rate']:>10.3g} {t['state']:>9} {val:>8} {test:>9} {t['evaluations']:>12}")
    best = summary["best"]
    if best is not None:
        print(f"best on validation: trial {best['trial']} (drop rate {best['drop_rate']:g}): validation accuracy "
              f"{100 * best['val_acc']:.2f}%, test accuracy {100 * best['test_acc']:.2f}%")
    print(f"data: {args.out / SUMMARY_FILE}")
    return 0
