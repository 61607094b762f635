"""A/B of two or more versions of ``dropkit/kernels/cpu.py``, loaded side by side in one process.

Kernel changes are small against a virtual machine's run-to-run noise (BENCHMARKS.md), so comparing two
``bench kernels`` runs made minutes apart tells little. This script imports each version of
``cpu.py`` given on the command line as its own module and times their ``masked_seed`` (the
kernel of the forward and of the seed-mode backward) in turns, round robin, on the same input and into the same
already-written output, so that page faults and the memory state are the same for all versions.
A plain torch copy between the same two tensors is timed in the same rounds as the baseline.

Two modes:

* ``--size 24`` (default): 2**24 elements on ``--threads`` threads; medians, and each version's
  time over the copy's.
* ``--size 16 --threads 1``: a 2**16-element input stays in cache; the fastest of the rounds, in us
  per block of 2,048 elements (the kernel's own work, without memory traffic).

Each version is compiled on first use; numba's cache is pointed at a fresh temporary directory,
because cache entries of modules loaded from paths outside the package do not load back. Outputs
of all versions are compared bit for bit, so a faster version that changed a result is caught.

    python benchmarks/kernel_ab.py before=/tmp/cpu_before.py after=src/dropkit/kernels/cpu.py
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: (name, dtype, draw width, 16-bit-scaled threshold at that width): p = 0.1 at 16 and 8 bits, p = 0.5
CASES = [
    ("float32 p=0.1", np.float32, 16, 6554),
    ("float32 p=0.1 (8-bit rates)", np.float32, 8, 26),
    ("float32 p=0.5", np.float32, 1, 1),
    ("bfloat16 p=0.1", np.uint16, 16, 6554),
    ("bfloat16 p=0.1 (8-bit rates)", np.uint16, 8, 26),
    ("bfloat16 p=0.5", np.uint16, 1, 1),
]
BLOCK = 2048


def load_versions(specs: list[str]) -> dict[str, object]:
    """``name=path`` pairs -> modules, each ``cpu.py`` imported under its own name."""
    versions = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"kernel_ab: versions are name=path/to/cpu.py, got {spec!r}")
        module_spec = importlib.util.spec_from_file_location(f"kernel_ab_{name}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        versions[name] = module
    return versions


def make_input(numel: int, dtype) -> np.ndarray:
    values = np.random.default_rng(0).standard_normal(numel).astype(np.float32)
    return (values.view(np.uint32) >> 16).astype(np.uint16) if dtype == np.uint16 else values


def time_case(
    versions: dict, x: np.ndarray, width: int, thr: int, rounds: int, allow_different: bool = False
) -> dict[str, list[float]]:
    """Seconds per call of each version's forward (and of a copy into the same output), round robin.
    A version whose output differs from the first version's stops the run, unless
    ``allow_different`` (a variant timed for what it costs, knowing it changes results)."""
    import torch

    out = np.zeros_like(x)
    bits = np.empty(-(-x.size // 8), np.uint8)
    keep = 1.0 - thr / 2.0**width
    calls = {"copy": lambda: torch.from_numpy(out).copy_(torch.from_numpy(x))}
    for name, module in versions.items():
        args = [x, out, bits, np.uint64(0x12345678), np.uint64(0x9ABCDEF), 0, width, thr, 0, keep, 0.0, 0.0, False]
        calls[name] = lambda m=module, args=args: m.masked_seed(*args)
    results = {}
    for name, call in calls.items():  # compile, and the same outputs from every version
        call()
        results[name] = out.copy()
    reference = results[next(iter(versions))]
    for name in versions:
        if not np.array_equal(results[name], reference):
            if not allow_different:
                raise SystemExit(f"kernel_ab: version {name!r} gives different outputs")
            print(f"kernel_ab: version {name!r} gives different outputs (timed anyway)", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="name=path/to/cpu.py, two or more")
    parser.add_argument("--size", type=int, default=24, help="log2 of the number of elements")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--allow-different", action="store_true",
                        help="time versions whose outputs differ from the first's instead of stopping")
    args = parser.parse_args()
    os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="kernel_ab_numba_"))
    import numba
    import torch

    from dropkit.lab.bench import emit_json, environment

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    versions = load_versions(args.versions)
    in_cache = args.size <= 16
    cases = []
    for label, dtype, width, thr in CASES:
        x = make_input(1 << args.size, dtype)
        times = time_case(versions, x, width, thr, args.rounds, args.allow_different)
        if in_cache:
            per_block = {name: round(min(ts) / (x.size / BLOCK) * 1e6, 3) for name, ts in times.items()}
            cases.append({"case": label, "us_per_block_fastest": per_block})
        else:
            ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
            cases.append({"case": label, "ms_median": {k: round(v, 3) for k, v in ms.items()},
                          "over_copy": {name: round(ms[name] / ms["copy"], 3) for name in versions}})
        print(f"kernel_ab: {label} done", file=sys.stderr, flush=True)
    return emit_json({"benchmark": "kernel A/B, masked_seed (dropout forward), versions side by side",
                      "size": f"2^{args.size}", "rounds": args.rounds, "threads": args.threads,
                      "versions": {spec.partition("=")[0]: spec.partition("=")[2] for spec in args.versions},
                      "environment": environment(), "cases": cases}, None)


if __name__ == "__main__":
    raise SystemExit(main())
