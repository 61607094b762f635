"""``dropkit uncertainty``: how good a trained run's uncertainty is, deterministic against Monte Carlo dropout."""

from __future__ import annotations

import argparse
from pathlib import Path

from dropkit.lab.commands.options import int_at_least
from dropkit.lab.data import DATASETS
from dropkit.lab.uncertainty import evaluate_uncertainty, write_uncertainty
from dropkit.mc import DEFAULT_MEMORY_BUDGET
from dropkit.mc_metrics import DEFAULT_BINS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "uncertainty", help="score a trained run's calibration and OOD detection with and without MC dropout",
        description="Examples: dropkit uncertainty runs/mlp/p=0.5 --samples 100;  "
                    "dropkit uncertainty runs/mlp/p=0.5 --samples 30 --ood fashion-mnist",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder of dropkit train "
                        "(config.json, checkpoint.pt)")
    parser.add_argument("--samples", type=int_at_least(1), default=100, metavar="T",
                        help="Monte Carlo passes per input (default %(default)s)")
    ood = parser.add_mutually_exclusive_group()
    ood.add_argument("--ood", choices=DATASETS, default=None, help="out-of-distribution test set by name")
    ood.add_argument("--ood-dir", default=None, help="a folder of four IDX files to use as out-of-distribution data")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the passes (default %(default)s)")
    parser.add_argument("--bins", type=int_at_least(1), default=DEFAULT_BINS,
                        help="ECE and reliability bins (default %(default)s)")
    parser.add_argument("--memory-budget-mib", type=int_at_least(0), default=DEFAULT_MEMORY_BUDGET // 2**20,
                        help="MiB of layer outputs one batched forward may produce (default %(default)s)")
    parser.add_argument("--shared-masks", action="store_true",
                        help="one thinned network per pass for each chunk of inputs, the dropped units' work "
                             "skipped: faster on large MLPs, the same distribution per input (MLP runs only)")
    parser.add_argument("--limit", type=int_at_least(1), default=None, metavar="N",
                        help="score only the first N inputs of the test and out-of-distribution sets")
    parser.add_argument("--out", type=Path, default=None, help="folder for the results (default: RUN_DIR)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = evaluate_uncertainty(args.run_dir, args.samples, ood=args.ood, ood_dir=args.ood_dir, seed=args.seed,
                                  bins=args.bins, memory_budget=args.memory_budget_mib * 2**20, limit=args.limit,
                                  shared_masks=args.shared_masks)
    json_path, html_path = write_uncertainty(args.out or args.run_dir, result)
    print(f"{'':<16}{'accuracy':>10}{'NLL':>9}{'Brier':>9}{'ECE':>9}")
    rows = [("deterministic", result["deterministic"])] + [(f"MC T={t}", v) for t, v in result["levels"].items()]
    for name, v in rows:
        print(f"{name:<16}{100 * v['accuracy']:>9.2f}%{v['nll']:>9.4f}{v['brier']:>9.4f}{v['ece']:>9.4f}")
    if "ood" in result:
        for way in ("deterministic", "mc"):
            scores = ", ".join(f"{k} {v:.4f}" for k, v in result[way]["auroc"].items())
            print(f"OOD AUROC ({result['ood']['dataset']}), {way}: {scores}")
    print(f"data: {json_path}  report: {html_path}")
    return 0
