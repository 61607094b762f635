"""How much noisier is the gradient when the examples of a group share their dropout mask?

Structured dropout (:mod:`dropkit.structured`) draws one kept set per group of ``B / G`` examples
instead of one mask per example. Each example's mask has the same distribution either way, so the
expected gradient (of the dropout objective) is the same; what changes is its variance over mask
draws. This script measures that variance directly, on one fixed batch and one fixed set of
weights: the MLP 784-1024-1024-10 with p = 0.5 is first trained a few epochs with standard dropout
(SGD + Nesterov, lr 0.05, momentum 0.9, batch 512), then for each scheme the gradient of the loss on
one batch is taken under ``--draws`` independent mask draws.

Printed as JSON, per scheme: the mean squared distance of a draw's gradient from the schemes' common
mean (the mask-noise variance, summed over all parameters), its ratio to standard dropout's, and
the cosine between the scheme's mean gradient and standard dropout's (near 1: same expectation).
For scale, the same variance over ``--draws`` different batches with standard dropout (data noise
and mask noise together) is printed too.

    python benchmarks/structured_grad_noise.py --dataset fashion-mnist --groups 1 2 4 8 16 64 --out grad_noise.json
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from structured_accuracy import flat_splits, standard_mlp  # same folder

import dropkit
from dropkit.lab.bench import emit_json
from dropkit.lab.data import BatchIterator
from dropkit.structured import from_sequential


def flat_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean cross-entropy on ``(x, y)``, all parameters in one vector."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def spread(grads: torch.Tensor) -> float:
    """Mean squared distance of the rows of ``grads`` from their mean."""
    return float(((grads - grads.mean(0)) ** 2).sum(1).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of standard dropout before measuring")
    parser.add_argument("--draws", type=int, default=32, help="mask draws (and batches) per scheme")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    for name, value, low in (("batch", args.batch, 1), ("draws", args.draws, 2), ("epochs", args.epochs, 0)):
        if value < low:
            parser.error(f"--{name} must be >= {low}, got {value}")
    if any(g < 1 or args.batch % g for g in args.groups):
        parser.error(f"every --groups value must divide --batch {args.batch}, got {args.groups}")

    train, _ = flat_splits(args.dataset)
    dropkit.manual_seed(args.seed)
    model = standard_mlp(1024, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    batches = BatchIterator(train, args.batch, generator=torch.Generator().manual_seed(args.seed))
    for epoch in range(args.epochs):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        print(f"  trained epoch {epoch + 1}", file=sys.stderr, flush=True)

    model.train()
    batch_list = [b for _, b in zip(range(args.draws), batches)]
    x, y = batch_list[0]
    schemes = {"standard": model}
    for g in args.groups:
        schemes[f"G={g}"] = from_sequential(model, groups=g, seed=args.seed * 1000 + g)  # shares the weights
    grads = {name: torch.stack([flat_grad(m, x, y) for _ in range(args.draws)]) for name, m in schemes.items()}
    variances = {name: spread(g) for name, g in grads.items()}
    mean_standard = grads["standard"].mean(0).double()
    results = {}
    for name, g in grads.items():
        mean = g.mean(0).double()
        results[name] = {
            "mask_noise_variance": variances[name],
            "vs_standard": round(variances[name] / variances["standard"], 3),
            "cosine_of_mean_with_standard": round(float(F.cosine_similarity(mean, mean_standard, dim=0)), 4),
            "mean_grad_sq_norm": float((mean ** 2).sum()),
        }
    data_and_mask = spread(torch.stack([flat_grad(model, bx, by) for bx, by in batch_list]))
    report = {
        "benchmark": "gradient variance over mask draws, standard vs group-shared masks",
        "settings": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "schemes": results,
        "standard_over_batches_variance": data_and_mask,
    }
    return emit_json(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
