"""``dropkit sweep``: search a model's dropout rates (and optionally lr, weight decay) with Optuna.

    dropkit sweep --model srivastava_mlp --trials 12 --epochs 9 --out runs/sweep
    dropkit sweep ... --workers 2                    # two local processes on one study
    dropkit sweep ... --nproc 2                      # every trial a data-parallel run of 2 processes
    dropkit sweep ... --storage postgresql://host/db  # one study shared by several machines
    dropkit sweep ... --pruner halving               # Optuna's stopping-based halving instead of promote

Running the same command again continues the study; see :mod:`dropkit.lab.sweep` for how trials are
trained, pruned, counted and recovered.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import optuna

from dropkit.lab import run_lock
from dropkit.lab.commands.options import add_run_options, config_from_args, description, float_in, int_at_least
from dropkit.lab.commands.trees import add_tree_options, run_sweep as run_tree_sweep
from dropkit.lab.storage import DEFAULT_TIMEOUT, StorageUnreachable
from dropkit.lab.sweep import PLOT_FILE, PRUNERS, SUMMARY_FILE, DataParallelTrain, SweepConfig, format_table, run_sweep
from dropkit.lab.train import train
from dropkit.lab.trees import TREE_MODELS

DEFAULT_LR_RANGE = (1e-4, 1e-1)
DEFAULT_WEIGHT_DECAY_RANGE = (1e-6, 1e-2)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``dropkit sweep`` and its arguments."""
    parser = subparsers.add_parser(
        "sweep", help="search dropout rates with Optuna (pruned, resumable, parallel)",
        description=description(__doc__),
    )
    search = parser.add_argument_group("search")
    search.add_argument("--trials", type=int_at_least(1), default=20,
                        help="finished trials (complete or pruned) the study should hold; with --pruner promote, "
                             "configurations to sample (default %(default)s)")
    search.add_argument("--p-range", type=float_in(0, 1, high_open=True), nargs=2, default=(0.0, 0.8),
                        metavar=("LOW", "HIGH"),
                        help="range of every searched dropout rate, 0 <= LOW < HIGH < 1 (default 0 0.8); "
                             "a rate given with --model-arg stays fixed")
    search.add_argument("--p-step", type=float_in(0, 1, high_open=True), default=0.05,
                        help="search the dropout rates on a lattice of this step, from LOW up to HIGH "
                             "(default %(default)s); 0 searches them continuously")
    search.add_argument("--search-lr", action="store_true", help="also search the learning rate (log-uniform)")
    search.add_argument("--lr-range", type=float_in(0, math.inf, low_open=True, high_open=True), nargs=2,
                        metavar=("LOW", "HIGH"),
                        help="range for --search-lr (default {:g} {:g})".format(*DEFAULT_LR_RANGE))
    search.add_argument("--search-weight-decay", action="store_true",
                        help="also search the weight decay (log-uniform)")
    search.add_argument("--weight-decay-range", type=float_in(0, math.inf, low_open=True, high_open=True), nargs=2,
                        metavar=("LOW", "HIGH"),
                        help="range for --search-weight-decay (default {:g} {:g})".format(*DEFAULT_WEIGHT_DECAY_RANGE))
    search.add_argument("--pruner", choices=PRUNERS, default="promote",
                        help="halving, median: stop poor trials early on validation accuracy per epoch; promote: "
                             "train configurations rung by rung (1, 3, 9, ... epochs) and take only the best "
                             "third of a rung further (promotion-based asynchronous successive halving); "
                             "none: train every trial in full (default %(default)s)")
    study = parser.add_argument_group("study")
    study.add_argument("--out", type=Path, default=Path("runs/sweep"),
                       help="sweep folder: study journal, trials/, sweep.json, sweep.png (default %(default)s)")
    study.add_argument("--study", default="sweep", help="study name; the same name continues it (default %(default)s)")
    study.add_argument("--storage", default=None, metavar="URL",
                       help="Optuna storage URL shared by several machines, e.g. postgresql://user@host/db "
                            "(default: a journal file in --out)")
    study.add_argument("--nproc", type=int_at_least(1), default=1,
                       help="train every trial as a data-parallel run of this many local processes "
                            "(torch.distributed; with --workers W, W x NPROC processes in all)")
    study.add_argument("--workers", type=int_at_least(1), default=1,
                       help="local worker processes on the study (default %(default)s)")
    study.add_argument("--stale-after", type=float_in(0, math.inf, low_open=True, high_open=True), default=120.0,
                       metavar="SECONDS", help="a trial of another machine whose heartbeat is older than this is "
                                               "taken as dead and retried (default %(default)g)")
    study.add_argument("--storage-timeout", type=float_in(0, math.inf, low_open=True, high_open=True),
                       default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="how long a worker retries a --storage it cannot reach (a server restarting, a network "
                            "down) before it fails with an error naming it (default %(default)g)")
    add_run_options(parser, extra_models=TREE_MODELS)
    add_tree_options(parser, seeds=False)
    parser.set_defaults(func=run)


