"""Export a model with dropout kept on at inference, the seed an input of the graph (MC dropout in ONNX).

Exporters drop dropout: in eval mode it is the identity, and in training mode torch's exporters
either bake one random mask into the graph (``jit.trace``), fix the seed as an attribute (ONNX's
``Dropout`` and ``RandomUniformLike`` take it as an attribute, not an input) or stop at dropkit's
custom op. :func:`mc_export_module` instead rebuilds each dropout module of a copy of the model
from plain tensor operations that draw dropkit's own masks from a seed tensor, so the exported
graph takes ``(x, seed)`` and a runtime gets a different, repeatable set of masks per seed.

The exported mask is dropkit's, bit for bit. Dropout module ``i`` (in ``modules()`` order) uses the
63-bit seed :func:`module_seed` ``(seed, i)``: the first two words of Philox4x32-10 (the generator of
:mod:`dropkit.rng`) at counter ``(i, 0, 0, 0)`` under the key ``seed``, ``(w1 & 0x7FFFFFFF) << 32 | w0``.
Its keep mask is :func:`dropkit.kernels.reference.keep_mask` of that seed (:func:`keep_mask`), the very mask
``dropkit.functional.dropout(x, p, training=True, seed=module_seed(seed, i))`` draws, with the
rate quantised as :mod:`dropkit.rng` documents. The Philox rounds become 64-bit integer
multiplications, additions, shifts and bitwise operations (ONNX opset 18), about 200 nodes per
dropout module.

Modules it converts: dropkit's and torch's ``Dropout`` (element-wise, or dropkit's with a
``mask_shape``), ``Dropout1d/2d/3d`` (one draw per channel) and dropkit's ``ReLUDropout``. A model
with other dropout (alpha, Gaussian, DropBlock, Concrete, structured, attention dropout) is
refused, naming the module. Torch's fused transformer inference path is turned off while the
model is traced, since it never calls the dropout modules.

Needs the ``onnx`` extra (``pip install dropkit[onnx]``) to export.

Example:
    >>> export_onnx(model, torch.randn(32, 784), "mc.onnx")
    >>> runtime = onnxruntime.InferenceSession("mc.onnx")
    >>> passes = [runtime.run(None, {"x": x, "seed": np.array(s, dtype=np.int64)})[0] for s in range(30)]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dropkit import nn as dnn
from dropkit import rng

__all__ = ["SeededDropout", "export_onnx", "keep_mask", "mc_export_module", "mc_fast_path_off", "module_seed"]

_CONVERTIBLE = (dnn.Dropout, dnn.ReLUDropout, dnn.Dropout1d, dnn.Dropout2d, dnn.Dropout3d,
                nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_OTHER_DROPOUT = (dnn.DropoutLayer, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _derive(seed: torch.Tensor, index: int) -> torch.Tensor:
    """The seed of dropout module ``index`` as an int64 tensor (see the module docstring)."""
    counter = torch.full_like(seed, index)
    zeros = torch.zeros_like(seed)
    key = (seed & rng.MASK32, (seed >> 32) & rng.MASK32)
    w0, w1, _, _ = rng.philox4x32_block((counter, zeros, zeros, zeros), key)
    return ((w1 & 0x7FFFFFFF) << 32) | w0


def keep_mask(seed: torch.Tensor, p: float, shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`dropkit.kernels.reference.keep_mask` (offset 0) for a seed tensor, in operations every
    ONNX exporter converts: each ``w``-bit field is cut out of the Philox words by a shift by a
    constant, where the reference shifts by a tensor of amounts."""
    numel = math.prod(shape)
    width, thr = rng.keep_threshold(p)
    n_counters = -(-numel * width // rng.BITS_PER_COUNTER)
    words = torch.stack(rng.philox4x32(torch.arange(n_counters, dtype=torch.int64), seed), dim=1)
    fields = torch.stack([(words >> shift) & ((1 << width) - 1) for shift in range(0, 32, width)], dim=2)
    return (fields.reshape(-1)[:numel] >= thr).reshape(shape)


def module_seed(seed: int, index: int) -> int:
    """The seed the exported graph gives dropout module ``index`` for the graph input ``seed``.

    ``dropkit.functional.dropout(x, p, training=True, seed=module_seed(seed, i))`` draws the mask
    that the exported graph applies at module ``i``.
    """
    rng.check_seed(seed)
    return int(_derive(torch.tensor(seed, dtype=torch.int64), index))


class SeededDropout(nn.Module):
    """Dropout (or ReLU then dropout) whose mask comes from a seed tensor, in plain tensor operations.

    Args:
        p: drop probability in (0, 1).
        index: the module's position; its seed is :func:`module_seed` ``(seed, index)``.
        channel_dims: 0 for an element-wise mask, else the number of trailing spatial dimensions
            that share one draw (``Dropout2d``: 2).
        mask_shape: a dropkit ``mask_shape`` (1 shares a draw along a dimension), or None.
        relu: apply ReLU first (dropkit's ``ReLUDropout``).

    Shape: any; output has the input's shape. ``forward(x, seed)`` with ``seed`` an int64 tensor.
    """

    def __init__(self, p: float, index: int, *, channel_dims: int = 0, mask_shape: tuple | None = None,
                 relu: bool = False) -> None:
        super().__init__()
        self.p, self.index, self.channel_dims, self.mask_shape, self.relu = p, index, channel_dims, mask_shape, relu

    def forward(self, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        if self.relu:
            x = torch.relu(x)
        if self.p == 0.0:
            return x
        if self.p == 1.0:
            return torch.zeros_like(x)
        if self.channel_dims:
            shape = tuple(x.shape[:x.dim() - self.channel_dims]) + (1,) * self.channel_dims
        elif self.mask_shape is not None:
            shape = tuple(s if m is None else m for m, s in zip(self.mask_shape, x.shape))
        else:
            shape = tuple(x.shape)
        keep = keep_mask(_derive(seed, self.index), self.p, shape)
        return torch.where(keep, x / (1.0 - self.p), torch.zeros((), dtype=x.dtype))

    def extra_repr(self) -> str:
        return f"p={self.p}, index={self.index}"


class _SeedHolder:
    """The current graph input ``seed``, read by every :class:`_Bound` module during one forward."""

    seed: torch.Tensor | None = None


class _Bound(nn.Module):
    def __init__(self, layer: SeededDropout, holder: _SeedHolder) -> None:
        super().__init__()
        self.layer, self.holder = layer, holder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, self.holder.seed)


class _MCModel(nn.Module):
    def __init__(self, model: nn.Module, holder: _SeedHolder) -> None:
        super().__init__()
        self.model, self.holder = model, holder

    def forward(self, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        self.holder.seed = seed.reshape(()).to(torch.int64)
        try:
            return self.model(x)
        finally:
            self.holder.seed = None


def _seeded(module: nn.Module, index: int) -> SeededDropout:
    channel = {nn.Dropout1d: 1, nn.Dropout2d: 2, nn.Dropout3d: 3, dnn.Dropout1d: 1, dnn.Dropout2d: 2,
               dnn.Dropout3d: 3}.get(type(module), 0)
    return SeededDropout(module.p, index, channel_dims=channel, mask_shape=getattr(module, "mask_shape", None),
                         relu=isinstance(module, dnn.ReLUDropout))


def mc_export_module(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose dropout stays on, as a module ``(x, seed) -> y``.

    Each convertible dropout module (see the module docstring) becomes a :class:`SeededDropout`
    numbered in ``modules()`` order; the original model is not changed. Export the result with
    ``torch.onnx.export`` (inputs ``(x, seed)``, ``seed`` an int64 tensor) inside
    :func:`mc_fast_path_off`. Raises ``ValueError`` naming a dropout module it cannot convert, or
    when there is none.
    """
    copied = copy.deepcopy(model).eval()
    holder = _SeedHolder()
    index = 0
    for parent_name, parent in list(copied.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) in _CONVERTIBLE:
                setattr(parent, name, _Bound(_seeded(child, index), holder))
                index += 1
            elif isinstance(child, _OTHER_DROPOUT) or (isinstance(child, nn.MultiheadAttention) and child.dropout > 0):
                raise ValueError(f"{full} ({type(child).__name__}) cannot be exported with its dropout on; "
                                 "convertible: Dropout, Dropout1d/2d/3d, ReLUDropout")
            elif type(child).__name__ in ("ConcreteDropout", "StructuredLinearStack"):
                raise ValueError(f"{full} ({type(child).__name__}) cannot be exported with its dropout on")
    if index == 0:
        raise ValueError(f"model ({type(model).__name__}) has no dropout module to keep on")
    return _MCModel(copied, holder).eval()


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, optimize: bool = True) -> Path:
    """Write ``model`` with its dropout on as an ONNX file with inputs ``x`` (shaped like ``example``)
    and ``seed`` (an int64 scalar) and output ``y``, through torch's ``dynamo`` exporter (opset 18).

    Run it with onnxruntime as ``runtime.run(None, {"x": x, "seed": np.array(s, dtype=np.int64)})``;
    the shapes are fixed to ``example``'s. Returns the path written.
    """
    wrapped = mc_export_module(model)
    path = Path(path)
    with mc_fast_path_off():
        torch.onnx.export(wrapped.eval(), (example, torch.tensor(0, dtype=torch.int64)), str(path), input_names=["x", "seed"],
                          output_names=["y"], dynamo=True, opset_version=18, optimize=optimize, verbose=False)
    return path


@contextmanager
def mc_fast_path_off() -> Iterator[None]:
    """Turn off torch's fused transformer inference path (which skips dropout); restore on exit."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


