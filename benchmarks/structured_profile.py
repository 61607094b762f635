"""Where a structured-dropout training step spends its time, op by op, against the dense step.

`dropkit bench-structured` gives one number per step; this script says what is inside it. The
same MLP 784-W-W-10 step as that benchmark (forward, cross-entropy, backward, SGD with momentum,
from the same initial weights) runs ``--steps`` times under ``torch.profiler`` for the
no-dropout model and for :class:`dropkit.structured.StructuredLinearStack`, after a warm-up. Each
op's self time per step is printed as JSON, largest first, with its input shapes (so the bmm of
the forward tells itself apart from those of the backward); the compiled gather runs inside
``_KeptLinear`` and shows as that node's self time. The profiler adds a little time to every op,
so take the ratios, not the milliseconds, as the step's.

    OMP_NUM_THREADS=1 python benchmarks/structured_profile.py --width 1024 --batch 512 --p 0.5 --groups 8
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dropkit.lab.bench import emit_json
from dropkit.lab.commands.bench_structured import _step_fn, _variants, step_inputs


def profile_step(step, steps: int, top: int) -> dict:
    """Self time per step of the ``top`` costliest (op, input shapes) pairs, and the step's total."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {
        "ms_per_step": round(total / steps / 1e3, 3),
        "ops": [{"op": e.key, "shapes": str(e.input_shapes),
                 "ms_per_step": round(e.self_cpu_time_total / steps / 1e3, 3),
                 "share": round(e.self_cpu_time_total / total, 4)} for e in events[:top]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--weight-grad", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=20, help="ops listed per variant")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args()
    models = _variants(args.width, [args.p], [args.groups], args.weight_grad)
    x, y = step_inputs(args.batch)
    result = {"width": args.width, "batch": args.batch, "p": args.p, "groups": args.groups,
              "threads": torch.get_num_threads(), "steps": args.steps}
    for name, key in (("none", ("none", 0.0, 0)), ("structured", ("structured", args.p, args.groups))):
        step = _step_fn(models[key], x, y, lr=0.01, momentum=0.9)
        for _ in range(5):
            step()
        result[name] = profile_step(step, args.steps, args.top)
    result["structured_vs_none"] = round(result["structured"]["ms_per_step"] / result["none"]["ms_per_step"], 3)
    return emit_json(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
