"""The dropkit command itself: --version, a top-level help that loads no heavy package, and help
text for every option, in plain words (no reStructuredText markup)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

import dropkit
from dropkit.lab.cli import SUBCOMMANDS, build_parser, main

HEAVY = ("torch", "optuna", "matplotlib", "numba", "tqdm")
#: reST that a terminal would show raw: inline literals and Sphinx roles
REST = re.compile(r"``|:(class|func|mod|meth|data|attr):`")


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dropkit {dropkit.__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_top_level_help_and_version_import_neither_torch_nor_the_labs_packages(argv):
    """Measured by what is imported, in a fresh interpreter, not by timing."""
    probe = ("import sys\n"
             "from dropkit.lab.cli import main\n"
             "try:\n"
             f"    main({argv!r})\n"
             "except SystemExit:\n"
             "    pass\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"
    assert "COMMAND" in out or "dropkit " in out


def _parsers(parser: argparse.ArgumentParser, path: str = "dropkit"):
    """Every parser of the command, with its command line path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_of_every_subcommand_has_help_in_plain_words():
    parsers = list(_parsers(build_parser()))
    assert {path.split()[1] for path, _ in parsers if " " in path} == set(SUBCOMMANDS)
    missing, markup = [], []
    for path, parser in parsers:
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = re.sub(r"\(default:? %\(default\)\w\)", "", action.help or "").strip(" ;,.")
            if not re.search(r"[a-z]{3}", text):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        if REST.search(parser.format_help()):
            markup.append(path)
    assert missing == [] and markup == []


def test_a_subcommand_is_loaded_only_when_chosen(monkeypatch):
    loaded = []
    real = __import__("importlib").import_module
    monkeypatch.setattr("dropkit.lab.cli.importlib.import_module", lambda name: loaded.append(name) or real(name))
    build_parser(["warmup"])
    assert loaded == [SUBCOMMANDS["warmup"][0]]
