"""Reference run: dropout in tree ensembles against dropout in a network, on the same images.

Per dataset, plain gradient boosting, DART at three drop rates and a random forest
(:mod:`dropkit.lab.trees`, compared by :func:`dropkit.lab.tree_compare.summarise_trees`), then the
lab's tutorial MLP without and with dropout (:func:`dropkit.lab.train.train`), all with the same
training subsample, validation and test examples and the same seeds. Writes one JSON file with
every run's figures, the statements, the command and the machine's load. Not a test: about half
an hour on 2 shared cores with the defaults.

    OMP_NUM_THREADS=1 python benchmarks/trees_reference.py --out runs/trees_reference \\
        --result benchmarks/results/trees_dart_reference.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import lightgbm
import torch

from dropkit.lab.train import TrainConfig, train
from dropkit.lab.tree_compare import summarise_trees
from dropkit.lab.trees import TreeConfig, run_tree_settings, tree_settings

TREE_SETTINGS = ["none", "dart:0.05", "dart:0.1", "dart:0.3", "rf"]
MLP_RATES = (0.0, 0.5)


def _mlp(dataset: str, p: float, seeds: list[int], args: argparse.Namespace, out: Path) -> dict:
    finals = []
    for seed in seeds:
        config = TrainConfig(model="tutorial_mlp", p=p, epochs=args.mlp_epochs, seed=seed, dataset=dataset,
                             val_size=args.val_size, limit_train=args.limit_train, limit_test=args.limit_test)
        result = train(config, out / f"mlp_p{p:g}" / f"seed={seed}", quiet=True)
        summary = result.summary()
        finals.append({**summary["final"], "seconds": summary["seconds_per_epoch"] * summary["epochs"]})
    row = {"label": f"mlp p={p:g}", "seeds": seeds, "epochs": args.mlp_epochs}
    for key in ("train_eval_acc", "val_acc", "test_acc", "gap", "seconds"):
        values = [f[key] for f in finals]
        row[key], row[f"{key}_spread"], row[f"{key}_values"] = (statistics.fmean(values), statistics.stdev(values)
                                                                 if len(values) > 1 else None, values)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["fashion-mnist", "mnist"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=5000)
    parser.add_argument("--limit-test", type=int, default=5000)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--num-leaves", type=int, default=15)
    parser.add_argument("--mlp-epochs", type=int, default=20)
    parser.add_argument("--out", default="runs/trees_reference")
    parser.add_argument("--result", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    data = {
        "what": "gradient boosting, DART, random forest and an MLP with dropout on the same image subsample",
        "command": "OMP_NUM_THREADS=1 python benchmarks/trees_reference.py " + " ".join(argv or sys.argv[1:]),
        "environment": {"processor": platform.processor() or platform.machine(), "threads": 1,
                        "lightgbm": lightgbm.__version__, "torch": torch.__version__,
                        "load_average_1min": round(os.getloadavg()[0], 2),
                        "note": "machine shared with other jobs; times are comparable within one dataset only"},
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "result")},
        "datasets": {},
    }
    for dataset in args.datasets:
        start = time.perf_counter()
        base = TreeConfig(rounds=args.rounds, num_leaves=args.num_leaves, dataset=dataset, val_size=args.val_size,
                          limit_train=args.limit_train, limit_test=args.limit_test)
        runs = run_tree_settings(base, tree_settings(TREE_SETTINGS), Path(args.out) / dataset, seeds=args.seeds,
                                 progress=True)
        summary = summarise_trees(runs)
        mlp = [_mlp(dataset, p, seeds, args, Path(args.out) / dataset) for p in MLP_RATES]
        keep = ("label", "boosting", "rate", "seeds")
        rows = [{k: v for k, v in row.items() if k in keep or k.split("_values")[0].split("_spread")[0] in
                 ("train_acc", "val_acc", "test_acc", "gap", "fit_seconds", "rounds_trained", "best_round")}
                for row in summary["settings"]]
        data["datasets"][dataset] = {"trees": rows, "baseline": summary["baseline"],
                                     "statements": summary["statements"], "mlp": mlp,
                                     "tree_config": base.to_dict(), "wall_seconds": round(time.perf_counter() - start)}
        data["environment"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
        text = json.dumps(data, indent=1)
        if args.result:
            Path(args.result).write_text(text + "\n")
        print(json.dumps({"dataset": dataset, "statements": summary["statements"]}), flush=True)
    if not args.result:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