def _range(args: argparse.Namespace, flag: str, default: tuple[float, float]) -> tuple[float, float] | None:
    """The range of an optional search: the default when ``--search-X`` is given alone, None without it."""
    given = getattr(args, f"{flag}_range")
    if not getattr(args, f"search_{flag}"):
        if given is not None:
            dashed = flag.replace("_", "-")
            raise ValueError(f"--{dashed}-range is used only with --search-{dashed}")
        return None
    return tuple(given) if given is not None else default


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """The validated :class:`SweepConfig` the flags describe."""
    cfg = SweepConfig(
        base=config_from_args(args), out_dir=args.out, trials=args.trials, workers=args.workers, pruner=args.pruner,
        storage=args.storage, study_name=args.study, p_range=tuple(args.p_range),
        p_step=args.p_step or None,
        lr_range=_range(args, "lr", DEFAULT_LR_RANGE),
        weight_decay_range=_range(args, "weight_decay", DEFAULT_WEIGHT_DECAY_RANGE),
        stale_after=args.stale_after, storage_timeout=args.storage_timeout,
    )
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run the sweep, print the table and the winner; exit 1 while the study is incomplete."""
    if args.model in TREE_MODELS:
        return run_tree_sweep(args)
    cfg = sweep_config(args)
    run_lock.prepare_folder(cfg.out_dir)
    if cfg.workers > 1 and (cfg.storage or "").startswith("sqlite"):
        print("warning: SQLite is unreliable with several writers (optuna#4002); "
              "the default journal file is the safe local choice", flush=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = cfg.base
    unit = "configurations" if cfg.pruner == "promote" else "trials"
    print(f"dropkit sweep: {base.model} on {base.dataset}, {cfg.trials} {unit} of up to {base.epochs} epochs, "
          f"pruner {cfg.pruner}, {cfg.workers} worker(s)" + (f" of {args.nproc} processes" if args.nproc > 1 else ""),
          flush=True)
    try:
        summary = run_sweep(cfg, DataParallelTrain(args.nproc) if args.nproc > 1 else train)
    except StorageUnreachable as err:
        print(f"dropkit sweep: {err}; run the same command again to continue the study", file=sys.stderr)
        return 1
    print(format_table(summary))
    epochs = summary["epochs"]
    if epochs["full_grid"]:
        print(f"epochs trained: {epochs['spent']} ({100 * epochs['fraction_of_full_grid']:.0f}% of the "
              f"{epochs['full_grid']} that {epochs['full_grid'] // epochs['per_full_run']} unpruned runs would take)")
    best = summary["best"]
    if not summary["complete"]:
        done = (f"{summary['configurations']['started']}/{cfg.trials} configurations started"
                if cfg.pruner == "promote" else f"{summary['trials_finished']}/{cfg.trials} trials finished")
        print(f"study incomplete: {done}; run the same command again to continue it")
        return 1
    if best is not None:
        params = ", ".join(f"{k}={v:.4g}" for k, v in best["params"].items())
        print(f"best on validation: trial {best['trial']} ({params}): "
              f"validation accuracy {100 * best['val_acc']:.2f}%, test accuracy {100 * best['test_acc']:.2f}% "
              f"(the only test figure this sweep reads)")
    print(f"data: {cfg.out_dir / SUMMARY_FILE}  plot: {cfg.out_dir / PLOT_FILE}")
    return 0
