"""The ``dropkit`` command: parses arguments and hands each subcommand to the module that owns it.

Each subcommand module exposes ``add_parser(subparsers)`` (which registers its arguments and sets
``func``) so that this file stays a thin table and holds no logic of its own. A module is imported
only when its subcommand is chosen (or for the full parser, :func:`build_parser` without
arguments): ``dropkit --help`` and ``dropkit --version`` load neither torch nor the lab's packages.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import dropkit

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

#: subcommand name -> (module under dropkit.lab.commands that defines it, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dropkit.lab.commands.train", "train a model at one or more dropout rates and compare them"),
    "compare": ("dropkit.lab.commands.compare",
                "train under several dropout rates or regularisers, several seeds each, and write a report"),
    "bench": ("dropkit.lab.commands.bench", "time dropkit's dropout against torch's and a copy; prints JSON"),
    "bench-structured": ("dropkit.lab.commands.bench_structured",
                         "the same as 'dropkit bench structured' (training-step time of structured dropout)"),
    "sweep": ("dropkit.lab.commands.sweep", "search dropout rates with Optuna (pruned, resumable, parallel)"),
    "warmup": ("dropkit.lab.commands.warmup",
               "compile the CPU kernels ahead of time (cached per user; later processes load them)"),
    "uncertainty": ("dropkit.lab.commands.uncertainty",
                    "score a trained run's calibration and OOD detection with and without MC dropout"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``dropkit`` parser. With ``argv``, only the subcommand it names (if any) is loaded and
    the others are listed by name and help; without, every subcommand is loaded in full."""
    parser = argparse.ArgumentParser(prog="dropkit", description="Dropout for PyTorch: train, compare, tune, measure.")
    parser.add_argument("--version", action="version", version=f"dropkit {dropkit.__version__}",
                        help="print dropkit's version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if argv is None or name == chosen:
            importlib.import_module(module_name).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: the process's arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    from dropkit.lab.distributed import WorkerFailed  # imports torch: only once a subcommand runs

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
