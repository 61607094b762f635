"""What one dropout call costs inside a training step: back to back, and right after a matmul.

``dropkit bench step`` puts dropkit's dropout at 1.04-1.12x of the step without it, while the
same op timed back to back costs about 1 % of that step. This script times single calls of each
op on one layer's activations of the step's MLP (256 x 1024 float32), either back to back or each
right after the matmul that precedes dropout in the step (256 x 1024 @ 1024 x 1024), and prints
the medians as JSON. A plain torch op (``x * 2``, one read and one write, no mask) is the yardstick
for what any op costs there.

    python benchmarks/op_after_gemm.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import dropkit
from dropkit.lab.bench import emit_json, environment


def median_us(op: Callable[[], object], before: Callable[[], object], calls: int) -> float:
    """Median microseconds of ``op()``, each call timed alone right after ``before()``."""
    times = []
    for _ in range(calls):
        before()
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times[calls // 10:]) * 1e6, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="timed calls per figure (the first tenth is warm-up)")
    args = parser.parse_args()
    x = torch.randn(256, 1024, requires_grad=True)
    a, w = torch.randn(256, 1024), torch.randn(1024, 1024)
    grad = torch.ones(256, 1024)
    layer = dropkit.nn.Dropout(0.5).train()

    def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn(x).backward(grad)
            x.grad = None
        return run

    ops = {
        "torch_mul_fwd": lambda: x * 2.0,
        "torch_dropout_fwd": lambda: F.dropout(x, 0.5, training=True),
        "dropkit_dropout_fwd": lambda: layer(x),
        "torch_mul_fwd_bwd": fwd_bwd(lambda t: t * 2.0),
        "dropkit_dropout_fwd_bwd": fwd_bwd(layer),
    }
    contexts = {"back_to_back": lambda: None, "after_matmul": lambda: a @ w}
    result = {name: {ctx: median_us(op, before, args.calls) for ctx, before in contexts.items()}
              for name, op in ops.items()}
    return emit_json({"benchmark": "one op's time back to back and right after a matmul, us (median)",
                      "environment": environment(), "shape": [256, 1024], "calls": args.calls, "us": result}, None)


if __name__ == "__main__":
    raise SystemExit(main())
