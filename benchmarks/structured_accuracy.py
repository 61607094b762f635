"""Accuracy and wall-clock of structured dropout against standard dropout on MNIST-style datasets.

The MLP 784-1024-1024-10 with dropout p=0.5 after each hidden ReLU is trained with SGD + Nesterov
momentum (lr 0.05, momentum 0.9), batch 128, for 8 epochs, as standard dropout (``nn.Dropout``)
and as :class:`dropkit.structured.StructuredLinearStack` with each ``--groups`` value, all from
the same initial weights and on the same batches. ``--schedule cosine`` anneals the learning rate
to 0 over the run, step by step: the final figures then no longer swing with the last few batches
(at a constant rate the test accuracy of one run moves by about 0.5 points from one evaluation to
the next on Fashion-MNIST), so that a difference of 0.2 points between variants can be read.
``--structured-epochs`` lets the structured variants train longer than standard dropout, for the
wall-clock question (how soon a structured run reaches standard dropout's final accuracy), which
does not ask for equal epochs.

The variants train in lockstep: one step of each in turn, each step timed on its own. On a shared
machine a burst of load from other processes then slows every variant alike, and the comparison
of their training times stays fair. Training time counts the steps only (forward, backward,
optimizer); the test set is evaluated ``--evals-per-epoch`` times per epoch outside the clock.

Printed as JSON: for every run the test accuracy at each evaluation with the training seconds
spent so far and the mean training-mode loss of the batches since the previous evaluation (for
structured variants the loss under their own group masks), and per dataset and variant the mean
final accuracy and the time to reach the standard-dropout run's final accuracy (same seed),
against the time standard dropout took.

    python benchmarks/structured_accuracy.py --datasets mnist fashion-mnist --seeds 0 1 2 --groups 4
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit.lab.bench import emit_json
from dropkit.lab.data import BatchIterator, load_dataset, normalise
from dropkit.structured import from_sequential

EVAL_CHUNK = 2000


def flat_splits(dataset: str) -> tuple:
    """The dataset's normalised train and test splits with each image flattened to one row."""
    ds = load_dataset(dataset)
    train, test = normalise(ds.train, ds.test)
    return tuple(type(s)(s.images.reshape(len(s), -1).contiguous(), s.labels) for s in (train, test))


def standard_mlp(width: int, p: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Dropout(p),
                         nn.Linear(width, width), nn.ReLU(), nn.Dropout(p), nn.Linear(width, 10))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(images[i : i + EVAL_CHUNK]).argmax(1) == labels[i : i + EVAL_CHUNK]).sum())
                  for i in range(0, len(labels), EVAL_CHUNK))
    model.train()
    return 100.0 * correct / len(labels)


def train_lockstep(models: dict[str, nn.Module], data, args: argparse.Namespace, seed: int) -> dict[str, list]:
    """Train every model on the same batches, one step each in turn; returns each one's trajectory.

    Standard dropout trains ``--epochs`` epochs, the structured variants ``--structured-epochs``
    (each with its own learning-rate schedule over its own length); a model that is done sits out.
    """
    train, test = data
    opts = {name: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True)
            for name, m in models.items()}
    clock = dict.fromkeys(models, 0.0)
    losses: dict[str, list[float]] = {name: [] for name in models}  # batch losses since the last evaluation
    curve: dict[str, list] = {name: [] for name in models}
    batches = BatchIterator(train, args.batch, generator=torch.Generator().manual_seed(seed))
    epochs = {name: args.epochs if name == "standard" else args.structured_epochs or args.epochs for name in models}

    def lr_factor(name: str, done: int) -> float:
        if args.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * done / (epochs[name] * len(batches))))

    done = 0
    steps_per_eval = max(1, len(batches) // args.evals_per_epoch)
    for epoch in range(max(epochs.values())):
        active = {name: model for name, model in models.items() if epoch < epochs[name]}
        for step, (x, y) in enumerate(batches, 1):
            for name in active:
                opts[name].param_groups[0]["lr"] = args.lr * lr_factor(name, done)
            done += 1
            for name, model in active.items():
                start = time.perf_counter()
                opts[name].zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opts[name].step()
                clock[name] += time.perf_counter() - start
                losses[name].append(loss.item())
            if step % steps_per_eval == 0 or step == len(batches):
                for name, model in active.items():
                    acc = accuracy(model, test.images, test.labels)
                    curve[name].append({"epoch": round(epoch + step / len(batches), 3),
                                        "train_s": round(clock[name], 2), "test_acc": round(acc, 2),
                                        "train_loss": round(statistics.mean(losses[name]), 4)})
                    losses[name].clear()
        print(f"  epoch {epoch + 1}: " + ", ".join(f"{n} {curve[n][-1]['test_acc']:.2f}% {curve[n][-1]['train_s']:.0f}s"
                                                  for n in active), file=sys.stderr, flush=True)
    return curve


def time_to(curve: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation reaching ``target`` accuracy (None if never)."""
    return next((point["train_s"] for point in curve if point["test_acc"] >= target), None)


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        per_seed = [r for r in runs if r["dataset"] == dataset]
        for name in per_seed[0]["curves"]:
            finals, totals, speedups, speedups_first = [], [], [], []
            for run in per_seed:
                std, mine = run["curves"]["standard"], run["curves"][name]
                finals.append(mine[-1]["test_acc"])
                totals.append(mine[-1]["train_s"])
                reached = time_to(mine, std[-1]["test_acc"])
                speedups.append(std[-1]["train_s"] / reached if reached else None)
                first = time_to(std, std[-1]["test_acc"])
                speedups_first.append(first / reached if reached else None)
            rows.append({
                "dataset": dataset, "variant": name, "seeds": len(per_seed),
                "final_acc": finals, "final_acc_mean": round(statistics.mean(finals), 3),
                "train_s_mean": round(statistics.mean(totals), 1),
                "speedup_to_standard_final_acc": speedups,
                "speedup_vs_standard_first_reach": speedups_first,
            })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--groups", type=int, nargs="+", default=[4], help="structured variants to train")
    parser.add_argument("--block-size", type=int, default=1)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--structured-epochs", type=int, default=0,
                        help="epochs of the structured variants (0: --epochs); standard dropout trains --epochs")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                        help="learning rate: constant, or cosine-annealed to 0 over the run, per step")
    parser.add_argument("--evals-per-epoch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = []
    for dataset in args.datasets:
        data = flat_splits(dataset)
        for seed in args.seeds:
            print(f"{dataset} seed {seed}", file=sys.stderr, flush=True)
            dropkit.manual_seed(seed)
            models: dict[str, nn.Module] = {"standard": standard_mlp(args.width, args.p)}
            for g in args.groups:
                twin = copy.deepcopy(models["standard"])
                models[f"structured_G{g}"] = from_sequential(twin, groups=g, block_size=args.block_size,
                                                             seed=seed * 1000 + g)
            curves = train_lockstep(models, data, args, seed)
            runs.append({"dataset": dataset, "seed": seed, "curves": curves})
    report = {
        "benchmark": "structured vs standard dropout, MLP 784-W-W-10, SGD+Nesterov",
        "settings": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "summary": summarise(runs), "runs": runs,
    }
    return emit_json(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
