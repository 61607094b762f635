"""The README's promises: its first lines give the two make commands, and every Python block marked
runnable (an HTML comment starting ``<!-- runnable`` on the line before the fence) runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_RUNNABLE = re.compile(r"^<!-- runnable[^\n]*-->\n```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def runnable_blocks(text: str) -> list[str]:
    """The source of each Python block marked runnable, in order."""
    return [match.group(1) for match in _RUNNABLE.finditer(text)]


def test_first_lines_are_the_two_make_commands():
    first, second = README.read_text(encoding="utf-8").splitlines()[:2]
    assert first.split()[:2] == ["make", "demo"]
    assert second.split()[:2] == ["make", "test"]


def test_marker_finds_only_marked_blocks():
    text = "```python\nskipped = 1\n```\n<!-- runnable: yes -->\n```python\nx = 1\n```\n"
    assert runnable_blocks(text) == ["x = 1\n"]


@pytest.mark.parametrize("index", range(len(runnable_blocks(README.read_text(encoding="utf-8")))))
def test_readme_block_runs(index, tmp_path):
    """Each block in a fresh interpreter, from an empty folder, as a reader would paste it."""
    source = runnable_blocks(README.read_text(encoding="utf-8"))[index]
    done = subprocess.run([sys.executable, "-c", source], check=False, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"README block {index} failed:\n{done.stderr}"


def test_readme_has_a_runnable_block():
    assert runnable_blocks(README.read_text(encoding="utf-8"))
