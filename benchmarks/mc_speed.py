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

Prints one JSON object: seconds per T passes for each variant and batch size, the ratios to
``sequential``, and the load average before and after (the machine may be shared).

    python benchmarks/mc_speed.py --samples 20 --batch 1 8 32 64 256 1024 > benchmarks/results/mc_speed.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="srivastava_mlp")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MODELS[args.model]()
    fuse_relu_dropout(model)
    model.eval()
    plain = MODELS[args.model]()  # unfused, for Baal's torch twin
    plain.load_state_dict(model.state_dict())
    load_before = os.getloadavg()
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
    try:
        baal_version = importlib.metadata.version("baal")
    except importlib.metadata.PackageNotFoundError:
        baal_version = None
    print(json.dumps({"model": args.model, "samples": args.samples, "baal": baal_version, "rows": rows,
                      "environment": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                      "load_average_1min": round(load_before[0], 2)},
                      "loadavg_before": load_before, "loadavg_after": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
