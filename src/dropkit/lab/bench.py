"""Benchmarks of the dropout kernels and of a training step; they return JSON-ready dicts and are
never run as tests.

Method. A speed claim is a ratio measured in one run against a named baseline on the same input:
torch's own op, and a plain copy of the same bytes (``torch.empty_like(x).copy_(x)``, the memory
ceiling: one read, one write, one fresh allocation, as torch's ops make). Every
figure is the median of ``repeats`` samples, and the variants of one case are timed round-robin
(one sample of each per round) so that background load on a shared machine falls on all of them
alike. A sample of a fast variant repeats the call until it lasts about ``min_sample_s``.

"Forward" is the training-time forward: the input requires grad and autograd records the graph
(that is when ``saved="bits"`` writes its mask). "Forward+backward" adds ``y.backward(g)``. The
bytes kept for backward are measured, not assumed: the distinct storages autograd saves during the
forward, seen through ``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import llvmlite.binding
import numba
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit import functional as DF
from dropkit import kernels, ops, rng

#: default sizes of ``kernels``: 2**16 .. 2**26 elements, every other power of two
DEFAULT_LOG2_SIZES = (16, 18, 20, 22, 24, 26)
DEFAULT_DTYPES = ("float32", "bfloat16")
DEFAULT_PS = (0.1, 0.5)


def emit_json(result: dict, out: str | None) -> int:
    """Print a benchmark's ``result`` as JSON and, if ``out`` is given, write it there too; returns 0
    (the exit status of the command or script that calls it)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def environment(device: str = "cpu") -> dict:
    """The versions and machine the figures come from (and the GPU's name for ``device="cuda"``)."""
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "triton": _triton_version(),
        "kernel_path": kernels.path_for(torch.empty(0, device=device)),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "dropkit": dropkit.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        # the microarchitecture the kernels were compiled for ("model name" may name only the vendor)
        "llvm_cpu": llvmlite.binding.get_host_cpu_name(),
        "python": platform.python_version(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "rate_bits": rng.rate_bits(),  # the resolution drop rates were rounded to
    }


def _triton_version() -> str | None:
    if not kernels.triton_available():
        return None
    import triton

    return triton.__version__


