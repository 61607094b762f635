"""DropPath (stochastic depth) that runs a residual branch only on the samples it keeps.

``x + drop_path(branch(x))`` computes ``branch`` for the whole batch and then multiplies the rows
of the dropped samples by zero. :func:`drop_path_residual` draws the per-sample keep mask first,
gathers the kept rows, runs ``branch`` on them alone and adds the scaled result back onto ``x``
(``index_add``), so a rate ``p`` skips a fraction ``p`` of the branch's arithmetic, forward and
backward. For the same kept set it gives the dense composition's outputs and gradients (inputs and
the branch's weights), provided the branch treats each sample on its own.

Batch-dependent branches. A branch whose output for one sample depends on the other samples of
the batch (``BatchNorm`` in training mode, batch-level attention or pooling, a loss computed
inside the branch) sees only the kept samples here, so its statistics differ from the dense
composition's; ``BatchNorm``'s running averages are then updated from the kept samples only (and
under ``torch.compile``, from the padding rows too, see below). Per-sample layers (``LayerNorm``,
``RMSNorm``, ``GroupNorm``, convolutions, attention within a sample, MLPs) are exact. ViT, Swin and
ConvNeXt blocks are per-sample.

Masks come from :mod:`dropkit.rng`: without ``seed`` or ``generator`` each call draws a seed from
torch's global generator (``dropkit.manual_seed`` makes a run repeat), and sample ``i`` is kept
with the same draw as in ``dropkit.functional.drop_path`` with that seed.

``torch.compile``. The mask and the kept rows' indices are drawn outside the graph (one graph
break per call); the kept count varies from step to step, and a branch compiled for each count
would recompile every step. Under compilation the kept rows are therefore padded to one of
``buckets`` sizes (multiples of ``ceil(N / buckets)``) with dropped rows whose result is
multiplied by zero, so a branch is compiled at most ``buckets + 1`` times whatever the counts.
Eager mode gathers exactly the kept rows.

Rewiring existing models. :func:`rewire_residual_blocks` points the residual blocks of timm's
ViT and ConvNeXt and torchvision's Swin and ConvNeXt at :func:`drop_path_residual` in place,
keeping their modules, parameters and ``state_dict`` keys; their own drop-path modules still hold
the rates. Blocks of one's own use :class:`DropPathResidual` when the branch is a module, or call
:func:`drop_path_residual` in ``forward``::

    def forward(self, x):
        x = drop_path_residual(x, lambda t: self.attn(self.norm1(t)), self.p1, training=self.training)
        return drop_path_residual(x, lambda t: self.mlp(self.norm2(t)), self.p2, training=self.training)

Paper: Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from dropkit import kernels, rng
from dropkit.functional import check_p
from dropkit.seeded import SeededRate

__all__ = ["DEFAULT_BUCKETS", "DropPathResidual", "bucket_size", "drop_path_residual", "rewire_residual_blocks"]

#: how many padded sizes a kept batch takes under ``torch.compile``
DEFAULT_BUCKETS = 8


def bucket_size(kept: int, batch: int, buckets: int) -> int:
    """The padded row count for ``kept`` of ``batch`` samples: the smallest multiple of
    ``ceil(batch / buckets)`` that holds them, at most ``batch`` (0 stays 0)."""
    step = -(-batch // buckets)
    return min(batch, -(-kept // step) * step)


def _check_buckets(buckets: int) -> int:
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be a positive int, got {buckets!r}")
    return buckets


@torch.compiler.disable
def _kept_rows(x: torch.Tensor, p: float, scale: float, seed: int | None, generator: torch.Generator | None,
               buckets: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices of the rows to run the branch on and, when padded, each row's weight.

    Without ``buckets``: the kept rows in increasing order and ``None``. With ``buckets``: the kept
    rows, then as many dropped rows as the bucket needs, and weights ``scale`` (kept) / 0 (padding).
    """
    batch = x.shape[0]
    # one draw per sample: drawn on the CPU (the same stream on every device), only indices move
    keep = kernels.keep_mask(int(rng.resolve_seed(seed, generator)), p, (batch,))
    if buckets is None:
        return keep.nonzero().squeeze(1).to(x.device, non_blocking=True), None
    kept = int(keep.sum())
    size = bucket_size(kept, batch, buckets)
    rows = torch.argsort((~keep).to(torch.uint8), stable=True)[:size]
    weights = torch.zeros(size, dtype=x.dtype)
    weights[:kept] = scale
    return rows.to(x.device, non_blocking=True), weights.to(x.device, non_blocking=True)


