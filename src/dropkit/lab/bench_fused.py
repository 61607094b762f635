"""``dropkit bench fused``: the fused ``residual + dropout(act(x + bias))`` against the same
composition in torch, eager and compiled, and a GPT-2-small-sized transformer block's training step.

Method as in :mod:`dropkit.lab.bench`: medians of round-robin samples in one run, ratios against
named baselines on the same inputs, CUDA synchronised at the ends of a sample. The epilogue's
bandwidth floor is the time of its compulsory traffic at the copy's bandwidth: forward reads ``x``
and ``residual`` and writes the output (3 element passes, a copy makes 2), so the floor is 1.5 copies
(the bias is one row, negligible). The block's figures: step time, peak memory allocated during a
step on CUDA (``torch.cuda.max_memory_allocated`` above what was allocated before it; not measured
on the CPU), and the bytes autograd keeps for backward in the forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dropkit import functional as DF
from dropkit import nn as dnn
from dropkit.lab.bench import device_sync, environment, median_times, saved_bytes

#: the epilogue's default shape: 16384 tokens x 8192 features (a large transformer's MLP width)
DEFAULT_ROWS, DEFAULT_COLS = 16384, 8192
#: GPT-2 small: width 768, 12 heads, context 1024
GPT2_SMALL = {"dim": 768, "heads": 12, "seq": 1024, "batch": 8}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"none": lambda h: h, "relu": torch.relu, "gelu": F.gelu}[name]


def epilogue_case(rows: int, cols: int, dtype: torch.dtype, p: float, activation: str, repeats: int,
                  device: str, compile_backend: str) -> dict:
    """Forward and forward+backward of the fused op, the eager composition and (unless
    ``compile_backend`` is ``none``) the compiled composition, against a copy of ``x``."""
    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(rows, cols, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    bias = torch.randn(cols, generator=g).to(device=device, dtype=dtype)
    for t in (x, bias, residual):
        t.requires_grad_()
    grad = torch.ones_like(x)
    act = _activation(activation)

    def composition(x, bias, residual):
        return residual + F.dropout(act(x + bias), p, training=True)

    impls = {
        "dropkit": lambda x, bias, residual: DF.bias_act_dropout(x, bias, p, activation=activation, residual=residual,
                                                                 training=True),
        "eager": composition,
    }
    if compile_backend != "none":
        impls["compile"] = torch.compile(composition, backend=compile_backend, dynamic=False)

    def fwd_bwd(fn):
        def run() -> None:
            fn(x, bias, residual).backward(grad)
            x.grad = bias.grad = residual.grad = None
        return run

    variants: dict[str, Callable[[], object]] = {"copy": lambda: torch.empty_like(x).copy_(x)}
    variants.update({f"{name}_fwd": (lambda fn=fn: fn(x, bias, residual)) for name, fn in impls.items()})
    variants.update({f"{name}_fwd_bwd": fwd_bwd(fn) for name, fn in impls.items()})
    ms = {name: 1e3 * t for name, t in median_times(variants, repeats, sync=device_sync(device)).items()}
    floor = 1.5 * ms["copy"]
    result = {
        "shape": [rows, cols], "dtype": str(dtype).removeprefix("torch."), "p": p, "activation": activation,
        "ms": {name: round(t, 4) for name, t in ms.items()},
        "fwd_floor_ms": round(floor, 4),
        "fwd_over_floor": {name: round(ms[f"{name}_fwd"] / floor, 3) for name in impls},
        "dropkit_speedup": {
            "fwd": {name: round(ms[f"{name}_fwd"] / ms["dropkit_fwd"], 2) for name in impls if name != "dropkit"},
            "fwd_bwd": {name: round(ms[f"{name}_fwd_bwd"] / ms["dropkit_fwd_bwd"], 2) for name in impls
                        if name != "dropkit"},
        },
        "saved_bytes_per_element": {
            name: round(saved_bytes(lambda x, fn=fn: fn(x, bias, residual), x) / x.numel(), 4)
            for name, fn in impls.items()
        },
    }
    return result


class GPTBlock(nn.Module):
    """A GPT-2 transformer block (pre-LayerNorm, causal attention, 4x GELU MLP) with dropout on the
    attention weights and on both residual branches, the latter either as torch's ``nn.Dropout``
    after biased ``Linear`` layers or as dropkit's fused epilogues (:class:`dropkit.nn.BiasActDropout`)
    after bias-free ones. Both have the same parameters, counted alike."""

    def __init__(self, dim: int, heads: int, p: float, fused: bool) -> None:
        super().__init__()
        self.heads, self.p, self.fused = heads, p, fused
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim, bias=not fused)
        self.fc = nn.Linear(dim, 4 * dim, bias=not fused)
        self.out = nn.Linear(4 * dim, dim, bias=not fused)
        if fused:
            self.proj_epilogue = dnn.BiasActDropout(p, features=dim)
            self.fc_epilogue = dnn.BiasActDropout(0.0, activation="gelu", features=4 * dim)
            self.out_epilogue = dnn.BiasActDropout(p, features=dim)
        else:
            self.proj_dropout, self.out_dropout = nn.Dropout(p), nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        a = self.proj(a.transpose(1, 2).reshape(b, t, d))
        if self.fused:
            x = self.proj_epilogue(a, residual=x)
            return self.out_epilogue(self.out(self.fc_epilogue(self.fc(self.ln2(x)))), residual=x)
        x = x + self.proj_dropout(a)
        return x + self.out_dropout(self.out(F.gelu(self.fc(self.ln2(x)))))


def block_case(dim: int, heads: int, seq: int, batch: int, p: float, dtype: torch.dtype, repeats: int, device: str,
               compile_backend: str) -> dict:
    """One AdamW training step of :class:`GPTBlock`, torch's dropout against dropkit's fused epilogues,
    eager and (unless ``compile_backend`` is ``none``) compiled."""
    x = torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    models = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = GPTBlock(dim, heads, p, fused).to(device=device, dtype=dtype).train()
        name = "dropkit" if fused else "torch"
        models[name] = model
        if compile_backend != "none":
            models[f"{name}_compile"] = torch.compile(model, backend=compile_backend, dynamic=False)

    def step_fn(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
            opt.step()
        return step

    steps = {name: step_fn(model) for name, model in models.items()}
    ms = {name: 1e3 * t for name, t in median_times(steps, repeats, min_sample_s=0.05, sync=device_sync(device)).items()}
    result = {
        "model": "GPT-2 block (pre-LN, causal attention, 4x GELU MLP), AdamW",
        "dim": dim, "heads": heads, "seq": seq, "batch": batch, "p": p, "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(t.numel() for t in models["torch"].parameters()),
        "ms": {name: round(t, 3) for name, t in ms.items()},
        "dropkit_speedup": {name: round(t / ms["dropkit"], 3) for name, t in ms.items() if name != "dropkit"},
        "saved_bytes_forward_mib": {
            name: round(saved_bytes(lambda x, model=model: model(x), x) / 2**20, 2) for name, model in models.items()
        },
    }
    if torch.device(device).type == "cuda":
        result["peak_step_memory_mib"] = {name: round(_peak_mib(steps[name]), 1) for name in models}
    return result


def _peak_mib(step: Callable[[], None]) -> float:
    """CUDA memory allocated at the peak of one ``step`` above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_fused(rows: int = DEFAULT_ROWS, cols: int = DEFAULT_COLS, dtype: str = "bfloat16", p: float = 0.1,
                activation: str = "gelu", block: dict | None = None, repeats: int = 7, device: str = "cuda",
                compile_backend: str = "inductor") -> dict:
    """``dropkit bench fused``: :func:`epilogue_case` and :func:`block_case` (GPT-2 small by default)."""
    block = {**GPT2_SMALL, **(block or {})}
    torch_dtype = getattr(torch, dtype)
    return {
        "benchmark": "fused", "environment": environment(device), "repeats": repeats,
        "compile_backend": compile_backend,
        "epilogue": epilogue_case(rows, cols, torch_dtype, p, activation, repeats, device, compile_backend),
        "block_step": block_case(block["dim"], block["heads"], block["seq"], block["batch"], p, torch_dtype, repeats,
                                 device, compile_backend),
    }