def device_sync(device: str) -> Callable[[], None] | None:
    """What ends a timed sample on ``device``: a CUDA synchronize (kernels run asynchronously), or
    nothing on the CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def median_times(variants: dict[str, Callable[[], object]], repeats: int, min_sample_s: float = 0.02,
                 sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each variant, sampled round-robin (see the module docstring).
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before a sample starts and before it ends."""
    sync = sync or (lambda: None)
    calls = {}
    for name, fn in variants.items():
        fn()  # warm-up: compilation, first-touch allocations
        sync()
        start = time.perf_counter()
        fn()
        sync()
        once = time.perf_counter() - start
        calls[name] = max(1, math.ceil(min_sample_s / max(once, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(times) for name, times in samples.items()}


def saved_bytes(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward when ``forward(x)`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x)
    return sum(storages.values())


def _dropout_variants(p: float, compile_backend: str = "none") -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The dropout implementations compared, as functions of the input; with a ``compile_backend``
    also torch's and dropkit's dropout under ``torch.compile`` with that backend."""
    variants = {
        "torch": lambda x: F.dropout(x, p, training=True),
        "dropkit_seed": lambda x: DF.dropout(x, p, training=True),
        "dropkit_bits": lambda x: ops.dropout(x, p, rng.draw_seed(), tuple(x.shape), saved="bits"),
    }
    if compile_backend != "none":
        for name in ("torch", "dropkit_seed"):
            variants[f"{name}_compile"] = torch.compile(variants[name], backend=compile_backend, dynamic=False)
    return variants


def kernel_case(dtype: torch.dtype, numel: int, p: float, repeats: int, device: str = "cpu",
                compile_backend: str = "none") -> dict:
    """Forward and forward+backward times of each dropout against a copy, for one input.

    ``fraction_of_copy_bandwidth`` is the copy's time over the variant's: forward reads and writes
    each element once, as the copy does; forward+backward twice, so it is over twice the copy's.
    """
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    x.requires_grad_()
    grad = torch.ones_like(x)
    impls = _dropout_variants(p, compile_backend)

    def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn(x).backward(grad)
            x.grad = None
        return run

    variants: dict[str, Callable[[], object]] = {"copy": lambda: torch.empty_like(x).copy_(x)}
    variants.update({f"{name}_fwd": (lambda fn=fn: fn(x)) for name, fn in impls.items()})
    variants.update({f"{name}_fwd_bwd": fwd_bwd(fn) for name, fn in impls.items()})
    ms = {name: 1e3 * t for name, t in median_times(variants, repeats, sync=device_sync(device)).items()}
    copy = ms["copy"]
    result = {"dtype": str(dtype).removeprefix("torch."), "numel": numel, "p": p,
              "ms": {name: round(t, 4) for name, t in ms.items()}}
    result["fwd_over_copy"] = {name: round(ms[f"{name}_fwd"] / copy, 3) for name in impls}
    result["fwd_bwd_over_copy"] = {name: round(ms[f"{name}_fwd_bwd"] / copy, 3) for name in impls}
    result["speedup_vs_torch"] = {
        "fwd": {name: round(ms["torch_fwd"] / ms[f"{name}_fwd"], 2) for name in impls if name != "torch"},
        "fwd_bwd": {name: round(ms["torch_fwd_bwd"] / ms[f"{name}_fwd_bwd"], 2) for name in impls if name != "torch"},
    }
    result["fraction_of_copy_bandwidth"] = {
        "fwd": {name: round(copy / ms[f"{name}_fwd"], 3) for name in impls},
        "fwd_bwd": {name: round(2 * copy / ms[f"{name}_fwd_bwd"], 3) for name in impls},
    }
    result["saved_bytes_per_element"] = {name: round(saved_bytes(fn, x) / numel, 4) for name, fn in impls.items()}
    return result


def bench_kernels(
    dtypes: tuple[str, ...] = DEFAULT_DTYPES,
    log2_sizes: tuple[int, ...] = DEFAULT_LOG2_SIZES,
    ps: tuple[float, ...] = DEFAULT_PS,
    repeats: int = 7,
    device: str = "cpu",
    compile_backend: str = "none",
) -> dict:
    """``dropkit bench kernels``: every (dtype, size, p) case of :func:`kernel_case`."""
    cases = [kernel_case(getattr(torch, dtype), 2**k, p, repeats, device, compile_backend)
             for dtype in dtypes for k in log2_sizes for p in ps]
    return {"benchmark": "kernels", "environment": environment(device), "repeats": repeats,
            "compile_backend": compile_backend, "cases": cases}


class _BitsDropout(nn.Module):
    """Dropout whose backward reads a packed 1-bit mask (``saved="bits"``), for the step benchmark."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dropout(x, self.p, rng.draw_seed(), tuple(x.shape), saved="bits")


def mlp(dropout: Callable[[], nn.Module]) -> nn.Sequential:
    """The 784-1024-1024-10 ReLU MLP with ``dropout()`` after each hidden layer."""
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), dropout(), nn.Linear(1024, 1024), nn.ReLU(), dropout(),
                         nn.Linear(1024, 10))


def bench_step(batch: int = 256, p: float = 0.5, repeats: int = 15, compile: bool = False) -> dict:
    """``dropkit bench step``: one SGD train step of :func:`mlp` with each dropout, vs none.

    ``dropkit_fused`` is the ``dropkit_seed`` model after :func:`dropkit.fuse_relu_dropout`: the
    same masks and numbers, with ReLU and dropout done in one pass each way. With ``compile``, every
    model runs under ``torch.compile(model, fullgraph=True)`` (forward and backward compiled, the
    optimizer step eager; compilation happens in the warm-up call, outside the timings), and the
    ``saved="bits"`` variant is left out.
    """
    layers = {
        "none": nn.Identity,
        "torch": lambda: nn.Dropout(p),
        "dropkit_seed": lambda: dropkit.nn.Dropout(p),
        "dropkit_bits": lambda: _BitsDropout(p),
        "dropkit_fused": lambda: dropkit.nn.Dropout(p),
    }
    if compile:
        del layers["dropkit_bits"]
    data = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 784, generator=data)
    y = torch.randint(0, 10, (batch,), generator=data)

    def step_fn(make_layer: Callable[[], nn.Module], fuse: bool = False) -> Callable[[], None]:
        torch.manual_seed(0)
        model = mlp(make_layer).train()
        if fuse:
            dropkit.fuse_relu_dropout(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        forward = torch.compile(model, fullgraph=True) if compile else model

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(x), y).backward()
            opt.step()
        return step

    ms = {name: 1e3 * t for name, t in median_times({n: step_fn(m, n == "dropkit_fused") for n, m in layers.items()}, repeats).items()}
    return {
        "benchmark": "step", "environment": environment(), "model": "784-1024-1024-10 ReLU MLP, SGD",
        "batch": batch, "p": p, "repeats": repeats, "compiled": compile,
        "ms": {name: round(t, 3) for name, t in ms.items()},
        "over_no_dropout": {name: round(t / ms["none"], 3) for name, t in ms.items() if name != "none"},
    }
