"""``dropkit bench structured``: training-step time of structured dropout against dense MLPs, as JSON.

``dropkit bench-structured`` is an alias of the same command.

For each width W and batch B, the MLP 784-W-W-10 takes full training steps (forward, cross-entropy,
backward, SGD step) in these variants, all from the same initial weights and input:

* ``none``: no dropout, the baseline every ratio is taken against;
* ``torch``: ``nn.Dropout(p)`` after each hidden activation; ``dropkit``: ``dropkit.nn.Dropout(p)``;
* ``structured``: :class:`dropkit.structured.StructuredLinearStack` with ``G`` groups (weight
  gradients formed as ``--weight-grad`` says; ``auto`` by default, as in training).

Each comparison (one width, batch and rate: no dropout, torch and dropkit dropout, and every
``G``) is timed on its own: its variants take turns step by step (round robin), so a burst of load
from other processes on a shared machine slows all of them alike instead of one, and each step
follows only the other steps of that comparison, as in a training loop where one model runs.
Each figure is the median over ``--repeats`` rounds. The load average before and after is
recorded next to the figures.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dropkit import nn as dnn
from dropkit.lab.bench import emit_json, environment
from dropkit.lab.commands.options import LEARNING_RATE, OPEN_RATE, description, float_in, int_at_least
from dropkit.structured import WEIGHT_GRADS, StructuredLinearStack

IN_FEATURES = 784
CLASSES = 10
#: the bounds each cell is checked against: structured step / no-dropout step at most this, by p
TARGETS = {0.5: 0.6, 0.3: 0.75}
#: the command's one-line help, under both of its names
HELP = "step time of structured dropout vs no dropout and standard dropout (JSON)"


def _mlp(linears: list[nn.Linear], dropout: Callable[[], nn.Module] | None) -> nn.Sequential:
    """784-W-W-10 from copies of ``linears``, with ``dropout()`` after each hidden ReLU if given."""
    first, hidden, last = (copy.deepcopy(layer) for layer in linears)
    extra = (lambda: [dropout()]) if dropout else list
    return nn.Sequential(first, nn.ReLU(), *extra(), hidden, nn.ReLU(), *extra(), last)


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, momentum: float) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _variants(width: int, rates: list[float], groups: list[int], weight_grad: str) -> dict[tuple, nn.Module]:
    """Every variant, keyed ``(kind, p, G)``, each with its own copy of the same initial weights."""
    torch.manual_seed(0)
    linears = [nn.Linear(IN_FEATURES, width), nn.Linear(width, width), nn.Linear(width, CLASSES)]
    models: dict[tuple, nn.Module] = {("none", 0.0, 0): _mlp(linears, None)}
    for p in rates:
        models[("torch", p, 0)] = _mlp(linears, lambda p=p: nn.Dropout(p))
        models[("dropkit", p, 0)] = _mlp(linears, lambda p=p: dnn.Dropout(p))
        for g in groups:
            copies = [copy.deepcopy(layer) for layer in linears]
            models[("structured", p, g)] = StructuredLinearStack.from_linears(copies, p, groups=g,
                                                                               weight_grad=weight_grad)
    return models


def step_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed input and labels every variant's steps are timed on (the same for every run)."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, IN_FEATURES, generator=gen), torch.randint(0, CLASSES, (batch,), generator=gen)


def time_steps(steps: dict[tuple, Callable[[], None]], repeats: int, warmup: int, threads: int) -> dict[tuple, float]:
    """Median seconds per step of each step function, taking turns round robin on ``threads`` threads.

    The thread count is set again before every step: numba's OpenMP layer (used by dropkit's
    kernels) resets the OpenMP runtime's count it shares with torch when its pool starts.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[tuple, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            torch.set_num_threads(threads)
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(ts) for key, ts in times.items()}


