"""A ViT training step with timm's DropPath against the same model rewired to DropPathResidual, and
short training runs with each to compare the accuracy they reach.

Step: timm's ``VisionTransformer`` shaped like ``vit_small`` (width 384, 12 blocks, 6 heads) at a
small image size, one uniform drop rate on every residual branch (as DINOv2/v3 train their large
models), forward + cross-entropy + backward + SGD step. For each rate the variants are timed
round-robin (``dropkit.lab.bench.median_times``): ``timm`` (timm's blocks and DropPath),
``dropkit`` (the same weights after ``dropkit.residual.rewire_residual_blocks``) and ``no_drop``
(rate 0: the cost of the full branches, for reference). Ratios are against ``timm`` of the same
rate in the same round robin.

Accuracy: a smaller ViT of the same kind (``--acc-*``) trained for a few hundred steps on MNIST
(the copy shipped with dropkit's lab) with each variant and the same seeds (same initial weights
and batches; the masks differ, as they come from different generators), test accuracy at the end.

    python benchmarks/residual_vit.py --out benchmarks/results/residual_vit_step.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_time import median_cpu_seconds  # noqa: E402
from vision_shim import import_torchvision  # noqa: E402

import_torchvision()  # timm imports torchvision

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import dropkit  # noqa: E402
from dropkit.lab.bench import emit_json, environment, median_times  # noqa: E402
from dropkit.lab.data import load_dataset  # noqa: E402
from dropkit.residual import rewire_residual_blocks  # noqa: E402


def vit(img: int, patch: int, dim: int, depth: int, heads: int, rate: float, channels: int = 3,
        classes: int = 10) -> VisionTransformer:
    """A timm ViT with drop rate ``rate`` on every residual branch (timm's DropPath modules)."""
    model = VisionTransformer(img_size=img, patch_size=patch, in_chans=channels, num_classes=classes, embed_dim=dim,
                              depth=depth, num_heads=heads, drop_path_rate=max(rate, 1e-6))
    for block in model.blocks:
        block.drop_path1.drop_prob = block.drop_path2.drop_prob = rate
    return model


def variants_for(rate: float, args) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    timm_model = vit(args.img, args.patch, args.dim, args.depth, args.heads, rate)
    rewired = copy.deepcopy(timm_model)
    rewire_residual_blocks(rewired)
    no_drop = copy.deepcopy(timm_model)
    for block in no_drop.blocks:
        block.drop_path1.drop_prob = block.drop_path2.drop_prob = 0.0
    return {"timm": timm_model, "dropkit": rewired, "no_drop": no_drop}


def step_fn(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return step


def bench_steps(args) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.img, args.img, generator=g)
    labels = torch.randint(0, 10, (args.batch,), generator=g)
    rows = []
    for rate in args.rates:
        models = variants_for(rate, args)
        load_before = os.getloadavg()[0]
        steps = {name: step_fn(m, images, labels) for name, m in models.items()}
        times = (median_cpu_seconds(steps, args.repeats) if args.cpu_time
                 else median_times(steps, args.repeats, min_sample_s=0.0))
        rows.append({
            "rate": rate,
            "timer": "process CPU seconds" if args.cpu_time else "wall seconds",
            "seconds": {k: round(v, 5) for k, v in times.items()},
            "dropkit_over_timm": round(times["dropkit"] / times["timm"], 3),
            "no_drop_over_timm": round(times["no_drop"] / times["timm"], 3),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        })
        print(rows[-1], file=sys.stderr)
    return rows


def train_accuracy(variant: str, seed: int, args, data) -> float:
    """Test accuracy after ``args.acc_steps`` AdamW steps on MNIST."""
    torch.manual_seed(seed)
    model = vit(28, args.acc_patch, args.acc_dim, args.acc_depth, args.acc_heads, args.acc_rate, channels=1)
    if variant == "dropkit":
        rewire_residual_blocks(model)
    dropkit.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    order = torch.Generator().manual_seed(seed)
    train_x, train_y, test_x, test_y = data
    model.train()
    for _ in range(args.acc_steps):
        idx = torch.randint(0, len(train_y), (args.acc_batch,), generator=order)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(test_x[i:i + 500]).argmax(1) == test_y[i:i + 500]).sum())
                      for i in range(0, len(test_y), 500))
    return correct / len(test_y)


def bench_accuracy(args) -> dict:
    dataset = load_dataset("mnist")
    mean, std = 33.3, 78.6  # MNIST's training-set pixel mean and standard deviation (0-255)

    def prep(split, n):
        return ((split.images[:n].float() - mean) / std).unsqueeze(1), split.labels[:n]

    data = (*prep(dataset.train, args.acc_train), *prep(dataset.test, args.acc_test))
    runs: dict[str, list[float]] = {"timm": [], "dropkit": []}
    seconds: dict[str, list[float]] = {"timm": [], "dropkit": []}
    for seed in args.acc_seeds:
        for variant in runs:
            start = time.perf_counter()
            runs[variant].append(train_accuracy(variant, seed, args, data))
            seconds[variant].append(round(time.perf_counter() - start, 1))
            print(variant, seed, runs[variant][-1], seconds[variant][-1], file=sys.stderr)
    return {
        "rate": args.acc_rate, "steps": args.acc_steps, "batch": args.acc_batch, "train_images": len(data[1]), "test_images": len(data[3]),
        "model": {"dim": args.acc_dim, "depth": args.acc_depth, "heads": args.acc_heads, "patch": args.acc_patch},
        "seeds": args.acc_seeds, "accuracy": runs, "train_seconds": seconds,
        "mean": {k: round(statistics.mean(v), 4) for k, v in runs.items()},
        "spread": {k: round(max(v) - min(v), 4) for k, v in runs.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-step", action="store_true", help="only the accuracy runs")
    parser.add_argument("--acc-seeds", type=int, nargs="*", default=[0, 1, 2], help="none: no accuracy runs")
    parser.add_argument("--acc-rate", type=float, default=0.2)
    parser.add_argument("--acc-steps", type=int, default=400)
    parser.add_argument("--acc-batch", type=int, default=64)
    parser.add_argument("--acc-dim", type=int, default=96)
    parser.add_argument("--acc-depth", type=int, default=6)
    parser.add_argument("--acc-heads", type=int, default=3)
    parser.add_argument("--acc-patch", type=int, default=7)
    parser.add_argument("--acc-train", type=int, default=60000, help="training images drawn from")
    parser.add_argument("--acc-test", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time steps in CPU seconds of this process (best with --threads 1) instead of wall seconds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = {
        "benchmark": "residual_vit",
        "step_model": {"img": args.img, "patch": args.patch, "dim": args.dim, "depth": args.depth,
                       "heads": args.heads, "batch": args.batch, "repeats": args.repeats},
        "environment": environment(),
        "note": "machine shared with other jobs: variants of one rate timed round-robin; load averages recorded",
    }
    if not args.skip_step:
        result["steps"] = bench_steps(args)
    if args.acc_seeds:
        result["accuracy"] = bench_accuracy(args)
    result["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    return emit_json(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
