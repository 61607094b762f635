"""The repository describes the project, not how it was made: no step numbers or meetings of the
development process in any tracked text file or file name."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: words of a development process, not of the project (case-insensitive)
PROCESS_WORDS = re.compile(
    r"\bstops? \d+|\bstop-?\d+\b|\bthis stop\b|\bsession\b|\bissue ?#?\d+|\bthis issue\b|\bthe issue's\b|\bthe lead\b",
    re.IGNORECASE)
BINARY = (".gz", ".png", ".jpg", ".pt", ".npz")


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.decode().split("\0") if name and not name.endswith(BINARY)]


def test_pattern_catches_process_words_and_spares_ordinary_ones():
    # the samples are joined from parts so that this file holds none of the phrases it tests for
    for parts in (("as in stop", " 17"), ("stop", "17"), ("this", " stop"), ("this ses", "sion"), ("issue", " 21"),
                  ("issue", " #4"), ("the", " lead")):
        text = "".join(parts)
        assert PROCESS_WORDS.search(text), text
    for text in ("stops bad settings early", "the job stops with an error", "stop = _next_rung(start)",
                 "the launcher stops the others", "a tissue"):
        assert not PROCESS_WORDS.search(text), text


def test_no_process_words_in_tracked_files():
    this = Path(__file__).resolve()
    found = []
    for path in tracked_files():
        if path.resolve() == this or not path.is_file():
            continue
        name = str(path.relative_to(ROOT))
        if PROCESS_WORDS.search(name.replace("_", " ")):
            found.append(f"{name} (file name)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in PROCESS_WORDS.finditer(text)]
    assert found == []
