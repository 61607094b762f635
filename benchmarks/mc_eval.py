"""Test accuracy of trained runs with weight-scaling inference against Monte Carlo dropout averaging.

Srivastava et al. 2014 (JMLR 15, sec. 7.5, Figure 11) compare the two ways a dropout net can
predict: one pass with every unit on (the "weight scaling" rule; with inverted dropout, simply eval
mode), or the mean of the softmax outputs of T passes with dropout on. On MNIST they found the MC
average as good as weight scaling from about T = 50 and slightly better beyond. This script asks
the same of dropkit's own runs: for each run folder (as written by ``dropkit train`` or
``benchmarks/reference_runs.py``) it rebuilds the model from ``config.json``, loads the last
checkpoint (``weights_only=True``), and scores the test set both ways. Prints one JSON line per run.

    python benchmarks/mc_eval.py runs/reference/srivastava_dropout_maxnorm --samples 10 50 100 200

Not a test: T passes over the test set take T times an evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import dropkit
from dropkit.convert import fuse_relu_dropout
from dropkit.mc import mc_samples
from dropkit.lab.models import build_model
from dropkit.lab.train import CHECKPOINT, TrainConfig, evaluate, load_splits, model_p

CHUNK = 2000


def load_run(folder: Path) -> tuple[TrainConfig, torch.nn.Module, int]:
    """The run's config, its model with the checkpoint's weights (in eval mode) and its epochs done."""
    config = TrainConfig(**json.loads((folder / "config.json").read_text()))
    model = build_model(config.model, model_p(config), **config.model_kwargs)
    if config.rate != "concrete":
        fuse_relu_dropout(model)  # as train() does; state_dict keys are unchanged by it
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    model.load_state_dict(state["model"])
    return config, model.eval(), state["epoch"]


def mc_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, samples: list[int],
                seed: int) -> dict[int, float]:
    """Test accuracy of the mean softmax over the first T passes, for every T in ``samples``."""
    dropkit.manual_seed(seed)
    most = max(samples)
    correct = dict.fromkeys(samples, 0)
    for start in range(0, len(labels), CHUNK):
        x, y = images[start:start + CHUNK], labels[start:start + CHUNK]
        probs = mc_samples(model, x, most).softmax(-1).cumsum(0)  # running sums over the passes
        for t in samples:
            correct[t] += int((probs[t - 1].argmax(1) == y).sum())
    return {t: correct[t] / len(labels) for t in samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding config.json and checkpoint.pt")
    parser.add_argument("--samples", type=int, nargs="+", default=[10, 50, 100], help="numbers of MC passes T")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MC passes' masks")
    args = parser.parse_args()
    if min(args.samples) < 1:
        parser.error(f"--samples must be >= 1, got {min(args.samples)}")
    for folder in args.runs:
        if not (folder / CHECKPOINT).is_file():
            parser.error(f"{folder}: no {CHECKPOINT} (is it a run folder?)")
        config, model, epochs = load_run(folder)
        _, _, test = load_splits(config.dataset, config.data_dir, config.val_size, config.limit_train,
                                 config.limit_test, config.inputs)
        _, weight_scaling = evaluate(model, test)
        mc = mc_accuracy(model, test.images, test.labels, sorted(set(args.samples)), args.seed)
        print(json.dumps({"run": str(folder), "epochs": epochs, "test_examples": len(test),
                          "weight_scaling_acc": weight_scaling, "mc_acc": {str(t): acc for t, acc in mc.items()},
                          "mc_seed": args.seed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
