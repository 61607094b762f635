"""Time of T Monte Carlo dropout passes: batched sampling against sequential passes (and Baal).

The model is the lab's ``srivastava_mlp`` (784 - 3 x 1024 ReLU - 10, dropout 0.2 on the inputs and
0.5 on every hidden layer), or ``tutorial_mlp`` (784 - 128 - 10) with ``--model``, with random
weights (speed does not depend on them) on random inputs of each batch size. Variants, timed
round-robin by :func:`dropkit.lab.bench.median_times`, one process, one thread count:

* ``loop``: the plain loop users write, ``model(x)`` T times with the dropout layers in training mode;
* ``sequential``: :func:`dropkit.mc.mc_samples` with ``memory_budget=0`` (one pass per forward);
* ``batched``: :func:`dropkit.mc.mc_samples` with its default budget (the passes share forwards),
  called again on a shape it has seen, as when scoring a dataset batch after batch;
* ``batched_first_call``: the same on a shape it has not seen: one pass runs alone first to
  measure the memory a pass takes;
* ``thinned``: :func:`dropkit.mc.mc_samples` with ``shared_masks=True`` (one thinned network per
  pass for the whole batch, the dropped units' products skipped);
* ``baal``: Baal's ``ModelWrapper.predict_on_batch(x, iterations=T)`` (it replicates the batch
  in memory too, with one mask over the replicated batch) on the torch twin of the model, when
  ``baal`` is importable.

Each of ``--processes`` processes (default 3) times every variant; the step time of the thinned
passes in particular differs from process to process (by up to 1.6x at batch 256 on the 2-core
test machine, with the same code and inputs), so one process is not enough. Prints one JSON
object: per process and batch size the seconds per T passes of each variant and the ratios to
``sequential``; per batch size the median over the processes of both and the range of the
ratios; and the load average before and after (the machine may be shared).

    python benchmarks/mc_speed.py --samples 20 --batch 1 8 32 64 256 1024 > benchmarks/results/mc_speed.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys

import torch
from torch import nn

import dropkit
from dropkit import mc
from dropkit.convert import fuse_relu_dropout
from dropkit.lab.bench import median_times
from dropkit.lab.models import srivastava_mlp, tutorial_mlp

MODELS = {"srivastava_mlp": srivastava_mlp, "tutorial_mlp": tutorial_mlp}


def _torch_twin(model: nn.Module) -> nn.Module:
    """The same layers with torch's nn.Dropout in place of dropkit's (what Baal patches)."""
    return nn.Sequential(*[nn.Dropout(m.p) if isinstance(m, dropkit.nn.Dropout) else m for m in model])


def _baal_variant(model: nn.Module, samples: int):
    try:
        from baal.bayesian.dropout import patch_module
        from baal.modelwrapper import ModelWrapper
    except ImportError:
        return None
    patched = patch_module(_torch_twin(model), inplace=False).eval()
    try:
        from baal.modelwrapper import TrainingArgs

        wrapper = ModelWrapper(patched, TrainingArgs(criterion=nn.CrossEntropyLoss(), use_cuda=False,
                                                     replicate_in_memory=True))
    except (ImportError, TypeError):
        wrapper = ModelWrapper(patched, nn.CrossEntropyLoss(), replicate_in_memory=True)

    def run(x: torch.Tensor):
        return wrapper.predict_on_batch(x, iterations=samples)

    return run


def _measure(args: argparse.Namespace) -> list[dict]:
    """Rows of one process: per batch size, the median seconds of each variant and the ratios."""
    torch.manual_seed(0)
    model = MODELS[args.model]()
    fuse_relu_dropout(model)
    model.eval()
    plain = MODELS[args.model]()  # unfused, for Baal's torch twin
    plain.load_state_dict(model.state_dict())
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, 784)

        def loop() -> torch.Tensor:
            with torch.no_grad(), mc.dropout_active(model):
                return torch.stack([model(x) for _ in range(args.samples)])

        variants = {
            "loop": loop,
            "sequential": lambda: mc.mc_samples(model, x, args.samples, seed=0, memory_budget=0),
            "batched": lambda: mc.mc_samples(model, x, args.samples, seed=0),
            "batched_first_call": lambda: mc._PASS_BYTES.clear() or mc.mc_samples(model, x, args.samples, seed=0),
            "thinned": lambda: mc.mc_samples(model, x, args.samples, seed=0, shared_masks=True),
        }
        baal = _baal_variant(plain, args.samples)
        if baal is not None:
            variants["baal"] = lambda: baal(x)
        times = median_times(variants, args.repeats)
        rows.append({"batch": batch, "seconds": times,
                     "speedup_vs_sequential": {k: times["sequential"] / v for k, v in times.items()}})
    return rows


def _merge(runs: list[list[dict]]) -> list[dict]:
    """Per batch size: the median over the processes of the seconds and ratios, and the ratios' range."""
    merged = []
    for rows in zip(*runs):
        names = rows[0]["seconds"]
        ratios = {k: [r["speedup_vs_sequential"][k] for r in rows] for k in names}
        merged.append({"batch": rows[0]["batch"],
                       "seconds": {k: statistics.median(r["seconds"][k] for r in rows) for k in names},
                       "speedup_vs_sequential": {k: statistics.median(v) for k, v in ratios.items()},
                       "speedup_range": {k: [min(v), max(v)] for k, v in ratios.items()}})
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="srivastava_mlp")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--processes", type=int, default=3, help="processes that each time every variant")
    parser.add_argument("--one-process", action="store_true", help=argparse.SUPPRESS)  # a child: print its rows
    args = parser.parse_args()
    if args.one_process:
        print(json.dumps(_measure(args)))
        return 0
    load_before = os.getloadavg()
    child = [sys.executable, __file__, "--one-process", "--model", args.model, "--samples", str(args.samples),
             "--repeats", str(args.repeats), "--batch", *map(str, args.batch)]
    runs = [json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
            for _ in range(args.processes)]
    try:
        baal_version = importlib.metadata.version("baal")
    except importlib.metadata.PackageNotFoundError:
        baal_version = None
    print(json.dumps({"model": args.model, "samples": args.samples, "baal": baal_version, "processes": args.processes,
                      "rows": _merge(runs), "runs": runs,
                      "environment": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                      "load_average_1min": round(load_before[0], 2)},
                      "loadavg_before": load_before, "loadavg_after": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
