"""Structured dropout for stacks of Linear layers: the dropped units' arithmetic is never done.

Ordinary (inverted) dropout (Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks
from Overfitting", JMLR 2014) computes every hidden unit and then zeroes a fraction ``p`` of them,
so a step with dropout costs more than one without. Yet a dropped unit ``u`` of layer ``l``
contributes nothing: row ``u`` of ``W_l`` and column ``u`` of ``W_{l+1}`` need not enter any
product. Here each training step draws, for each of ``G`` groups of the batch, a set of exactly
``k = round((1 - p) * width)`` kept units per hidden layer, gathers the kept rows and columns of
every weight for all groups at once, and runs forward and backward as one batched matrix product
per layer on those slices. At p = 0.5 the hidden-to-hidden product shrinks to a quarter.

Why groups. One kept set for the whole batch is the cheapest (the gather is paid once per step)
but the examples of a batch then share their noise, which regularises much less; on MNIST it
trained badly (see BENCHMARKS.md). Per-example masks are the other end: they are ordinary dropout
but make each example gather its own weights. ``G`` groups of ``B / G`` examples sit in between:
the gather and the gradient scatter cost ``G`` copies of the kept slices, the products cost the
same whatever ``G``.

Choosing ``G`` (BENCHMARKS.md, 2-core CPU, MLP 784-W-W-10, p = 0.5): about 64 examples per
group keeps the step at 0.48-0.73x of a step without dropout (the top of that range at width
1024), and accuracy close to standard dropout's. With shared masks the same objective is
optimised with a noisier gradient, so at equal epochs a structured run trails a little, less the
longer it trains: on Fashion-MNIST with 64 per group, -0.28 points after 8 epochs and -0.12
after 40. Per unit of wall-clock it is ahead, since an epoch takes about half the time.

Lighter dropout pays less. At p = 0.3 the hidden-to-hidden product only shrinks to about half,
but groups can be larger: 128 examples per group trained as well as standard dropout on MNIST
and Fashion-MNIST (within 0.05 points after 8 epochs), and the step took 0.70-0.74x of one
without dropout at widths 2048 and 4096, 0.73-0.85x at width 1024.
Groups of one or two per batch regularise less (Fashion-MNIST, p = 0.3: -0.97 and -0.35 points).

Gradients. The custom backward computes each group's slice gradient with one batched product
and adds all groups' slices into a full-size weight gradient in one pass (a compiled kernel that
writes each gradient row once: zero, then add the slices of the groups that kept it). That costs
``G`` slice-sized temporaries, so with many groups of few examples a second way is cheaper: place
each example's output gradient and input at their kept units in zero-filled full-width matrices
and take one dense product, ``B x out x in`` multiply-adds with no slices at all (see
:func:`dense_weight_grad_pays`). Weights and biases stay ordinary ``nn.Parameter``s of ordinary
``nn.Linear`` modules, so any optimizer, weight decay or max-norm constraint works unchanged; rows
and columns no group kept get a zero gradient.

Eval mode uses every weight, with no rescaling (kept activations are scaled by ``width / k``,
i.e. ``1 / (1 - p)``, during training), and gives the outputs of the equivalent standard-dropout
model with the same weights.

Related work: Approximate Random Dropout (Song et al., arXiv 1805.08939) drops rows/columns in
regular patterns to skip GEMM work on GPUs; SliceOut (Notin et al., arXiv 2007.10909) keeps a
contiguous slice of units so the kept weights are a view; this module keeps uniformly random unit
sets (or random blocks of ``block_size`` contiguous units) with several independent sets per batch.

Example:
    >>> net = StructuredLinearStack([784, 1024, 1024, 10], p=0.5, groups=4)
    >>> logits = net(torch.randn(128, 784))        # training: kept slices only
    >>> _ = net.eval(); logits = net(torch.randn(8, 784))  # eval: every weight
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dropkit import nn as dnn
from dropkit.functional import check_p
from dropkit.kernels import run_parallel
from dropkit.kernels.cpu import CACHE
from dropkit.nn import ELEMENTWISE_ACTIVATIONS
from dropkit.rng import check_seed

__all__ = [
    "KeptUnits",
    "Workspace",
    "WEIGHT_GRADS",
    "dense_weight_grad_pays",
    "gather_kept",
    "gather_torch",
    "StructuredLinearStack",
    "from_sequential",
    "sample_kept",
    "scatter_kept",
    "scatter_torch",
    "structured_linear_stack",
    "to_structured",
]

log = logging.getLogger(__name__)

#: dtypes the compiled CPU kernels handle; others (and non-CPU tensors) use plain torch ops
_KERNEL_DTYPES = (torch.float32, torch.float64)

#: dropout modules a converted ``nn.Sequential`` may use after an activation
_UNIT_DROPOUTS: tuple[type[nn.Module], ...] = (nn.Dropout, dnn.Dropout)


# --------------------------------------------------------------------------------------------
# Kept sets
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeptUnits:
    """The kept units of one layer for each of ``G`` groups.

    ``blocks[g]`` holds the sorted indices of the kept blocks of group ``g``; block ``j`` is units
    ``j * block_size`` to ``(j + 1) * block_size - 1``. Every group keeps the same number of
    blocks, so the kept slices of all groups stack into one tensor.
    """

    blocks: torch.Tensor
    block_size: int
    width: int

    @property
    def groups(self) -> int:
        return self.blocks.shape[0]

    @property
    def count(self) -> int:
        """Kept units per group."""
        return self.blocks.shape[1] * self.block_size

    @property
    def scale(self) -> float:
        """Factor on kept activations that keeps their expectation: ``width / count`` = 1/(1-p)."""
        return self.width / self.count

    def units(self) -> torch.Tensor:
        """Kept unit indices, shape ``(G, count)``, sorted within each group."""
        offsets = torch.arange(self.block_size, device=self.blocks.device)
        return (self.blocks[:, :, None] * self.block_size + offsets).reshape(self.groups, -1)

    def mask(self) -> torch.Tensor:
        """Boolean ``(G, width)`` mask, True where a unit is kept: the equivalent dense dropout mask."""
        mask = torch.zeros(self.groups, self.width, dtype=torch.bool, device=self.blocks.device)
        return mask.scatter_(1, self.units(), True)


def kept_count(width: int, p: float, block_size: int = 1) -> int:
    """Blocks kept out of ``width / block_size`` at drop rate ``p``: ``round((1 - p) * n_blocks)``."""
    for name, value in (("width", width), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if width < 1:
        raise ValueError(f"width must be a positive int, got {width}")
    if block_size < 1 or width % block_size:
        raise ValueError(f"block_size must be a positive divisor of the width {width}, got {block_size}")
    n_blocks = width // block_size
    keep = round((1.0 - check_p(p)) * n_blocks)
    if keep < 1:
        raise ValueError(f"p={p} keeps no block of {n_blocks} (width {width}, block_size {block_size})")
    return keep


def sample_kept(
    groups: int,
    width: int,
    p: float,
    block_size: int = 1,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> KeptUnits:
    """Draw ``groups`` independent kept sets of ``kept_count(width, p, block_size)`` blocks each.

    Each set is the ``k`` blocks with the smallest random keys, hence uniform over all subsets of
    that size, and every block is kept with probability exactly ``k / n_blocks``. Keys are drawn
    with ``generator`` or torch's global generator (which ``dropkit.manual_seed`` seeds); their low
    bits hold the block index, so they are distinct and exactly ``k`` fall at or below the k-th
    smallest (ties of the random high bits, probability < n_blocks**2 / 2**52, go to the lower index).
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    keep = kept_count(width, p, block_size)
    n_blocks = width // block_size
    bits = max(1, (n_blocks - 1).bit_length())
    high = torch.randint(0, 2 ** (63 - bits), (groups, n_blocks), generator=generator, device=device)
    keys = (high << bits) | torch.arange(n_blocks, device=device)
    threshold = keys.kthvalue(keep, dim=1, keepdim=True).values
    blocks = (keys <= threshold).nonzero()[:, 1].view(groups, keep)  # row-major: sorted within a group
    return KeptUnits(blocks, block_size, width)


