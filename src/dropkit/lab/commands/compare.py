"""``dropkit compare``: one model, data and seed under several settings, and a report of what changed."""

from __future__ import annotations

import argparse

from dropkit.lab.commands.options import add_run_options, config_from_args, float_in, int_at_least
from dropkit.lab.compare import REGULARISERS, p_settings, reg_settings, run_settings, summarise
from dropkit.lab.report import write_report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="train under several dropout rates or regularisers and write a report",
        description="Examples: dropkit compare --p 0 0.2 0.5 0.8 --out runs/p;  "
                    "dropkit compare --model srivastava_mlp --reg none l2 maxnorm dropout dropout+maxnorm",
    )
    settings = parser.add_mutually_exclusive_group(required=True)
    settings.add_argument("--p", type=float_in(0, 1), nargs="+", help="main dropout rates to compare, each in [0, 1]")
    settings.add_argument("--reg", nargs="+", choices=REGULARISERS, help="regularisers to compare")
    parser.add_argument("--dropout-p", type=float, default=0.5, help="main rate of the --reg dropout settings")
    parser.add_argument("--l2", type=float, default=5e-4, help="weight decay of the --reg l2 setting")
    parser.add_argument("--max-norm-c", type=float, default=3.0, help="max-norm bound of the --reg maxnorm settings")
    parser.add_argument("--out", default="runs/compare", help="folder for the runs and report.html/report.json")
    parser.add_argument("--resume", action="store_true", help="continue a killed comparison from its checkpoints")
    parser.add_argument("--nproc", type=int_at_least(1), default=1,
                        help="data-parallel worker processes per run (torch.distributed, gloo on CPU)")
    add_run_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    base = config_from_args(args)
    if args.p is not None:
        settings = p_settings(args.p)
    else:
        settings = reg_settings(args.model, args.reg, p=args.dropout_p, l2=args.l2, max_norm=args.max_norm_c)
    print(f"dropkit compare: {len(settings)} settings x {base.epochs} epochs of {base.model} on {base.dataset}")
    runs = run_settings(base, settings, args.out, resume=args.resume, nproc=args.nproc)
    summary = summarise(runs)
    context = {"model": base.model, "dataset": base.dataset, "epochs": base.epochs, "optimizer": base.optimizer,
               "lr": base.lr, "batch_size": base.batch_size, "seed": base.seed}
    json_path, html_path = write_report(args.out, f"dropkit compare: {base.model} on {base.dataset}", runs,
                                        summary, context)
    print(format_table(summary))
    for statement in summary["statements"]:
        print("-", statement)
    print(f"report: {html_path}  data: {json_path}")
    return 0


def format_table(summary: dict) -> str:
    """The per-setting figures as an aligned text table."""
    header = (f"{'setting':<18}{'train acc':>10}{'train eval':>11}{'val acc':>9}{'test acc':>10}{'gap':>8}"
              f"{'s/epoch':>9}{'saved MiB':>11}")
    lines = [header, "-" * len(header)]
    for row in summary["settings"]:
        val = f"{100 * row['val_acc']:.2f}" if row["val_acc"] is not None else "-"
        lines.append(f"{row['label']:<18}{100 * row['train_acc']:>10.2f}{100 * row['train_eval_acc']:>11.2f}"
                     f"{val:>9}{100 * row['test_acc']:>10.2f}"
                     f"{100 * row['gap']:>+8.2f}{row['seconds_per_epoch']:>9.2f}{row['saved_mib']:>11.2f}")
    return "\n".join(lines)
