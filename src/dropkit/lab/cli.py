"""The ``dropkit`` command: parses arguments and hands each subcommand to the module that owns it.

Each subcommand module exposes ``add_parser(subparsers)`` (which registers its arguments and sets
``func``) so that this file stays a thin table and holds no logic of its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dropkit.lab.distributed import WorkerFailed

#: subcommand name -> module (under dropkit.lab.commands) that defines it
SUBCOMMANDS: dict[str, str] = {
    "train": "dropkit.lab.commands.train",
    "compare": "dropkit.lab.commands.compare",
    "bench": "dropkit.lab.commands.bench",
    "bench-structured": "dropkit.lab.commands.bench_structured",
    "sweep": "dropkit.lab.commands.sweep",
    "warmup": "dropkit.lab.commands.warmup",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dropkit", description="Dropout for PyTorch: train, compare, tune, measure.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"dropkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except WorkerFailed as err:
        print(f"dropkit {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
