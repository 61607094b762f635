"""Install dropkit the way users do and check that it works from outside the source tree.

Builds the wheel, installs it into a fresh virtual environment (core only), checks that the core
runs and that the lab asks for its extra; then installs the ``lab`` extra and trains one short run
on the MNIST copy shipped inside the wheel. Run with the project's own Python (``make wheel-check``);
exits non-zero, naming the step, on the first failure.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE_CHECK = """
import torch, dropkit
from dropkit import nn as dnn
dropkit.manual_seed(0)
y = dnn.Dropout(0.5)(torch.ones(64, 64))
assert set(y.unique().tolist()) == {0.0, 2.0}, y.unique()
import importlib.resources
assert importlib.resources.files("dropkit").joinpath("py.typed").is_file(), "py.typed is not installed"
try:
    import dropkit.lab
except ImportError as err:
    assert "dropkit[lab]" in str(err), err
else:
    raise AssertionError("dropkit.lab imported without the lab extra")
assert "site-packages" in dropkit.__file__, dropkit.__file__
print("core ok:", dropkit.__file__)
"""


def run(step: str, args: list[str], cwd: Path) -> None:
    print(f"wheel check: {step}", flush=True)
    done = subprocess.run(args, cwd=cwd, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode:
        sys.exit(f"wheel check failed at: {step} (exit {done.returncode})")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dropkit-wheel-") as tmp:
        work = Path(tmp)
        run("build the wheel", [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                "-w", str(work / "dist"), str(ROOT)], work)
        (wheel,) = glob.glob(str(work / "dist" / "dropkit-*.whl"))
        venv = work / "venv"
        run("create a fresh virtual environment", [sys.executable, "-m", "venv", str(venv)], work)
        python, pip = str(venv / "bin" / "python"), str(venv / "bin" / "pip")
        constraints = ["-c", str(ROOT / "constraints.txt")]
        run("install the core", [pip, "install", "-q", *constraints, wheel], work)
        run("use the core; the lab asks for its extra", [python, "-c", CORE_CHECK], work)
        run("install the lab extra", [pip, "install", "-q", *constraints, f"dropkit[lab] @ file://{wheel}"], work)
        run("train on the MNIST shipped in the wheel",
            [str(venv / "bin" / "dropkit"), "train", "--epochs", "1", "--limit-train", "2000", "--limit-test", "500",
             "--val-size", "500", "--out", str(work / "run"), "--quiet"], work)
        if not (work / "run").is_dir() or not any((work / "run").rglob("metrics.jsonl")):
            sys.exit("wheel check failed at: the run wrote no metrics.jsonl")
        print("wheel check: passed")


if __name__ == "__main__":
    main()