def drop_path_residual(
    x: torch.Tensor,
    branch: Callable[[torch.Tensor], torch.Tensor],
    p: float = 0.1,
    *,
    training: bool,
    scale_by_keep: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    buckets: int = DEFAULT_BUCKETS,
) -> torch.Tensor:
    """``x + drop_path(branch(x), p)`` with ``branch`` run on the kept samples only.

    Each sample (index along dimension 0) is kept with probability ``1 - p``; its row becomes
    ``x + branch(x) / (1 - p)`` (``x + branch(x)`` with ``scale_by_keep=False``) and a dropped
    sample's row is ``x`` itself. ``branch`` must map a ``(k, ...)`` batch to a ``(k, ...)`` batch of
    the residual's shape for any ``k``, and is called on the kept rows only (see the module
    docstring for batch-dependent branches). When no sample is kept the branch is not called and
    its parameters get no gradient. In eval mode (or at ``p = 0``) it is ``x + branch(x)``.

    Args:
        x: the residual stream, batch first.
        branch: the residual branch.
        p: drop probability of the branch per sample, in [0, 1].
        training: apply the drop (required keyword, as in :mod:`dropkit.functional`).
        scale_by_keep: scale the kept branches by ``1 / (1 - p)``.
        seed: fixes the kept set (same seed, the same set as ``dropkit.functional.drop_path``).
        generator: draws the seed from this generator instead of torch's global one.
        buckets: padded row counts under ``torch.compile`` (see the module docstring).

    Example:
        >>> mlp = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))
        >>> y = drop_path_residual(torch.randn(8, 4, 16), mlp, 0.2, training=True)
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"x must be a floating-point tensor with a batch dimension, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else f'{x.dtype} of shape {list(x.shape)}'}")
    if not callable(branch):
        raise TypeError(f"branch must be callable, got {type(branch).__name__}")
    p = check_p(p)
    _check_buckets(buckets)
    if not training or p == 0.0:
        return x + branch(x)
    if p == 1.0 or x.shape[0] == 0:
        return x.clone()
    scale = 1.0 / (1.0 - p) if scale_by_keep else 1.0
    padded = torch.compiler.is_compiling()
    rows, weights = _kept_rows(x, p, scale, seed, generator, buckets if padded else None)
    if rows.shape[0] == 0:
        return x.clone()
    if weights is None and rows.shape[0] == x.shape[0]:
        return x + branch(x) * scale
    out = branch(x.index_select(0, rows)).to(x.dtype)
    if weights is None:
        return x.index_add(0, rows, out, alpha=scale)
    return x.index_add(0, rows, out * weights.view((-1,) + (1,) * (out.dim() - 1)))


class DropPathResidual(SeededRate, nn.Module):
    """A residual block with stochastic depth, ``x + drop_path(branch(x))``, that runs ``branch``
    only on the samples it keeps (:func:`drop_path_residual`): a rate ``p`` skips a fraction ``p``
    of the branch's work, with the outputs and gradients of the dense composition for the same kept
    set. In eval mode it is ``x + branch(x)``.

    ``branch`` is a child module, so its parameters appear under ``branch.`` in the state dict.
    The branch should treat samples independently: ``BatchNorm`` inside it sees only the kept
    samples (see :mod:`dropkit.residual`).

    Args:
        branch: the residual branch, mapping ``(k, ...)`` to ``(k, ...)`` of the input's shape.
        p: drop probability per sample, in [0, 1]; may be changed between steps.
        scale_by_keep: scale the kept branches by ``1 / (1 - p)``.
        seed: seeds this layer's own generator, saved in ``state_dict`` (otherwise torch's global one is used).
        buckets: padded row counts under ``torch.compile``.

    Shape: ``(N, *)`` in and out.

    Example:
        >>> block = DropPathResidual(nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64)), p=0.2)
        >>> y = block(torch.randn(32, 10, 64))
    """

    def __init__(self, branch: nn.Module, p: float = 0.1, *, scale_by_keep: bool = True, seed: int | None = None,
                 buckets: int = DEFAULT_BUCKETS) -> None:
        super().__init__()
        if not isinstance(branch, nn.Module):
            raise TypeError(f"branch must be an nn.Module, got {type(branch).__name__}")
        self.branch = branch
        self._init_rate_and_seed(p, seed)
        self.scale_by_keep = scale_by_keep
        self.buckets = _check_buckets(buckets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path_residual(x, self.branch, self.p, training=self.training, scale_by_keep=self.scale_by_keep,
                                  generator=self.generator, buckets=self.buckets)

    def extra_repr(self) -> str:
        text = f"p={self.p}"
        if not self.scale_by_keep:
            text += ", scale_by_keep=False"
        return self._seed_repr(text)


# --- rewiring the residual blocks of timm and torchvision models -------------------------------------

def _rate(module: nn.Module) -> tuple[float, bool] | None:
    """``(p, scale_by_keep)`` of a per-sample drop-path module, ``(0, True)`` for ``nn.Identity``,
    ``None`` for anything else (the block is then left as it is)."""
    if isinstance(module, nn.Identity):
        return 0.0, True
    name = type(module).__name__
    if name == "DropPath" and hasattr(module, "drop_prob"):  # timm
        return float(module.drop_prob), bool(getattr(module, "scale_by_keep", True))
    if name == "StochasticDepth" and getattr(module, "mode", None) == "row":  # torchvision
        return float(module.p), True
    if name == "DropPath" and type(module).__module__ == "dropkit.nn" and module.mode == "row":  # after convert
        return float(module.p), bool(module.scale_by_keep)
    return None


def _residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], drop: nn.Module) -> torch.Tensor:
    p, scale_by_keep = _rate(drop)
    return drop_path_residual(x, branch, p, training=drop.training, scale_by_keep=scale_by_keep,
                              generator=getattr(drop, "generator", None))


def _timm_vit_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      is_causal: bool = False) -> torch.Tensor:
    if attn_mask is not None:  # a mask may be per sample: keep the dense path
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    x = _residual(x, lambda t: self.ls1(self.attn(self.norm1(t), attn_mask=None, is_causal=is_causal)), self.drop_path1)
    return _residual(x, lambda t: self.ls2(self.mlp(self.norm2(t))), self.drop_path2)


def _timm_convnext_branch(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv_dw(x)
    if self.use_conv_mlp:
        x = self.mlp(self.norm(x))
    else:
        x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    return x if self.gamma is None else x.mul(self.gamma.reshape(1, -1, 1, 1))


def _timm_convnext_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(self.shortcut, nn.Identity):  # the branch and the shortcut see different inputs
        return type(self).forward(self, x)
    return _residual(x, lambda t: _timm_convnext_branch(self, t), self.drop_path)


def _tv_swin_forward(self, x: torch.Tensor) -> torch.Tensor:
    x = _residual(x, lambda t: self.attn(self.norm1(t)), self.stochastic_depth)
    return _residual(x, lambda t: self.mlp(self.norm2(t)), self.stochastic_depth)


def _tv_swin_v2_forward(self, x: torch.Tensor) -> torch.Tensor:
    x = _residual(x, lambda t: self.norm1(self.attn(t)), self.stochastic_depth)
    return _residual(x, lambda t: self.norm2(self.mlp(t)), self.stochastic_depth)


def _tv_convnext_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _residual(x, lambda t: self.layer_scale * self.block(t), self.stochastic_depth)


def _block_forwards() -> list[tuple[type, Callable, tuple[str, ...]]]:
    """``(block class, rewired forward, drop-path attributes)`` for each installed library.

    The order matters: a subclass (torchvision's Swin V2 block) comes before its base.
    """
    found = []
    try:
        from timm.models.convnext import ConvNeXtBlock
        from timm.models.vision_transformer import Block
    except ImportError:
        pass
    else:
        found += [(Block, _timm_vit_forward, ("drop_path1", "drop_path2")),
                  (ConvNeXtBlock, _timm_convnext_forward, ("drop_path",))]
    try:
        from torchvision.models.convnext import CNBlock
        from torchvision.models.swin_transformer import SwinTransformerBlock, SwinTransformerBlockV2
    except ImportError:
        pass
    else:
        found += [(SwinTransformerBlockV2, _tv_swin_v2_forward, ("stochastic_depth",)),
                  (SwinTransformerBlock, _tv_swin_forward, ("stochastic_depth",)),
                  (CNBlock, _tv_convnext_forward, ("stochastic_depth",))]
    return found


def rewire_residual_blocks(model: nn.Module) -> int:
    """Make the residual blocks of ``model`` run their branches on the kept samples only, in place.

    Rewired: timm's ViT ``Block`` and ``ConvNeXtBlock`` (when its shortcut is the identity), and
    torchvision's ``SwinTransformerBlock`` (V1 and V2) and ConvNeXt ``CNBlock``; a block whose
    drop-path module is neither timm's ``DropPath``, torchvision's ``StochasticDepth`` in ``"row"``
    mode, dropkit's ``DropPath`` in ``"row"`` mode (what :func:`dropkit.convert` puts in their place)
    nor ``nn.Identity`` is left alone. Each block keeps its class, submodules, parameters and
    so its ``state_dict`` keys; only its ``forward`` (an instance attribute) changes, computing the
    same function through :func:`drop_path_residual`. The rates are read from the block's own
    drop-path modules on every call, so code that changes them between steps still works, and the
    masks are drawn from their generator if they have one (a seeded dropkit ``DropPath``), else from
    torch's global generator (``dropkit.manual_seed``). A timm ViT block
    called with an ``attn_mask`` runs its original forward. Calling it again rewires nothing new.
    Returns the number of blocks rewired.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_small_patch16_224", drop_path_rate=0.2)
        >>> rewire_residual_blocks(model)
        12
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    forwards = _block_forwards()
    rewired = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), types.MethodType):
            continue  # already rewired (or given a forward of its own)
        for cls, forward, drops in forwards:
            if isinstance(module, cls):
                if all(_rate(getattr(module, name)) is not None for name in drops):
                    module.forward = types.MethodType(forward, module)
                    rewired += 1
                break
    return rewired
