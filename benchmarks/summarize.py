"""Turn the JSON of `dropkit bench kernels` / `dropkit bench step` into the Markdown tables of
BENCHMARKS.md.

    python benchmarks/summarize.py benchmarks/results/kernels.json benchmarks/results/step.json
"""

from __future__ import annotations

import json
import sys

IMPLS = ("torch", "dropkit_seed", "dropkit_bits")
#: copies into outputs taken as dropkit takes its own (see dropkit.lab.bench)
BASELINES = ("copy_cached", "copy_huge")


def _over(case: dict, baseline: str) -> str:
    """"fwd seed / bits, fwd+bwd seed / bits" over ``baseline``, or "-" for results made before it existed."""
    if f"fwd_over_{baseline}" not in case:
        return "-"
    return ", ".join(" / ".join(f"{case[f'{kind}_over_{baseline}'][i]:.2f}" for i in IMPLS[1:])
                     for kind in ("fwd", "fwd_bwd"))


def kernels_table(result: dict) -> str:
    """One row per (dtype, size, p): times in ms and the ratios to a copy and to torch. Results made
    before the ``copy_cached`` or ``copy_huge`` baselines existed show "-" in their columns."""
    lines = [
        "| dtype | n | p | copy ms (cached, huge) | fwd ms torch / seed / bits | fwd/copy torch / seed / bits "
        "| fwd+bwd/copy torch / seed / bits | fwd / fwd+bwd over copy_cached, seed / bits "
        "| fwd / fwd+bwd over copy_huge, seed / bits "
        "| fwd speed-up seed / bits | fwd+bwd speed-up seed / bits | saved B/elem torch / seed / bits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        ms, n = case["ms"], case["numel"]
        size = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
        fwd = " / ".join(f"{ms[f'{i}_fwd']:.3g}" for i in IMPLS)
        over = " / ".join(f"{case['fwd_over_copy'][i]:.2f}" for i in IMPLS)
        over_bwd = " / ".join(f"{case['fwd_bwd_over_copy'][i]:.2f}" for i in IMPLS)
        copy = f"{ms['copy']:.3g} (" + ", ".join(f"{ms[b]:.3g}" if b in ms else "-" for b in BASELINES) + ")"
        cached, huge = (_over(case, baseline) for baseline in BASELINES)
        speed = " / ".join(f"{case['speedup_vs_torch']['fwd'][i]:.1f}x" for i in IMPLS[1:])
        speed_bwd = " / ".join(f"{case['speedup_vs_torch']['fwd_bwd'][i]:.1f}x" for i in IMPLS[1:])
        saved = " / ".join(f"{case['saved_bytes_per_element'][i]:.3g}" for i in IMPLS)
        lines.append(f"| {case['dtype']} | {size} | {case['p']} | {copy} | {fwd} | {over} | {over_bwd} | {cached} "
                     f"| {huge} | {speed} | {speed_bwd} | {saved} |")
    return "\n".join(lines)


def step_table(result: dict) -> str:
    """Step time of each variant and its ratio to the step without dropout."""
    lines = ["| dropout | step ms | / no dropout |", "|---|---|---|"]
    for name, ms in result["ms"].items():
        ratio = result["over_no_dropout"].get(name, 1.0)
        lines.append(f"| {name} | {ms:.2f} | {ratio:.3f} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        env = result["environment"]
        print(f"<!-- {path}: torch {env['torch']}, numba {env['numba']}, {env['threads']} threads, "
              f"{env['processor']} -->")
        print(kernels_table(result) if result["benchmark"] == "kernels" else step_table(result))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