# --------------------------------------------------------------------------------------------
# Gather / scatter of kept slices
#
# Kept rows are single units; kept columns are runs of ``run`` consecutive columns starting at
# ``cols[g, j]`` (run 1: units, run = block_size: blocks). A layer whose inputs are all kept
# needs only a row gather, which plain ``index_select`` / ``index_add_`` do at memory speed.
# --------------------------------------------------------------------------------------------

@numba.njit(parallel=True, cache=CACHE)
def _gather_kernel(weight, rows, cols, run, out):  # pragma: no cover - compiled
    groups, n_rows = rows.shape
    n_cols = cols.shape[1]
    for task in numba.prange(groups * n_rows):
        g = task // n_rows
        i = task - g * n_rows
        src = weight[rows[g, i]]
        dst = out[g, i]
        starts = cols[g]
        if run == 1:  # single units: a plain indexed loop, which LLVM turns into vector gathers
            for j in range(n_cols):
                dst[j] = src[starts[j]]
        else:
            for j in range(n_cols):
                dst[j * run : (j + 1) * run] = src[starts[j] : starts[j] + run]


@numba.njit(parallel=True, cache=CACHE)
def _scatter_kernel(slices, rows, cols, run, scale, out):  # pragma: no cover - compiled
    groups, n_rows = rows.shape
    n_cols = cols.shape[1]
    slot = np.full((groups, out.shape[0]), -1, np.int64)
    for g in range(groups):
        for i in range(n_rows):
            slot[g, rows[g, i]] = i
    # one task per gradient row: no two threads write the same row, and each row is written
    # once (zeroed, then the slices of the groups that kept it added, group by group)
    for r in numba.prange(out.shape[0]):
        dst = out[r]
        dst[:] = 0.0
        for g in range(groups):
            i = slot[g, r]
            if i < 0:
                continue
            src = slices[g, i]
            starts = cols[g]
            if run == 1:
                for j in range(n_cols):
                    dst[starts[j]] += scale * src[j]
            else:
                for j in range(n_cols):
                    for t in range(run):
                        dst[starts[j] + t] += scale * src[j * run + t]


