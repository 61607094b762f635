"""Training throughput with 1 and N data-parallel processes at the same global batch (prints JSON).

Each configuration trains the same model on the same slice; the figure is training samples per
second over the epochs after the first (which pays for process start-up and kernel loading).
On a 2-core machine two processes of one thread each do the same arithmetic as one process of two
threads, plus the all-reduce: expect no speed-up there (ARCHITECTURE.md has the cost model).

    python benchmarks/ddp_throughput.py --model srivastava_mlp --nproc 1 2 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from dropkit.lab import distributed
from dropkit.lab.commands.train import train_runs
from dropkit.lab.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="srivastava_mlp")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit-train", type=int, default=20_000)
    args = parser.parse_args()
    config = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                         limit_train=args.limit_train, limit_test=1000, val_size=1000)
    results = []
    for nproc in args.nproc:
        if nproc == 1:
            runs = train_runs([config], None, False, True)
        else:
            runs = distributed.launch(nproc, train_runs, [config], None, False, True)
        rows = runs[0]["history"][1:]
        seconds = sum(row["seconds"] for row in rows)
        results.append({"nproc": nproc, "samples_per_s": args.limit_train * len(rows) / seconds,
                        "test_acc": runs[0]["final"]["test_acc"]})
    base = results[0]["samples_per_s"]
    for row in results:
        row["speedup_vs_first"] = row["samples_per_s"] / base
    print(json.dumps({"benchmark": "ddp_throughput", "model": args.model, "global_batch": args.batch_size,
                      "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "load_avg": os.getloadavg()[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
