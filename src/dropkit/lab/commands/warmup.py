"""``dropkit warmup``: compile dropkit's CPU kernels now (or load them from the cache) and say where
they are cached, so that no later process spends its first training step compiling."""

from __future__ import annotations

import argparse

from dropkit import kernels
from dropkit.kernels import cpu, numba_cache
from dropkit.lab.commands.options import description


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "warmup", help="compile the CPU kernels ahead of time (cached per user; later processes load them)",
        description=description(__doc__))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    seconds = kernels.warmup()
    where = numba_cache.cache_dir() if cpu.CACHE else "nowhere (the cache directory is not private; see the warning)"
    print(f"dropkit warmup: kernels ready in {seconds:.1f} s; cached in {where}")
    return 0