def _row(width: int, batch: int, rate: float, medians: dict[tuple, float]) -> dict:
    """One comparison's figures: every variant against the no-dropout step of the same round robin."""
    none_s = medians[("none", 0.0, 0)]
    row = {"width": width, "batch": batch, "p": rate, "none_ms": round(none_s * 1e3, 3), "variants": []}
    for (kind, p, g), sec in medians.items():
        if kind == "none":
            continue
        entry = {"kind": kind, "p": p, "ms": round(sec * 1e3, 3), "vs_none": round(sec / none_s, 3)}
        if kind == "structured":
            entry["groups"] = g
            entry["vs_torch_dropout"] = round(sec / medians[("torch", p, 0)], 3)
            if p in TARGETS:
                entry["meets_target"] = sec / none_s <= TARGETS[p]
        row["variants"].append(entry)
    return row


def run(args: argparse.Namespace) -> dict:
    threads = args.threads or torch.get_num_threads()
    load_before = os.getloadavg()
    rows = []
    for width in args.widths:
        models = _variants(width, args.p, args.groups, args.weight_grad)
        for batch in args.batches:
            x, y = step_inputs(batch)
            for rate in args.p:
                # one comparison, one round robin: its own models only
                keys = [key for key in models if key[0] == "none" or key[1] == rate]
                steps = {key: _step_fn(models[key], x, y, args.lr, args.momentum) for key in keys}
                medians = time_steps(steps, args.repeats, args.warmup, threads)
                rows.append(_row(width, batch, rate, medians))
                print(f"bench structured: W={width} B={batch} p={rate} done", file=sys.stderr, flush=True)
    return {
        "benchmark": "structured dropout training step, MLP 784-W-W-10, forward+backward+SGD step",
        "environment": environment(),
        "threads": threads,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "weight_grad": args.weight_grad,
        "optimizer": {"name": "SGD", "lr": args.lr, "momentum": args.momentum},
        "targets_vs_none": {str(p): t for p, t in TARGETS.items()},
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "results": rows,
    }


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.widths, args.batches, args.p, args.groups = [1024, 2048], [256], [0.5], [1, 4]
        args.repeats = min(args.repeats, 5)
    return emit_json(run(args), args.out)


def add_parser(subparsers) -> None:
    """``dropkit bench-structured``: an alias of ``dropkit bench structured``."""
    add_arguments(subparsers.add_parser("bench-structured", help=HELP, description=description(__doc__)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the structured-step benchmark, and its handler, on ``parser``."""
    parser.add_argument("--widths", type=int_at_least(1), nargs="+", default=[1024, 2048, 4096],
                        help="hidden widths W of the MLP 784-W-W-10 (default %(default)s)")
    parser.add_argument("--batches", type=int_at_least(1), nargs="+", default=[256, 512],
                        help="batch sizes (default %(default)s)")
    parser.add_argument("--p", type=OPEN_RATE, nargs="+", default=[0.3, 0.5],
                        help="drop probabilities, each in (0, 1) (default %(default)s)")
    parser.add_argument("--groups", type=int_at_least(1), nargs="+", default=[1, 2, 4, 8],
                        help="group counts G of the structured variants (default %(default)s)")
    parser.add_argument("--repeats", type=int_at_least(1), default=7, help="timed rounds; the median is reported")
    parser.add_argument("--warmup", type=int_at_least(0), default=2,
                        help="untimed rounds before the timed ones (default %(default)s)")
    parser.add_argument("--lr", type=LEARNING_RATE, default=0.01,
                        help="SGD learning rate of the steps, in (0, 1000] (default %(default)s)")
    parser.add_argument("--momentum", type=float_in(0, 1, high_open=True), default=0.0,
                        help="SGD momentum of the steps, in [0, 1) (default %(default)s)")
    parser.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--weight-grad", choices=WEIGHT_GRADS, default="auto",
                        help="how the structured variants form weight gradients (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="W 1024/2048, B 256, p 0.5, G 1/4, 5 rounds")
    parser.add_argument("--out", help="also write the JSON here")
    parser.set_defaults(func=main)
