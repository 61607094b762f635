"""The ``dropkit`` command: parses arguments and hands each subcommand to the module that owns it.

Each subcommand module exposes ``add_parser(subparsers)`` (which registers its arguments and sets
``func``) so that this file stays a thin table and holds no logic of its own. A module is imported
only when its subcommand is chosen (or for the full parser, :func:`build_parser` without
arguments): ``dropkit --help`` and ``dropkit --version`` load neither torch nor the lab's packages.

Every error a user can cause (a bad argument, a missing or unwritable file or folder, a damaged
data file or checkpoint, a folder another run holds, an unusable storage URL) ends in one line,
``dropkit <command>: error: ...``, and a non-zero exit status; ``--debug`` shows the traceback
instead. Any other exception is a bug in dropkit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

import dropkit
from dropkit.lab.run_lock import RunFolderBusy

__all__ = ["SUBCOMMANDS", "USER_ERRORS", "build_parser", "describe_error", "main"]

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


#: exceptions that mean "the input was wrong", not "dropkit is wrong": printed as one line.
#: OSError covers files and folders (missing, not a folder, read-only, full disk).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RunFolderBusy)

#: exit status of an error in the input (argparse's own), and of an interrupted command
USAGE_ERROR = 2
INTERRUPTED = 130


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are the one line ``PROG: error: MESSAGE`` (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``dropkit`` parser. With ``argv``, only the subcommand it names (if any) is loaded and
    the others are listed by name and help; without, every subcommand is loaded in full."""
    parser = _OneLineParser(prog="dropkit", description="Dropout for PyTorch: train, compare, tune, measure.")
    parser.add_argument("--version", action="version", version=f"dropkit {dropkit.__version__}",
                        help="print dropkit's version and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if argv is None or name == chosen:
            importlib.import_module(module_name).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    _add_debug(subparsers)
    return parser


def _add_debug(subparsers: argparse._SubParsersAction) -> None:
    """``--debug`` also after the (sub)command's name, at every level; a SUPPRESS default keeps a
    subparser from overwriting the value given before it."""
    for sub in subparsers.choices.values():
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of any error")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug(action)


def describe_error(err: BaseException) -> str:
    """One line for a user error: the message, with the file named for an OSError."""
    if isinstance(err, OSError) and err.strerror:
        names = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
        return f"{names}: {err.strerror}" if names else err.strerror
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: the process's arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    from dropkit.lab.distributed import WorkerFailed  # imports torch: only once a subcommand runs

    try:
        return int(args.func(args) or 0)
    except WorkerFailed as err:
        if args.debug:
            raise
        print(f"dropkit {args.command}: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"dropkit {args.command}: error: {describe_error(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"dropkit {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
