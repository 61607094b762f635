"""Gather the ``uncertainty.json`` of several runs (written by ``dropkit uncertainty``) into one result file.

    python benchmarks/mc_uncertainty_collect.py runs/mlp_s0/p=0.5 runs/mlp_s1/p=0.5 \\
        --command "dropkit uncertainty RUN --samples 100 --ood fashion-mnist" \\
        > benchmarks/results/mc_uncertainty_mnist.json

Each entry keeps the run's training config (from ``config.json`` in the folder, or in the one above
for figures written to a subfolder with ``--out``) and the uncertainty figures (without the
per-bin reliability data).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding uncertainty.json")
    parser.add_argument("--command", action="append", default=[], help="a command that made the figures")
    parser.add_argument("--machine", default=None, help="the machine, in words")
    args = parser.parse_args()
    entries = []
    for run in args.runs:
        path = run / "uncertainty.json"
        # figures written elsewhere (dropkit uncertainty --out RUN/NAME) take the run's config from above
        config_path = run / "config.json" if (run / "config.json").is_file() else run.parent / "config.json"
        try:
            figures = json.loads(path.read_text())
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            parser.error(f"{path}: {err}")
        figures.pop("reliability", None)
        entries.append({"config": config, "uncertainty": figures})
    print(json.dumps({
        "recorded": {"machine": args.machine, "commands": args.command},
        "environment": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                        "load_average_1min": round(os.getloadavg()[0], 2)},
        "runs": entries,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
