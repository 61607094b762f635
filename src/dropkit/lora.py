"""LoRA dropout that keeps no dropped copy of the input for backward.

A LoRA layer adds ``B(A(dropout(x))) * scaling`` to a frozen layer's output (Hu et al., "LoRA:
Low-Rank Adaptation of Large Language Models", ICLR 2022; the dropout on the adapter's input is
PEFT's ``lora_dropout``). Composed from ordinary modules, the dropout writes a new activation-sized
tensor, and ``A`` keeps that dropped copy for its weight gradient (plus the dropout's mask): one
activation-sized tensor or more per LoRA layer, on top of ``x`` itself wherever something else keeps
it. Here ``A(dropout(x))`` is one autograd function that keeps ``x`` (which the LoRA layer keeps
without dropout too, and which several adapters on the same input share) and the 8-byte seed of
the mask; backward regenerates the mask from the seed with dropkit's counter-based kernels
(:mod:`dropkit.ops`), computes ``A``'s weight gradient from the re-dropped input and drops the
input gradient with the same mask. Outputs and gradients are those of the dense composition with
the same seed.

* :func:`dropout_linear`: ``F.linear(dropout(x), weight)`` keeping ``x`` and a seed;
* :func:`lora_dropout`: ``B(A(dropout(x))) * scaling`` on top of it;
* :class:`DropoutLinear`: an ``nn.Linear`` whose input is dropped in training (LoRA's ``A``);
* :class:`LoRADropout`: the whole adapter path as a module;
* :func:`convert_peft_lora`: swaps the dropout path of every PEFT ``lora.Linear`` layer of a model
  in place (``dropkit.convert`` calls it), keeping adapter weights, ``state_dict`` keys and the
  ``save_pretrained`` output unchanged.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from dropkit import ops, rng
from dropkit.functional import check_p
from dropkit.seeded import SeededRate

__all__ = ["DropoutLinear", "LoRADropout", "convert_peft_lora", "dropout_linear", "lora_dropout"]


class _DropoutLinear(torch.autograd.Function):
    """``F.linear(dropout(x, p, seed), weight)`` keeping ``x``, ``weight`` and the seed, not the dropped input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
        ctx.p = p
        ctx.save_for_backward(x, weight, seed)
        return F.linear(ops.dropout(x, p, seed, tuple(x.shape)), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, seed = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.dropout(grad.matmul(weight.to(grad.dtype)), ctx.p, seed, tuple(x.shape))
        if ctx.needs_input_grad[1]:
            dropped = ops.dropout(x, ctx.p, seed, tuple(x.shape))
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().matmul(dropped.reshape(-1, x.shape[-1]))
        return grad_x, grad_weight, None, None


def _check_input(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be a (out_features, in_features) matrix matching x's last dimension, got "
                         f"weight of shape {list(getattr(weight, 'shape', []))} for x of shape {list(x.shape)}")


def dropout_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    p: float = 0.1,
    *,
    training: bool,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``F.linear(dropout(x, p), weight)`` that keeps ``x`` and an 8-byte seed for backward instead
    of the dropped copy of ``x`` (the mask is regenerated in backward).

    The dropout is dropkit's inverted dropout (:func:`dropkit.functional.dropout`): the same seed
    gives the same mask, so outputs and gradients equal ``F.linear(dropout(x, p, seed=s), weight)``.
    In eval mode or at ``p = 0`` it is ``F.linear(x, weight)``.

    Args:
        x: input ``(*, in_features)``.
        weight: ``(out_features, in_features)``.
        p: drop probability of the input's elements, in [0, 1].
        training: apply dropout (required keyword).
        seed: fixes the mask; otherwise a seed is drawn from ``generator`` or torch's global generator.
        generator: the generator to draw the seed from.

    Example:
        >>> a = torch.randn(8, 64, requires_grad=True)
        >>> h = dropout_linear(torch.randn(4, 64), a, 0.1, training=True)
    """
    _check_input(x, weight)
    p = check_p(p)
    if not training or p == 0.0:
        return F.linear(x, weight)
    if p == 1.0 or x.numel() == 0:
        return F.linear(torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x, 0.0), weight)
    seed_tensor = rng.resolve_seed(seed, generator)
    return _DropoutLinear.apply(x, weight, seed_tensor, p)


def lora_dropout(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    p: float = 0.1,
    scaling: float = 1.0,
    *,
    training: bool,
    lora_b_bias: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The LoRA update ``B(A(dropout(x))) * scaling`` keeping, for backward, only what it keeps
    without dropout (``x``, the rank-sized ``A(.)`` and the weights) plus an 8-byte seed.

    ``scaling`` is PEFT's ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). Outputs and
    gradients (``x``, ``lora_a``, ``lora_b``) equal those of the composition
    ``F.linear(F.linear(dropout(x, p, seed=s), lora_a), lora_b, lora_b_bias) * scaling``.

    Args:
        x: input ``(*, in_features)``.
        lora_a: ``A``'s weight, ``(r, in_features)``.
        lora_b: ``B``'s weight, ``(out_features, r)``.
        p: PEFT's ``lora_dropout``, in [0, 1].
        scaling: factor of the update.
        training: apply dropout (required keyword).
        lora_b_bias: ``B``'s bias (PEFT's ``lora_bias=True``), or None.
        seed, generator: as in :func:`dropout_linear`.

    Shape: ``(*, in_features)`` -> ``(*, out_features)``.

    Example:
        >>> a, b = torch.randn(8, 64), torch.zeros(32, 8)
        >>> delta = lora_dropout(torch.randn(4, 64), a, b, 0.1, 2.0, training=True)
    """
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite float, got {scaling!r}")
    h = dropout_linear(x, lora_a, p, training=training, seed=seed, generator=generator)
    return F.linear(h, lora_b, lora_b_bias) * scaling


class DropoutLinear(SeededRate, nn.Linear):
    """An ``nn.Linear`` whose input is dropped with rate ``p`` in training (:func:`dropout_linear`):
    ``F.linear(dropout(x), weight) + bias`` keeping ``x`` and a seed for backward, not the dropped
    input. In eval mode it is the plain ``nn.Linear``. Its parameters and ``state_dict`` keys are
    ``nn.Linear``'s, so it can stand in for LoRA's ``A`` projection.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        p: drop probability of the input's elements, in [0, 1]; may be changed between steps.
        seed: seeds this layer's own generator, saved in ``state_dict`` (otherwise torch's global one is used).

    Shape: ``(*, in_features)`` -> ``(*, out_features)``.

    Example:
        >>> a = DropoutLinear(64, 8, p=0.1, bias=False)
        >>> h = a(torch.randn(4, 64))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 p: float = 0.1, seed: int | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_rate_and_seed(p, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = dropout_linear(x, self.weight, self.p, training=self.training, generator=self.generator)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return self._seed_repr(f"{super().extra_repr()}, p={self.p}")


class LoRADropout(nn.Module):
    """The LoRA adapter path ``lora_B(lora_A(dropout(x))) * scaling`` (Hu et al. 2022) with the
    dropout inside ``lora_A`` (:class:`DropoutLinear`), so backward keeps ``x`` and a seed rather
    than a dropped copy of ``x``. ``lora_A`` and ``lora_B`` are initialised as PEFT initialises them
    by default (Kaiming-uniform ``A``, zero ``B``), so a new adapter starts as the zero update.

    Args:
        in_features: the adapted layer's input size.
        out_features: its output size.
        r: the rank.
        p: the dropout rate on the input (PEFT's ``lora_dropout``).
        alpha: ``scaling = alpha / r`` (PEFT's ``lora_alpha``).

    Shape: ``(*, in_features)`` -> ``(*, out_features)``.

    Example:
        >>> path = LoRADropout(64, 64, r=8, p=0.1, alpha=16)
        >>> y = frozen(x) + path(x)  # doctest: +SKIP
    """

    def __init__(self, in_features: int, out_features: int, r: int, p: float = 0.1, alpha: float = 8.0) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("r", r)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.lora_A = DropoutLinear(in_features, r, bias=False, p=p)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scaling

    def extra_repr(self) -> str:
        return f"scaling={self.scaling}"


def convert_peft_lora(model: nn.Module) -> int:
    """In every PEFT ``lora.Linear`` layer of ``model``, move each adapter's ``lora_dropout`` into its
    ``lora_A`` projection, in place: ``lora_A[name]`` becomes a :class:`DropoutLinear` holding the
    very same weight ``Parameter`` and the dropout's rate, and ``lora_dropout[name]`` becomes
    ``nn.Identity``. PEFT's own forward then computes ``lora_B(lora_A(x))`` with the same value as
    before, while backward keeps ``x`` and a seed instead of a dropped copy of ``x`` per layer.

    Parameter names, ``state_dict`` keys, the adapter config and so ``save_pretrained``'s output stay
    as they were; the masks come from dropkit's generator (``dropkit.manual_seed``), not torch's
    ``nn.Dropout``. Left alone: adapters with no dropout (rate 0), LoRA variants (DoRA and the other
    entries of ``lora_variant``), and layers that are not PEFT's ``lora.Linear``. Returns the number
    of adapters converted. PEFT need not be installed: without it no model has such layers.

    Example:
        >>> model = get_peft_model(base, LoraConfig(r=8, lora_dropout=0.1))  # doctest: +SKIP
        >>> convert_peft_lora(model)  # doctest: +SKIP
        64
    """
    layer_module = sys.modules.get("peft.tuners.lora.layer")
    if layer_module is None:  # PEFT not imported: the model has no PEFT layers
        return 0
    converted = 0
    for layer in model.modules():
        if not isinstance(layer, layer_module.Linear):
            continue
        variants = getattr(layer, "lora_variant", {})
        for name, drop in list(layer.lora_dropout.items()):
            a = layer.lora_A[name] if name in layer.lora_A else None
            if (type(drop) is not nn.Dropout or drop.p == 0.0 or name in variants or type(a) is not nn.Linear
                    or a.bias is not None):
                continue
            twin = DropoutLinear(a.in_features, a.out_features, bias=False, device="meta", p=drop.p)
            twin.weight = a.weight
            twin.train(a.training)
            layer.lora_A[name] = twin
            layer.lora_dropout[name] = nn.Identity()
            converted += 1
    return converted
