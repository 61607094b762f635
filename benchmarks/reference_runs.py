"""Reference training runs: published anchors against dropkit's models.

The tutorial MLP's anchors are checked by ``dropkit compare --p 0 0.1 0.2 0.5`` instead, whose
report is the point of that row. Each run here is a :func:`dropkit.lab.train.train` call written under ``--out/<name>/`` with a checkpoint
per epoch, so a killed script picks up where it stopped (``train(..., resume=True)``). Prints one
JSON line per finished run (name, target, final and best-validation figures, seconds) and writes
``summary.json``. Not a test: these take minutes to tens of minutes each on 2 cores.

    python benchmarks/reference_runs.py --only tutorial fashion_mlp --out runs/reference
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from dropkit.lab.train import TrainConfig, train

#: the Srivastava MLP recipe of the MNIST rows (dropout 0.2 / 0.5 + max-norm) and its no-dropout twin
SRIVASTAVA = TrainConfig(model="srivastava_mlp", optimizer="nesterov", lr=0.05, momentum=0.9, max_norm=3.0,
                         schedule="cosine", epochs=150)
SRIVASTAVA_PLAIN = replace(SRIVASTAVA, p=0.0, model_kwargs={"p_input": 0.0}, max_norm=None)

#: name -> (config, the target or anchor it is judged against)
RUNS: dict[str, tuple[TrainConfig, str]] = {
    "srivastava_dropout_maxnorm": (SRIVASTAVA, "<= 1.06 % error (Srivastava et al. 2014, Table 2)"),
    "srivastava_no_dropout": (SRIVASTAVA_PLAIN, ">= 0.25 points worse than dropout + max-norm at equal epochs"),
    "srivastava_dropout_maxnorm_300": (
        replace(SRIVASTAVA, epochs=300),
        "<= 1.06 % error in <= 90 min: the same recipe with the cosine schedule stretched to 300 epochs"),
    "srivastava_no_dropout_300": (
        replace(SRIVASTAVA_PLAIN, epochs=300), ">= 0.25 points worse than srivastava_dropout_maxnorm_300"),
    "srivastava_unit_ramp_lr05": (
        replace(SRIVASTAVA, inputs="unit", momentum=0.95, momentum_start=0.5, momentum_ramp=10, max_norm=3.5),
        "<= 1.06 % error in <= 90 min: pixels in [0, 1], momentum 0.5 -> 0.95 over 10 epochs, max-norm 3.5"),
    "srivastava_unit_ramp_lr1": (
        replace(SRIVASTAVA, inputs="unit", lr=0.1, momentum=0.95, momentum_start=0.5, momentum_ramp=10,
                max_norm=3.5),
        "<= 1.06 % error in <= 90 min: as srivastava_unit_ramp_lr05 with twice the learning rate"),
    "srivastava_maxnorm2": (
        replace(SRIVASTAVA, max_norm=2.0),
        "<= 1.06 % error in <= 90 min: the base recipe with max-norm c = 2, the paper's appendix B.1 value"),
    "srivastava_maxnorm2_60k": (
        replace(SRIVASTAVA, max_norm=2.0, val_size=0),
        "<= 1.06 % error in <= 90 min: srivastava_maxnorm2 fitted on all 60,000 training examples"),
    "srivastava_dropout_maxnorm_60k": (
        replace(SRIVASTAVA, val_size=0), "<= 1.06 % error: the same run fitted on all 60,000 training examples"),
    "srivastava_no_dropout_60k": (
        replace(SRIVASTAVA_PLAIN, val_size=0), ">= 0.25 points worse than srivastava_dropout_maxnorm_60k"),
    "srivastava_swa": (
        replace(SRIVASTAVA, average_from=101),
        "<= 1.06 % error in <= 90 min: the base recipe, scored on the average of its last 50 epochs' weights"),
    "srivastava_swa_high_lr": (
        replace(SRIVASTAVA, planned_epochs=225, average_from=76),
        "<= 1.06 % error in <= 90 min: the cosine of a 225-epoch run stopped at 150 (lr 0.05 -> 0.013), "
        "scored on the average of its last 75 epochs' weights"),
    "srivastava_batch64": (
        replace(SRIVASTAVA, batch_size=64),
        "<= 1.06 % error in <= 90 min: the base recipe with batches of 64, twice the updates per epoch"),
    "srivastava_no_dropout_batch64": (
        replace(SRIVASTAVA_PLAIN, batch_size=64), "the no-dropout twin of srivastava_batch64, at equal epochs"),
    "fashion_mlp": (
        TrainConfig(model="srivastava_mlp", dataset="fashion-mnist", optimizer="nesterov", lr=0.05, momentum=0.9,
                    max_norm=3.0, schedule="cosine", epochs=30),
        ">= 90.5 % (anchor 90.0 %, MLP 256-128-64)"),
    "fashion_mlp_light": (
        TrainConfig(model="srivastava_mlp", dataset="fashion-mnist", p=0.3, model_kwargs={"p_input": 0.1},
                    optimizer="nesterov", lr=0.05, momentum=0.9, max_norm=3.0, schedule="cosine", epochs=60),
        ">= 90.5 % (fashion_mlp with lighter dropout, input 0.1 and hidden 0.3, for 60 epochs)"),
    "fashion_cnn": (
        TrainConfig(model="cnn", dataset="fashion-mnist", optimizer="adam", lr=1e-3, schedule="cosine", epochs=15),
        ">= 93.0 % (anchor 92.6 %, 3 conv + 2 FC + dropout)"),
    "fashion_cnn_batchnorm": (
        TrainConfig(model="cnn", model_kwargs={"batchnorm": True}, dataset="fashion-mnist", optimizer="adam",
                    lr=1e-3, schedule="cosine", epochs=15),
        ">= 93.0 % (anchor 92.6 %, 3 conv + 2 FC + dropout)"),
    "mnist_lstm": (
        TrainConfig(model="lstm", optimizer="adam", lr=2e-3, schedule="cosine", epochs=10), ">= 98.5 %"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", type=Path, default=Path("runs/reference"))
    parser.add_argument("--seed", type=int, default=None,
                        help="run with this seed instead of each config's own (0); names get a -seedN suffix")
    args = parser.parse_args()
    summary_path = args.out / "summary.json"
    for name in args.only:
        config, target = RUNS[name]
        if args.seed is not None:
            config, name = replace(config, seed=args.seed), f"{name}-seed{args.seed}"
        start = time.perf_counter()
        result = train(config, args.out / name, resume=True, quiet=True)
        best = result.best_val or {}  # runs fitted on all training examples have no validation set
        record = {
            "name": name, "target": target, "model": config.model, "dataset": config.dataset, "seed": config.seed,
            "epochs": len(result.history), "final_test_acc": result.final["test_acc"],
            "final_train_acc": result.final["train_acc"], "best_val_epoch": best.get("epoch"),
            "best_val_acc": best.get("val_acc"), "test_acc_at_best_val": best.get("test_acc"),
            "seconds_this_call": round(time.perf_counter() - start, 1),
            "seconds_per_epoch": result.summary()["seconds_per_epoch"],
            "final_avg_test_acc": result.final.get("avg_test_acc"),
        }
        # read just before writing: other runs of this script may share the folder
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary[name] = record
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