def _column_units(cols: torch.Tensor, run: int) -> torch.Tensor:
    return (cols[:, :, None] + torch.arange(run, device=cols.device)).reshape(cols.shape[0], -1)


def _use_kernel(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES


def gather_torch(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, run: int) -> torch.Tensor:
    """:func:`gather_kept` in plain torch ops (any device or dtype): a row gather, then a column gather."""
    groups, n_rows = rows.shape
    picked = weight.index_select(0, rows.reshape(-1)).view(groups, n_rows, weight.shape[1])
    units = _column_units(cols, run)
    return picked.gather(2, units[:, None, :].expand(groups, n_rows, units.shape[1]))


def scatter_torch(
    slices: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, run: int, scale: float, n_out: int, n_in: int
) -> torch.Tensor:
    """:func:`scatter_kept` in plain torch ops: one ``index_add_`` of all slices into the flat gradient."""
    flat = rows[:, :, None] * n_in + _column_units(cols, run)[:, None, :]
    out = slices.new_zeros(n_out * n_in)
    return out.index_add_(0, flat.reshape(-1), slices.reshape(-1), alpha=scale).view(n_out, n_in)


@torch.library.custom_op("dropkit::gather_kept", mutates_args=())
def gather_kept(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, run: int) -> torch.Tensor:
    """The kept slices ``weight[rows[g]][:, runs of cols[g]]`` of all groups, shape ``(G, k_out, k_in)``."""
    if not _use_kernel(weight):
        return gather_torch(weight, rows, cols, run)
    return _gather_into(weight, rows, cols, run, weight.new_empty(rows.shape[0], rows.shape[1], cols.shape[1] * run))


def _gather_into(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, run: int,
                 out: torch.Tensor) -> torch.Tensor:
    """The compiled gather of :func:`gather_kept`, written into ``out``."""
    run_parallel(out.numel(), _gather_kernel, weight.detach().contiguous().numpy(), rows.numpy(), cols.numpy(), run,
                 out.numpy())
    return out


@gather_kept.register_fake
def _(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, run: int) -> torch.Tensor:
    return weight.new_empty(rows.shape[0], rows.shape[1], cols.shape[1] * run)


@torch.library.custom_op("dropkit::scatter_kept", mutates_args=())
def scatter_kept(
    slices: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, run: int, scale: float, n_out: int, n_in: int
) -> torch.Tensor:
    """A zero ``(n_out, n_in)`` matrix plus ``scale`` times every group's slice at its kept rows/columns.

    The inverse of :func:`gather_kept` for gradients: slices of different groups that share an
    entry are summed.
    """
    if not _use_kernel(slices):
        return scatter_torch(slices, rows, cols, run, scale, n_out, n_in)
    out = slices.new_empty(n_out, n_in)
    values = slices.contiguous().numpy()
    # ``scale`` in the slices' own dtype: a Python float would make the kernel's adds float64
    run_parallel(slices.numel(), _scatter_kernel, values, rows.numpy(), cols.numpy(), run, values.dtype.type(scale),
                 out.numpy())
    return out


@scatter_kept.register_fake
def _(slices, rows, cols, run, scale, n_out, n_in):
    return slices.new_empty(n_out, n_in)


# --------------------------------------------------------------------------------------------
# Buffers reused across steps
# --------------------------------------------------------------------------------------------

#: storage reference count, to tell a buffer nobody holds any more (None: this torch lacks it)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(t: torch.Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)


class Workspace:
    """Buffers for a structured stack's large temporaries, handed out again from step to step.

    The gathered weight slices of a layer hold ``G * k_out * k_in`` elements: 263 MB at W = 4096,
    p = 0.3, G = 8. glibc serves any allocation above 32 MB with a fresh ``mmap``, whose every
    4 KiB page faults when first written, so a fresh buffer each step made that gather take 4x the
    time of the same gather into memory already mapped (about 400 against 90 ms on the 2-core VM).
    :meth:`empty` returns a view of a kept buffer only while no other view of it is alive: autograd
    holds the view saved for backward until backward has run, so two forwards before one backward,
    or a retained graph, get distinct buffers and nothing is overwritten that is still needed.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, tuple[torch.Tensor, int]] = {}

    def empty(self, tag: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, reused if free."""
        key = (tag, tuple(shape), like.dtype, like.device)
        held = self._buffers.get(key)
        if held is None or _storage_use_count is None or _use_count(held[0]) != held[1]:
            buffer = like.new_empty(shape)
            held = self._buffers[key] = (buffer, _use_count(buffer) if _storage_use_count else -1)
        return held[0].view(shape)

    def clear(self) -> None:
        """Let go of every buffer (their memory is freed once nothing else holds them)."""
        self._buffers.clear()


def _gather_weights(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor | None, run: int,
                    workspace: Workspace | None) -> torch.Tensor:
    """The kept slices of ``weight`` for all groups, ``(G, k_out, k_in)``; whole rows when ``cols`` is None."""
    groups, k_out = rows.shape
    if workspace is None or not _use_kernel(weight):
        if cols is None:
            return weight.index_select(0, rows.reshape(-1)).view(groups, k_out, weight.shape[1])
        return gather_kept(weight, rows, cols, run)
    k_in = weight.shape[1] if cols is None else cols.shape[1] * run
    out = workspace.empty("weights", (groups, k_out, k_in), weight)
    if cols is None:
        torch.index_select(weight, 0, rows.reshape(-1), out=out.view(groups * k_out, k_in))
        return out
    return _gather_into(weight, rows, cols, run, out)


#: choices of how the weight gradient is formed (see :func:`dense_weight_grad_pays`)
WEIGHT_GRADS = ("auto", "grouped", "dense")

#: what one element of a group's weight-gradient slice costs (its product output, its write and
#: read, its scatter-add), in multiply-adds of a dense product. Bounded by `dropkit bench structured`
#: on the 2-core AMD EPYC VM (one thread, slices in a Workspace): at p = 0.5 and 32 examples per
#: group the grouped way was still the faster (so the cost is below 96), at p = 0.3 and 64 per
#: group the dense way (so above 67); see BENCHMARKS.md
SLICE_ELEMENT_COST = 80


def dense_weight_grad_pays(batch: int, groups: int, k_out: int, k_in: int, n_out: int, n_in: int) -> bool:
    """Whether one dense ``(B, out)^T @ (B, in)`` product beats ``G`` kept-slice products for a weight gradient.

    The grouped way costs ``B * k_out * k_in`` multiply-adds plus ``G * k_out * k_in`` slice
    elements to write and scatter; the dense way ``B * n_out * n_in`` multiply-adds on zero-filled
    full-width matrices. For a hidden-to-hidden layer (both sides dropped) dense wins when groups
    are small: at p = 0.5 below about 27 examples per group, at p = 0.3 below about 77.
    """
    return (batch + SLICE_ELEMENT_COST * groups) * k_out * k_in > batch * n_out * n_in


def _spread(values: torch.Tensor, units: torch.Tensor, width: int) -> torch.Tensor:
    """``(G, n, k)`` values placed at their kept ``units`` ``(G, k)`` of a zero ``(G * n, width)`` matrix."""
    groups, n, k = values.shape
    full = values.new_zeros(groups, n, width)
    return full.scatter_(2, units[:, None, :].expand(groups, n, k), values).view(groups * n, width)


class _KeptLinear(torch.autograd.Function):
    """``y[g] = scale * x[g] @ W[rows[g], cols[g]]^T + b[rows[g]]`` on kept slices, for all groups at once.

    ``dense_grad`` forms the weight gradient with one dense product instead of per-group slices;
    ``workspace`` (if given) supplies the gathered slices and the gradient slices.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rows, cols, run, scale, dense_grad=False, workspace=None):
        w = _gather_weights(weight, rows, cols, run, workspace)
        if bias is None:
            y = torch.bmm(x, w.transpose(1, 2))
            if scale != 1.0:
                y.mul_(scale)
        else:
            y = torch.baddbmm(bias[rows].unsqueeze(1), x, w.transpose(1, 2), alpha=scale)
        ctx.save_for_backward(x, w, rows, cols)
        ctx.run, ctx.scale, ctx.weight_shape, ctx.dense_grad = run, scale, weight.shape, dense_grad
        ctx.workspace = workspace if workspace is not None and _use_kernel(x) else None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, rows, cols = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad, w)
            if ctx.scale != 1.0:
                grad_x.mul_(ctx.scale)
        if ctx.needs_input_grad[1] and ctx.dense_grad:
            n_out, n_in = ctx.weight_shape
            grad_full = _spread(grad, rows, n_out)
            x_full = x.reshape(-1, n_in) if cols is None else _spread(x, _column_units(cols, ctx.run), n_in)
            grad_w = torch.mm(grad_full.t(), x_full)
            if ctx.scale != 1.0:
                grad_w.mul_(ctx.scale)
        elif ctx.needs_input_grad[1]:
            shape = (grad.shape[0], grad.shape[2], x.shape[2])
            slices = torch.bmm(grad.transpose(1, 2), x, out=None if ctx.workspace is None
                               else ctx.workspace.empty("weight_grad_slices", shape, x))
            if cols is None:
                grad_w = slices.new_zeros(ctx.weight_shape)
                grad_w.index_add_(0, rows.reshape(-1), slices.reshape(-1, ctx.weight_shape[1]), alpha=ctx.scale)
            else:
                grad_w = scatter_kept(slices, rows, cols, ctx.run, ctx.scale, *ctx.weight_shape)
        if ctx.needs_input_grad[2]:
            grad_b = grad.new_zeros(ctx.weight_shape[0]).index_add_(0, rows.reshape(-1), grad.sum(1).reshape(-1))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------

def _check_weight_grad(weight_grad: str) -> None:
    if weight_grad not in WEIGHT_GRADS:
        raise ValueError(f"weight_grad must be one of {', '.join(WEIGHT_GRADS)}, got {weight_grad!r}")


def _all_units(groups: int, width: int, device: torch.device) -> torch.Tensor:
    return torch.arange(width, device=device).expand(groups, width).contiguous()


def structured_linear_stack(
    x: torch.Tensor,
    layers: Sequence[nn.Linear],
    kept: Sequence[KeptUnits | None],
    activation: nn.Module,
    groups: int,
    weight_grad: str = "auto",
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Training forward of ``Linear -> activation -> dropout -> ... -> Linear`` on kept slices only.

    Args:
        x: input ``(B, in_features)`` with ``B`` divisible by ``groups``; rows ``g * B/G`` to
            ``(g + 1) * B/G - 1`` form group ``g``.
        layers: the Linear layers, in order.
        kept: ``len(layers)`` entries; ``kept[0]`` are the kept input features (``None``: no input
            dropout), ``kept[l]`` the kept outputs of ``layers[l - 1]`` (``None``: that layer has
            no dropout). Each has ``groups`` rows.
        activation: elementwise activation applied after every layer but the last.
        groups: number of groups ``G``.
        weight_grad: ``"grouped"`` (per-group slices, scattered), ``"dense"`` (one zero-filled dense
            product) or ``"auto"`` (per layer, whichever :func:`dense_weight_grad_pays` says is cheaper).
        workspace: reuse its buffers for the gathered and gradient slices (not while compiling).

    Returns ``(B, out_features)``: what the dense model gives with every group's dropout mask
    (:meth:`KeptUnits.mask`) and the usual inverted-dropout scale. The logits are never dropped.
    """
    if len(kept) != len(layers):
        raise ValueError(f"need one kept entry per layer ({len(layers)}), got {len(kept)}")
    batch = x.shape[0]
    if batch % groups:
        raise ValueError(f"batch {batch} is not divisible by groups={groups}")
    _check_weight_grad(weight_grad)
    h = x.reshape(groups, batch // groups, x.shape[1])
    if kept[0] is not None:
        h = h.gather(2, kept[0].units()[:, None, :].expand(-1, h.shape[1], -1))
    for i, layer in enumerate(layers):
        out_kept = kept[i + 1] if i + 1 < len(layers) else None
        in_kept = kept[i]
        if in_kept is None and out_kept is None:
            h = F.linear(h, layer.weight, layer.bias)
        else:
            rows = out_kept.units() if out_kept is not None else _all_units(groups, layer.out_features, h.device)
            if in_kept is None:
                cols, run, scale = None, 1, 1.0
            else:
                cols, run, scale = in_kept.blocks * in_kept.block_size, in_kept.block_size, in_kept.scale
            # "auto" considers the dense way only where the slices need the column scatter: a
            # layer with all its inputs adds whole slice rows, at memory speed
            dense = weight_grad == "dense" or weight_grad == "auto" and cols is not None and dense_weight_grad_pays(
                batch, groups, rows.shape[1], h.shape[2], layer.out_features, layer.in_features)
            h = _KeptLinear.apply(h, layer.weight, layer.bias, rows, cols, run, scale, dense,
                                  None if torch.compiler.is_compiling() else workspace)
        if i + 1 < len(layers):
            h = activation(h)
    return h.reshape(batch, -1)


class StructuredLinearStack(nn.Module):
    """An MLP ``Linear -> activation -> dropout -> ... -> Linear`` whose dropout skips the dropped units' work.

    In training, every step splits the batch into ``groups`` contiguous groups (batches are
    shuffled, so this is a random split) and draws for each group and hidden layer exactly
    ``round((1 - p) * width)`` kept units (or blocks of ``block_size`` units); only their rows and
    columns of the weights enter the products. Kept activations are scaled by ``width / kept``
    (= 1/(1-p)) as in inverted dropout, so eval mode is the plain MLP with every weight.

    Args:
        sizes: layer widths ``[in, hidden..., out]``.
        p: drop rate of the hidden layers, one value for all or one per hidden layer.
        activation: elementwise activation module (default ``nn.ReLU()``).
        p_input: drop rate of the input features (single features, whatever ``block_size``).
        groups: ``G``, the number of independent kept sets per batch (1: one per batch; the
            batch size: one per example). Capped at the batch size.
        block_size: drop contiguous blocks of this many hidden units (1: single units).
        bias: whether the Linear layers have biases.
        flatten: flatten inputs to ``(B, -1)`` first (as a leading ``nn.Flatten`` does).
        seed: seeds this module's own generator; without it kept sets come from torch's global
            generator, which ``dropkit.manual_seed`` seeds.
        weight_grad: how weight gradients are formed: ``"auto"`` (per layer, the cheaper way by
            :func:`dense_weight_grad_pays`), ``"grouped"`` or ``"dense"``. Same gradients up to rounding.

    Shape: ``(B, in)`` (or ``(B, *)`` with ``flatten``) to ``(B, out)``.

    Example:
        >>> net = StructuredLinearStack([784, 1024, 1024, 10], p=0.5, groups=4)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    """

    def __init__(
        self,
        sizes: Sequence[int],
        p: float | Sequence[float] = 0.5,
        *,
        activation: nn.Module | None = None,
        p_input: float = 0.0,
        groups: int = 4,
        block_size: int = 1,
        bias: bool = True,
        flatten: bool = False,
        seed: int | None = None,
        weight_grad: str = "auto",
    ) -> None:
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least [in, out], got {list(sizes)}")
        layers = [nn.Linear(n_in, n_out, bias=bias) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        super().__init__()
        self._setup(layers, p, activation or nn.ReLU(), p_input, groups, block_size, flatten, seed, weight_grad)

    @classmethod
    def from_linears(
        cls,
        layers: Sequence[nn.Linear],
        p: float | Sequence[float] = 0.5,
        *,
        activation: nn.Module | None = None,
        p_input: float = 0.0,
        groups: int = 4,
        block_size: int = 1,
        flatten: bool = False,
        seed: int | None = None,
        weight_grad: str = "auto",
    ) -> StructuredLinearStack:
        """A stack over existing Linear modules (shared, not copied: same parameters, same optimizer)."""
        stack = cls.__new__(cls)
        nn.Module.__init__(stack)
        stack._setup(list(layers), p, activation or nn.ReLU(), p_input, groups, block_size, flatten, seed,
                     weight_grad)
        return stack

    def _setup(self, layers, p, activation, p_input, groups, block_size, flatten, seed, weight_grad) -> None:
        for a, b in zip(layers[:-1], layers[1:]):
            if a.out_features != b.in_features:
                raise ValueError(f"layer widths do not chain: {a} then {b}")
        n_hidden = len(layers) - 1
        rates = [p] * n_hidden if isinstance(p, (int, float)) else list(p)
        if len(rates) != n_hidden:
            raise ValueError(f"need {n_hidden} hidden drop rates, got {len(rates)}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        self.layers = nn.ModuleList(layers)
        self.activation = activation
        self.p = [check_p(r) for r in rates]
        self.p_input = check_p(p_input, "p_input")
        self.groups = groups
        self.block_size = block_size
        self.flatten = flatten
        for rate, layer in zip(self.p, layers):  # validate the kept counts now, not at the first step
            if rate:
                kept_count(layer.out_features, rate, block_size)
        if self.p_input:
            kept_count(layers[0].in_features, self.p_input)
        _check_weight_grad(weight_grad)
        self.weight_grad = weight_grad
        self.workspace = Workspace()
        self.seed = seed
        self.generator: torch.Generator | None = None
        if seed is not None:
            check_seed(seed)
            self.generator = torch.Generator().manual_seed(seed)

    @torch.compiler.disable
    def sample(self, groups: int) -> list[KeptUnits | None]:
        """Draw this step's kept sets: one entry per layer, as :func:`structured_linear_stack` takes them."""
        device = self.layers[0].weight.device
        generator = self.generator if self.generator is not None and device.type == "cpu" else None

        def draw(width: int, p: float, block: int) -> KeptUnits | None:
            return sample_kept(groups, width, p, block, generator=generator, device=device) if p else None

        kept = [draw(self.layers[0].in_features, self.p_input, 1)]
        kept += [draw(layer.out_features, p, self.block_size) for layer, p in zip(self.layers, self.p)]
        return kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = x.flatten(1)
        if not self.training:
            for layer in self.layers[:-1]:
                x = self.activation(layer(x))
            return self.layers[-1](x)
        batch = x.shape[0]
        groups = min(self.groups, batch)
        padded = math.ceil(batch / groups) * groups
        if padded != batch:  # pad rows get zero gradient: their outputs are cut off below
            x = F.pad(x, (0, 0, 0, padded - batch))
        out = structured_linear_stack(x, self.layers, self.sample(groups), self.activation, groups, self.weight_grad,
                                      self.workspace)
        return out[:batch]

    def train(self, mode: bool = True) -> StructuredLinearStack:
        """Set the mode; leaving training lets go of the step buffers (see :class:`Workspace`)."""
        if not mode:
            self.workspace.clear()
        return super().train(mode)

    def extra_repr(self) -> str:
        text = (f"p={self.p}, p_input={self.p_input}, groups={self.groups}, block_size={self.block_size}, "
                f"weight_grad={self.weight_grad!r}")
        return text if self.seed is None else f"{text}, seed={self.seed}"


# --------------------------------------------------------------------------------------------
# Conversion of nn.Sequential MLPs
# --------------------------------------------------------------------------------------------

def _dropout_rate(module: nn.Module) -> float | None:
    """``p`` of a plain unit-dropout module, or None if ``module`` is not one."""
    if type(module) not in _UNIT_DROPOUTS:
        return None
    if getattr(module, "mask_shape", None) is not None:
        raise ValueError(f"{module} shares its mask across dimensions; structured dropout drops single units")
    return module.p


def from_sequential(model: nn.Sequential, **options) -> StructuredLinearStack:
    """The structured twin of ``[Flatten] [Dropout] (Linear act [Dropout])* Linear``, sharing its Linear modules.

    Dropout modules (torch's or dropkit's ``Dropout``) give the rates: one before the first
    Linear is input dropout, one after an activation drops that hidden layer; a hidden layer
    with none gets p = 0. Every activation must be the same elementwise module. ``options`` are
    passed to :class:`StructuredLinearStack` (``groups``, ``block_size``, ``seed``). The train/eval
    mode is kept. Raises ``ValueError`` naming the first module that does not fit the pattern.
    """
    mods = list(model)
    i, flatten = 0, False
    if mods and isinstance(mods[0], nn.Flatten):
        if (mods[0].start_dim, mods[0].end_dim) != (1, -1):
            raise ValueError(f"only Flatten(1, -1) can lead a structured stack, got {mods[0]}")
        i, flatten = 1, True
    p_input = 0.0
    if i < len(mods) and _dropout_rate(mods[i]) is not None:
        p_input = _dropout_rate(mods[i])
        i += 1
    layers: list[nn.Linear] = []
    rates: list[float] = []
    activation: nn.Module | None = None
    while i < len(mods):
        if type(mods[i]) is not nn.Linear:
            raise ValueError(f"expected nn.Linear at position {i}, got {mods[i]}")
        layers.append(mods[i])
        i += 1
        if i == len(mods):
            break
        act = mods[i]
        if not isinstance(act, ELEMENTWISE_ACTIVATIONS):
            raise ValueError(f"expected an elementwise activation at position {i}, got {act}")
        if activation is not None and repr(act) != repr(activation):
            raise ValueError(f"all activations must match: {activation} and {act} at position {i}")
        activation = act
        i += 1
        rate = _dropout_rate(mods[i]) if i < len(mods) else None
        if rate is not None:
            i += 1
        rates.append(rate or 0.0)
    if not layers or len(rates) != len(layers) - 1:
        raise ValueError("a structured stack must end with nn.Linear (the logits are never dropped)")
    stack = StructuredLinearStack.from_linears(
        layers, rates, activation=activation, p_input=p_input, flatten=flatten, **options
    )
    return stack.train(model.training)


def to_structured(model: nn.Module, **options) -> nn.Module:
    """Structured twin of ``model`` (what ``dropkit.convert(model, structured=True)`` returns).

    ``model`` itself, if it is an ``nn.Sequential`` MLP, becomes a new
    :class:`StructuredLinearStack`; otherwise every such ``nn.Sequential`` inside it is replaced
    in place and ``model`` is returned. Weights are shared, not copied. Raises ``ValueError`` if
    nothing could be converted.
    """
    if isinstance(model, nn.Sequential):
        return from_sequential(model, **options)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Sequential):
                try:
                    setattr(parent, name, from_sequential(child, **options))
                except ValueError as err:
                    log.debug("dropkit.structured: %s left as is: %s", name, err)
                    continue
                replaced += 1
    if not replaced:
        raise ValueError("no nn.Sequential of Linear / activation / Dropout found to make structured")
    log.info("dropkit.structured: converted %d Linear stack(s)", replaced)
    return model
