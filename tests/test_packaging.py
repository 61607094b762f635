"""The core library stands on torch, numpy and numba alone; the lab asks for its extra."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dropkit

PACKAGE = Path(dropkit.__file__).parent
#: the core's modules; ``__main__`` is the command's entry point, which is the lab's, and
#: ``integrations`` hold the bridges to other frameworks, each needing its own extra
CORE_FILES = sorted(p for p in PACKAGE.rglob("*.py")
                    if not {"lab", "integrations"} & set(p.relative_to(PACKAGE).parts) and p.name != "__main__.py")

#: the lab's packages (and optional ones of other extras), absent from a core-only environment
LAB_ONLY = ("optuna", "matplotlib", "tqdm", "sklearn", "pandas", "lightgbm", "pyarrow")


@pytest.fixture(scope="module")
def core_only_path(tmp_path_factory) -> str:
    """A folder that mirrors this environment's site-packages without the lab's packages: a Python
    started with ``-S`` and only this folder and the source on its path sees a core-only install."""
    folder = tmp_path_factory.mktemp("core-only")
    site_packages = Path(np.__file__).parents[1]
    for entry in site_packages.iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top not in LAB_ONLY and not entry.name.endswith(".pth"):
            (folder / entry.name).symlink_to(entry)
    return os.pathsep.join([str(PACKAGE.parent), str(folder)])


def _run_core_only(code: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path})


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_core_module_imports_the_lab():
    assert CORE_FILES
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p) if m.startswith("dropkit.lab"))
                 for p in CORE_FILES}
    assert not {k: v for k, v in offenders.items() if v}


def test_every_core_module_imports_without_the_labs_packages(core_only_path):
    modules = sorted({"dropkit." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
                      for p in CORE_FILES})
    code = (f"import importlib, importlib.util\nassert importlib.util.find_spec('optuna') is None\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\nprint('ok')")
    done = _run_core_only(code, core_only_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_lab_without_its_extra_names_the_extra(core_only_path):
    done = _run_core_only("import dropkit.lab", core_only_path)
    assert done.returncode != 0
    assert "pip install 'dropkit[lab]'" in done.stderr and "optuna" in done.stderr


def test_the_bundled_mnist_is_package_data():
    from dropkit.lab import data

    assert data.BUNDLED_MNIST.is_relative_to(PACKAGE)
    assert sorted(f.name for f in data.BUNDLED_MNIST.glob("*.gz")) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz"]
