"""``dropkit bench``: the kernel, fused-epilogue and train-step benchmarks, printed as JSON (see
dropkit.lab.bench and dropkit.lab.bench_fused)."""

from __future__ import annotations

import argparse

import torch

from dropkit import rng
from dropkit.lab import bench, bench_fused
from dropkit.lab.commands import bench_structured
from dropkit.lab.commands.options import OPEN_RATE, description, int_at_least


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="time dropkit's dropout against torch's and a copy; prints JSON",
        description="Examples: dropkit bench kernels --sizes 20 24;  dropkit bench kernels --device cuda;  "
                    "dropkit bench fused --device cuda;  dropkit bench step;  dropkit bench structured --quick",
    )
    which = parser.add_subparsers(dest="benchmark", required=True)
    kernels = which.add_parser("kernels", help="forward and forward+backward of dropout vs copy and torch")
    kernels.add_argument("--sizes", type=int_at_least(0, 30), nargs="+", default=list(bench.DEFAULT_LOG2_SIZES),
                         metavar="LOG2", help="input sizes as powers of two, each in [0, 30] (default: %(default)s)")
    kernels.add_argument("--dtypes", nargs="+", default=list(bench.DEFAULT_DTYPES),
                         choices=["float32", "float64", "bfloat16", "float16"],
                         help="input dtypes (default: %(default)s)")
    kernels.add_argument("--p", type=OPEN_RATE, nargs="+", default=list(bench.DEFAULT_PS),
                         help="drop probabilities, each in (0, 1) (default: %(default)s)")
    kernels.add_argument("--repeats", type=int_at_least(1), default=7, help="samples per figure; the median is kept")
    kernels.add_argument("--out", help="also write the JSON to this file")
    _add_rate_bits(kernels)
    _add_device(kernels)
    kernels.set_defaults(func=run_kernels)
    step = which.add_parser("step", help="train step of a 784-1024-1024-10 MLP with and without dropout")
    step.add_argument("--batch", type=int_at_least(1), default=256, help="batch size (default: %(default)s)")
    step.add_argument("--p", type=OPEN_RATE, default=0.5, help="drop probability in (0, 1) (default: %(default)s)")
    step.add_argument("--repeats", type=int_at_least(1), default=15, help="samples per figure; the median is kept")
    step.add_argument("--out", help="also write the JSON to this file")
    step.add_argument("--compile", action="store_true", help="run every model under torch.compile (fullgraph)")
    _add_rate_bits(step)
    step.set_defaults(func=run_step)
    fused = which.add_parser("fused", help="fused bias + activation + dropout + residual vs torch, and a GPT-2 "
                                           "block's training step")
    fused.add_argument("--rows", type=int_at_least(1), default=bench_fused.DEFAULT_ROWS,
                       help="rows (tokens) of the epilogue's input (default: %(default)s)")
    fused.add_argument("--cols", type=int_at_least(1), default=bench_fused.DEFAULT_COLS,
                       help="columns (features) of the epilogue's input (default: %(default)s)")
    fused.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                       help="element type of both cases (default: %(default)s)")
    fused.add_argument("--p", type=OPEN_RATE, default=0.1, help="drop rate of both cases (default: %(default)s)")
    fused.add_argument("--activation", default="gelu", choices=["none", "relu", "gelu"],
                       help="the epilogue's activation (default: %(default)s)")
    for name, default in bench_fused.GPT2_SMALL.items():
        fused.add_argument(f"--block-{name}", type=int_at_least(1), default=default,
                           help="the GPT block's %(dest)s (default: %(default)s, GPT-2 small)")
    fused.add_argument("--repeats", type=int_at_least(1), default=7, help="samples per figure; the median is kept")
    fused.add_argument("--out", help="also write the JSON to this file")
    _add_device(fused)
    fused.set_defaults(func=run_fused)
    bench_structured.add_arguments(which.add_parser("structured", help=bench_structured.HELP,
                                                    description=description(bench_structured.__doc__)))


def _add_rate_bits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate-bits", type=int, choices=rng.RATE_BITS, default=rng.rate_bits(),
                        help="round each p to a multiple of 2**-BITS (dropkit.rng.set_rate_bits; default %(default)s)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the tensors live (default: %(default)s)")
    parser.add_argument("--compile", choices=["default", "none", "inductor", "aot_eager"], default="default",
                        help="torch.compile backend of the compiled variants; default: inductor on cuda, none on cpu")


def _device_and_backend(args: argparse.Namespace) -> tuple[str, str]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if args.compile == "default":
        return args.device, "inductor" if args.device == "cuda" else "none"
    return args.device, args.compile


def run_kernels(args: argparse.Namespace) -> int:
    rng.set_rate_bits(args.rate_bits)
    device, backend = _device_and_backend(args)
    return bench.emit_json(bench.bench_kernels(tuple(args.dtypes), tuple(args.sizes), tuple(args.p), args.repeats,
                                               device, backend), args.out)


def run_fused(args: argparse.Namespace) -> int:
    device, backend = _device_and_backend(args)
    if args.block_dim % args.block_heads:
        raise ValueError(f"--block-dim ({args.block_dim}) must be a multiple of --block-heads ({args.block_heads})")
    block = {name: getattr(args, f"block_{name}") for name in bench_fused.GPT2_SMALL}
    return bench.emit_json(bench_fused.bench_fused(args.rows, args.cols, args.dtype, args.p, args.activation, block,
                                                   args.repeats, device, backend), args.out)


def run_step(args: argparse.Namespace) -> int:
    rng.set_rate_bits(args.rate_bits)
    return bench.emit_json(bench.bench_step(args.batch, args.p, args.repeats, args.compile), args.out)
