"""Differentiable primitives under :mod:`dropkit.functional`, registered as torch custom ops.

Each primitive applies noise drawn from :mod:`dropkit.rng`'s counter-based streams over a
``mask_shape`` that broadcasts to the input. The element-wise cases run as ``torch.library`` custom
ops in the ``dropkit`` namespace, each with an autograd formula and a fake (meta) implementation,
so ``torch.compile(model, fullgraph=True)`` traces through them without graph breaks; on the CPU
they dispatch to the numba kernels of :mod:`dropkit.kernels` (float32, float64, bfloat16; float16
through the float32 kernels) and elsewhere to the plain-torch reference. In eager mode the masked
ops on the kernels skip the custom-op layer (:class:`_EagerMasked`); a compiled graph uses the ops.

What backward keeps (``saved``):

* ``"seed"`` (default): only the seed (a Python int on the autograd node in eager mode, an 8-byte
  tensor in a compiled graph); backward regenerates the mask from it, so nothing is kept per
  element. The gradient of dropout is dropout of the gradient with the same mask, so the
  backward runs the very same kernel.
* ``"bits"``: forward also writes the keep mask packed 1 bit per element (0.125 bytes per element)
  and backward reads it instead of running Philox again. Only the mask-based ops have it: Gaussian
  noise is not a bit mask.

ReLU followed by dropout (:func:`relu_dropout`) is one op of its own, one pass forward and one
backward. Its gradient needs no mask at all: a unit's output is non-zero exactly where the unit was
kept and its input was positive, so backward reads the op's output, the very tensor the next layer
keeps for its own weight gradient. Fused, a ``Linear -> ReLU -> Dropout`` block keeps one tensor per
element where the unfused one keeps two (ReLU's output and dropout's).

Masks shared along dimensions (channel, locked, path variants: ``mask_shape`` with 1s) are small:
:func:`keep_mask` draws them on the input's device with that device's kernel (Triton for CUDA
tensors, eager and compiled, so no mask is drawn on the CPU and copied over) and ``torch.where``
broadcasts them; autograd keeps that small mask, not one per element.

A mask depends only on the seed, which :func:`dropkit.rng.resolve_seed` draws from torch's
generator, so ``torch.utils.checkpoint`` (which restores that generator before recomputing)
reproduces the identical mask and gradients.
"""

from __future__ import annotations

import math

import torch

from dropkit import _compiled_ops, kernels, rng
from dropkit.kernels import reference

__all__ = ["FUSED_SAVED", "SAVED_MODES", "SELU_SATURATION", "alpha_dropout", "alpha_dropout_affine", "bias_act_dropout", "dropout",
           "fused_kernel", "gaussian_dropout", "gaussian_noise", "keep_mask", "relu_dropout", "transformed", "triton_ops"]

#: SELU's negative saturation value (Klambauer et al. 2017), the value dropped units take
SELU_SATURATION = reference.SELU_SATURATION

#: what backward keeps: the seed (mask regenerated) or the mask packed one bit per element
SAVED_MODES = ("seed", "bits")

#: the masked op that computes the gradient of each one (all are linear in x but alpha)
_GRAD_KIND = {"dropout": "dropout", "alpha": "alpha_grad", "alpha_grad": "alpha_grad"}


# --- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("dropkit::masked", mutates_args=())
def _masked(x: torch.Tensor, seed: torch.Tensor, p: float, kind: str) -> torch.Tensor:
    """``keep ? f(x) : c`` (reference.KINDS) with the element-wise mask regenerated from ``seed``."""
    return kernels.masked(x, int(seed), p, kind)[0]


@torch.library.custom_op("dropkit::masked_save_bits", mutates_args=())
def _masked_save_bits(x: torch.Tensor, seed: torch.Tensor, p: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_masked` that also returns the keep mask packed one bit per element."""
    out, bits = kernels.masked(x, int(seed), p, kind, save_bits=True)
    return out, bits


@torch.library.custom_op("dropkit::masked_from_bits", mutates_args=())
def _masked_from_bits(x: torch.Tensor, bits: torch.Tensor, p: float, kind: str) -> torch.Tensor:
    """``keep ? f(x) : c`` with the keep mask read from a packed bit mask."""
    return kernels.masked_from_bits(x, bits, p, kind)


@torch.library.custom_op("dropkit::gaussian", mutates_args=())
def _gaussian(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``x * (1 + sigma z)`` with element-wise noise regenerated from ``seed``."""
    return kernels.gaussian(x, int(seed), p)


@torch.library.custom_op("dropkit::keep_mask", mutates_args=())
def _keep_mask(seed: torch.Tensor, p: float, shape: list[int], device: torch.device) -> torch.Tensor:
    """Boolean keep mask of ``shape`` drawn from ``seed`` on ``device``."""
    return kernels.keep_mask(int(seed), p, tuple(shape), device=device)


@torch.library.custom_op("dropkit::gaussian_noise", mutates_args=())
def _gaussian_noise(seed: torch.Tensor, p: float, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Gaussian dropout's multiplier ``1 + sigma z`` of ``shape`` in ``dtype``."""
    return reference.gaussian_multiplier(int(seed), p, tuple(shape), dtype, device=seed.device).to(dtype)


@torch.library.custom_op("dropkit::relu_dropout", mutates_args=())
def _relu_dropout(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``keep ? relu(x) / (1 - p) : 0`` with the element-wise mask regenerated from ``seed``."""
    return kernels.masked(x, int(seed), p, "relu_dropout")[0]


@_masked.register_fake
@_masked_from_bits.register_fake
@_relu_dropout.register_fake
@_gaussian.register_fake
def _masked_fake(x, *_):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_masked_save_bits.register_fake
def _masked_save_bits_fake(x, seed, p, kind):
    bits = x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)
    return torch.empty_like(x, memory_format=torch.contiguous_format), bits


@_keep_mask.register_fake
def _keep_mask_fake(seed, p, shape, device):
    return torch.empty(shape, dtype=torch.bool, device=device)


@_gaussian_noise.register_fake
def _gaussian_noise_fake(seed, p, shape, dtype):
    return seed.new_empty(shape, dtype=dtype)


def _save_seed_and_kind(ctx, inputs, output) -> None:
    _, seed, ctx.p, ctx.kind = inputs
    ctx.save_for_backward(seed)


def _save_second_input_and_p(ctx, inputs, output) -> None:
    """For ops called as ``(tensor, seed, p)``: keep the seed and ``p``."""
    _, kept, ctx.p = inputs
    ctx.save_for_backward(kept)


def _masked_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return _masked(grad, seed, ctx.p, _GRAD_KIND[ctx.kind]), None, None, None


def _save_bits(ctx, inputs, output) -> None:
    _, _, ctx.p, ctx.kind = inputs
    ctx.save_for_backward(output[1])


def _from_bits_backward(ctx, grad, _grad_bits=None):
    (bits,) = ctx.saved_tensors
    return _masked_from_bits(grad, bits, ctx.p, _GRAD_KIND[ctx.kind]), None, None, None


def _save_given_bits(ctx, inputs, output) -> None:
    _, bits, ctx.p, ctx.kind = inputs
    ctx.save_for_backward(bits)


def _gaussian_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return _gaussian(grad, seed, ctx.p), None, None


def _save_output_and_p(ctx, inputs, output) -> None:
    ctx.p = inputs[2]
    ctx.save_for_backward(output)


def _relu_dropout_backward(ctx, grad):
    """torch's own ReLU gradient, scaled (no mask needed): plain torch ops, so a compiled graph
    traces them and double backward differentiates them like any other."""
    (out,) = ctx.saved_tensors
    return kernels.relu_dropout_grad(grad, out, ctx.p), None, None


_masked.register_autograd(_masked_backward, setup_context=_save_seed_and_kind)
_relu_dropout.register_autograd(_relu_dropout_backward, setup_context=_save_output_and_p)
_masked_save_bits.register_autograd(_from_bits_backward, setup_context=_save_bits)
_masked_from_bits.register_autograd(_from_bits_backward, setup_context=_save_given_bits)
_gaussian.register_autograd(_gaussian_backward, setup_context=_save_second_input_and_p)


# --- eager mode -----------------------------------------------------------------------------------

class _EagerMasked(torch.autograd.Function):
    """The masked ops outside ``torch.compile``: the same kernels and the same saved state as
    ``dropkit::masked`` / ``masked_save_bits`` / ``masked_from_bits``, without the custom-op layer.

    Why: a Python custom op's dispatch and autograd wrapper cost about 60 us per forward and
    backward on these machines, as much as the kernel itself on a layer's activations (2**18
    elements: ~80 us). Under ``torch.compile`` the custom ops are used, so graphs have no breaks.
    The mask comes from ``seed``, or from the packed ``bits`` when given; backward applies this
    same Function to the gradient, so double backward works as it does for the custom ops.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, bits: torch.Tensor | None, p: float, kind: str,
                save_bits: bool) -> torch.Tensor:
        if bits is None:
            out, bits = kernels.masked(x, seed, p, kind, save_bits=save_bits)
        else:
            out = kernels.masked_from_bits(x, bits, p, kind)
        ctx.seed, ctx.p, ctx.kind = seed, p, kind
        ctx.save_for_backward(bits)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (bits,) = ctx.saved_tensors
        grad_x = _EagerMasked.apply(grad, ctx.seed, bits, ctx.p, _GRAD_KIND[ctx.kind], False)
        return grad_x, None, None, None, None, None


class _EagerReluDropout(torch.autograd.Function):
    """``dropkit::relu_dropout`` outside ``torch.compile`` (see :class:`_EagerMasked` for why)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
        out = kernels.masked(x, seed, p, "relu_dropout")[0]
        ctx.p = p
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        # torch ops: with create_graph, autograd differentiates them itself (double backward)
        return kernels.relu_dropout_grad(grad, out, ctx.p), None, None


def _eager_kernel(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the eager path: on the compiled CPU kernels, and not being traced."""
    return kernels.accelerated(x) and not torch.compiler.is_compiling()


# --- the primitives functional.py calls ------------------------------------------------------------

def keep_mask(seed: torch.Tensor, p: float, shape: tuple[int, ...],
              device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean keep mask of ``shape`` on ``device`` (default: the seed's): element i is kept iff its
    draw >= the threshold (see dropkit.rng). It is drawn where it is used, by that device's kernel
    (the Triton one for CUDA tensors), so no mask is copied from the CPU; in a compiled graph the
    rate is a tensor (:mod:`dropkit._compiled_ops`, :func:`_triton_rate`), so a new ``p`` keeps the graph."""
    device = seed.device if device is None else torch.device(device)
    if transformed():
        return _traced_keep_mask(seed, p, shape, device)
    path = kernels.path_on(device)
    if torch.compiler.is_compiling():
        if path == "triton" and triton_ops():
            return torch.ops.dropkit.triton_keep_mask(seed.to(device), *_triton_rate(p, device), list(shape))
        if device.type == "cpu":
            return _compiled_ops.keep_mask(seed, p, shape)
    elif path != "reference":
        return kernels.keep_mask(int(seed), p, tuple(shape), device=device)
    return _keep_mask(seed, p, list(shape), device)


def alpha_dropout_affine(p: float) -> tuple[float, float]:
    """The (a, b) of alpha dropout that keep zero mean and unit variance for SELU activations."""
    return reference.alpha_affine(p)


def gaussian_noise(seed: torch.Tensor, p: float, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Multiplicative noise ~ N(1, p/(1-p)) of ``shape`` (Srivastava et al. 2014, section 10)."""
    if transformed():
        return _traced_gaussian_noise(seed, p, shape, dtype, seed.device)
    return _gaussian_noise(seed, p, list(shape), dtype)


def dropout(
    x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...], saved: str = "seed"
) -> torch.Tensor:
    """Inverted dropout of ``x`` with a keep mask of ``mask_shape`` (0 < p < 1): kept units become
    ``x / (1 - p)``, dropped ones 0 (Srivastava et al. 2014)."""
    return _mask_op("dropout", x, p, seed, mask_shape, saved)


def relu_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``dropout(relu(x))`` in one pass with an element-wise mask (0 < p < 1); the same mask and
    values as :func:`dropout` of ``relu(x)`` with this seed. Backward keeps only the output."""
    if transformed():
        return reference.masked(x, _traced_keep_mask(seed, p, tuple(x.shape), x.device), "relu_dropout", p)
    if _triton_compiled(x):
        return torch.ops.dropkit.triton_relu_dropout(x, seed.to(x.device), *_triton_rate(p, x.device))
    if _compiled_ops.wanted(x):
        return _compiled_ops.relu_dropout(x, p, seed)
    if _eager_kernel(x):
        return _EagerReluDropout.apply(x, int(seed), p)
    return _relu_dropout(x, seed, p)


def alpha_dropout(
    x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...], saved: str = "seed"
) -> torch.Tensor:
    """Alpha dropout of ``x`` with a keep mask of ``mask_shape`` (0 < p < 1): dropped units take
    SELU's saturation value, then ``a * . + b`` restores zero mean and unit variance."""
    return _mask_op("alpha", x, p, seed, mask_shape, saved)


def gaussian_dropout(
    x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...], saved: str = "seed"
) -> torch.Tensor:
    """Gaussian dropout of ``x`` with noise of ``mask_shape`` (0 < p < 1); only ``saved="seed"``."""
    if saved != "seed":
        raise ValueError(f"gaussian_dropout keeps only the seed for backward (saved='seed'), got saved={saved!r}")
    if transformed():
        noise = _traced_gaussian_noise(seed, p, tuple(mask_shape), x.dtype, x.device)
        return (x.to(noise.dtype) * noise).to(x.dtype)
    if tuple(mask_shape) == tuple(x.shape) and _triton_compiled(x):
        return torch.ops.dropkit.triton_gaussian(x, seed.to(x.device), _triton_rate(p, x.device)[0])
    if _compiled_ops.wanted(x):
        return _compiled_ops.gaussian_dropout(x, p, seed, mask_shape)
    if tuple(mask_shape) == tuple(x.shape):
        return _gaussian(x, seed, p)
    noise = _gaussian_noise(seed, p, list(mask_shape), reference.opmath_dtype(x.dtype)).to(x.device)
    return (x.to(noise.dtype) * noise).to(x.dtype)


def _mask_op(kind: str, x: torch.Tensor, p: float, seed: torch.Tensor, mask_shape: tuple[int, ...],
             saved: str) -> torch.Tensor:
    """An element-wise mask runs as one custom op; a shared (broadcast) mask is drawn small on
    ``x``'s device and applied by ``torch.where``."""
    if saved not in SAVED_MODES:
        raise ValueError(f"saved must be one of {SAVED_MODES}, got {saved!r}")
    if transformed():
        return reference.masked(x, _traced_keep_mask(seed, p, mask_shape, x.device), kind, p)
    if tuple(mask_shape) != tuple(x.shape):
        keep = keep_mask(seed, p, mask_shape, x.device)
        if torch.compiler.is_compiling():
            return _compiled_ops.shared_masked(kind, x, keep, p)
        return reference.masked(x, keep, kind, p)
    if _triton_compiled(x):
        return _triton_mask_op(kind, x, p, seed, saved == "bits" and torch.is_grad_enabled() and x.requires_grad)
    if _compiled_ops.wanted(x) and saved == "seed":
        return _compiled_ops.masked(kind, x, p, seed)
    save_bits = saved == "bits" and torch.is_grad_enabled() and x.requires_grad
    if _eager_kernel(x):
        return _EagerMasked.apply(x, int(seed), None, p, kind, save_bits)
    if save_bits:
        return _masked_save_bits(x, seed, p, kind)[0]
    return _masked(x, seed, p, kind)


# --- under torch.func transforms -----------------------------------------------------------------

def transformed() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is running.

    The kernels and custom ops need the seed as a Python int, which a transform cannot give (under
    ``vmap(randomness="different")`` each sample has its own seed). Inside a transform the masks
    are computed from the seed tensor by :mod:`dropkit.rng`'s plain-torch Philox, the reference
    the kernels are tested against, so a transformed op draws the very masks the kernels draw.
    A ``torch.compile`` trace (which runs on functorch's machinery itself) takes the custom ops.
    """
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def _traced_keep_mask(seed: torch.Tensor, p: float, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """:func:`keep_mask` from a seed tensor (batched under ``vmap``), in plain torch ops on ``device``
    (the 8-byte seed moves there, not the mask)."""
    width, thr = rng.keep_threshold(p)
    return (rng.uniform(seed.to(device), 0, math.prod(shape), width, device) >= thr).reshape(shape)


def _traced_gaussian_noise(seed: torch.Tensor, p: float, shape: tuple[int, ...], dtype: torch.dtype,
                           device: torch.device) -> torch.Tensor:
    """:func:`gaussian_noise` from a seed tensor, in plain torch ops on ``device`` (see :func:`transformed`)."""
    z = rng.normal(seed.to(device), 0, math.prod(shape), device).reshape(shape)
    return (1.0 + math.sqrt(p / (1.0 - p)) * z).to(reference.opmath_dtype(dtype))


# --- the Triton path as torch.library ops ----------------------------------------------------------
#
# Eager calls on the triton path take the classes above (the kernels with int seeds and float rates,
# no custom-op layer). Under torch.compile they take these ops instead: ``torch.library.triton_op``
# bodies whose kernels are launched through ``wrap_triton``, so the compiled graph holds the Triton
# kernels themselves (inductor can schedule them, CUDA graphs capture them) rather than an opaque call.
# Nothing that changes from call to call is a Python constant of the graph:
# * the seed enters as a 0-dim int64 tensor that the kernel reads from memory, so a replayed graph
#   reads whatever seed the replay draws (the offset is 0: every op's mask is a whole stream of its seed);
# * the rate enters as a 0-dim float64 tensor on the input's device; the body derives the kernel's
#   draw width, threshold and constants from it with torch ops (gpu.rate_params) and the kernel
#   reads them from memory, so a new ``p`` runs the same graph, as on the CPU (_compiled_ops);
# * ``rate_bits`` (rng.set_rate_bits) is an int argument read while dynamo traces, which guards it.
# They are defined on first use, so ``import dropkit`` does not import Triton. Under Triton's
# interpreter (``TRITON_INTERPRET=1``) ``wrap_triton`` cannot trace a kernel, so there they are
# plain custom ops with the same schema, fake implementations and autograd (how the tests check them).

#: what the fused op keeps for backward besides the seed, by activation
FUSED_SAVED = {"none": "nothing", "relu": "x (its input)", "gelu": "x (its input)"}
_triton_ops_defined = False


@torch.compiler.assume_constant_result
def triton_ops() -> bool:
    """Define the ``dropkit::triton_*`` ops if they are not yet (importing Triton); True after.
    torch.compile runs it while tracing and keeps its result as a constant."""
    global _triton_ops_defined
    if not _triton_ops_defined:
        _define_triton_ops()
        _triton_ops_defined = True
    return True


def _triton_traced(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the triton path in a Triton dtype (float64 takes the opaque ops)."""
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and kernels.path_for(x) == "triton"


def _triton_compiled(x: torch.Tensor) -> bool:
    """Whether ``x``'s op is being compiled on the triton path: then the ``dropkit::triton_*`` ops
    run (the CPU's rate-as-tensor ops of :mod:`dropkit._compiled_ops` would hide the kernels)."""
    return torch.compiler.is_compiling() and _triton_traced(x) and triton_ops()


def _triton_rate(p: float, device: torch.device) -> tuple[torch.Tensor, int]:
    """The rate arguments of the ``dropkit::triton_*`` ops: ``p`` as a 0-dim float64 tensor on
    ``device`` (a graph input once ``p`` has changed) and the current :func:`dropkit.rng.rate_bits`."""
    return _compiled_ops.rate_tensor(p, device), rng.rate_bits()


def _define_triton_ops() -> None:
    from dropkit.kernels import gpu

    define = torch.library.custom_op if gpu.INTERPRETED else torch.library.triton_op

    @define("dropkit::triton_masked", mutates_args=())
    def masked(x: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor, rate_bits: int, kind: str) -> torch.Tensor:
        return gpu.masked(x.contiguous(), seed, rate, kind, rate_bits=rate_bits, traceable=True)[0]

    @define("dropkit::triton_masked_save_bits", mutates_args=())
    def masked_save_bits(x: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor, rate_bits: int,
                         kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        out, bits = gpu.masked(x.contiguous(), seed, rate, kind, save_bits=True, rate_bits=rate_bits, traceable=True)
        return out, bits

    @define("dropkit::triton_masked_from_bits", mutates_args=())
    def masked_from_bits(x: torch.Tensor, bits: torch.Tensor, rate: torch.Tensor, kind: str) -> torch.Tensor:
        return gpu.masked_from_bits(x.contiguous(), bits, rate, kind, traceable=True)

    @define("dropkit::triton_relu_dropout", mutates_args=())
    def relu_dropout(x: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor, rate_bits: int) -> torch.Tensor:
        return gpu.masked(x.contiguous(), seed, rate, "relu_dropout", rate_bits=rate_bits, traceable=True)[0]

    @define("dropkit::triton_gaussian", mutates_args=())
    def gaussian(x: torch.Tensor, seed: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        return gpu.gaussian(x.contiguous(), seed, rate, traceable=True)

    @define("dropkit::triton_keep_mask", mutates_args=())
    def keep_mask(seed: torch.Tensor, rate: torch.Tensor, rate_bits: int, shape: list[int]) -> torch.Tensor:
        return gpu.keep_mask(seed, rate, tuple(shape), 0, seed.device, rate_bits=rate_bits, traceable=True)

    @define("dropkit::triton_bias_act_dropout", mutates_args=())
    def bias_act_dropout(x: torch.Tensor, bias: torch.Tensor | None, seed: torch.Tensor, rate: torch.Tensor,
                         rate_bits: int, activation: str, residual: torch.Tensor | None) -> torch.Tensor:
        return gpu.bias_act_dropout(x.contiguous(), None if bias is None else bias.contiguous(), seed, rate,
                                    activation, None if residual is None else residual.contiguous(),
                                    rate_bits=rate_bits, traceable=True)

    @define("dropkit::triton_bias_act_dropout_backward", mutates_args=())
    def bias_act_dropout_backward(grad: torch.Tensor, x: torch.Tensor | None, bias: torch.Tensor | None,
                                  seed: torch.Tensor, rate: torch.Tensor, rate_bits: int,
                                  activation: str) -> torch.Tensor:
        return gpu.bias_act_dropout_backward(grad.contiguous(), None if x is None else x.contiguous(),
                                             None if bias is None else bias.contiguous(), seed, rate, activation,
                                             rate_bits=rate_bits, traceable=True)

    def like(x, *_):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    for op in (masked, masked_from_bits, relu_dropout, gaussian, bias_act_dropout, bias_act_dropout_backward):
        op.register_fake(like)

    @masked_save_bits.register_fake
    def _(x, seed, rate, rate_bits, kind):
        return like(x), x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)

    @keep_mask.register_fake
    def _(seed, rate, rate_bits, shape):
        return seed.new_empty(shape, dtype=torch.bool)

    def keep_seed(ctx, inputs, output):
        _, seed, rate, ctx.rate_bits, ctx.kind = inputs
        ctx.save_for_backward(seed, rate)

    def masked_backward(ctx, grad):
        seed, rate = ctx.saved_tensors
        return masked(grad, seed, rate, ctx.rate_bits, _GRAD_KIND[ctx.kind]), None, None, None, None

    def keep_bits(ctx, inputs, output):  # (x, seed, rate, rate_bits, kind) or (x, bits, rate, kind)
        ctx.kind, ctx.inputs = inputs[-1], len(inputs)
        ctx.save_for_backward(output[1] if isinstance(output, tuple) else inputs[1], inputs[2])

    def from_bits_backward(ctx, grad, _grad_bits=None):
        bits, rate = ctx.saved_tensors
        return (masked_from_bits(grad, bits, rate, _GRAD_KIND[ctx.kind]),) + (None,) * (ctx.inputs - 1)

    def keep_seed_and_rate(ctx, inputs, output):
        _, seed, rate = inputs
        ctx.save_for_backward(seed, rate)

    def gaussian_backward(ctx, grad):
        seed, rate = ctx.saved_tensors
        return gaussian(grad, seed, rate), None, None

    def keep_output(ctx, inputs, output):
        ctx.save_for_backward(output, inputs[2])

    def relu_dropout_backward(ctx, grad):
        out, rate = ctx.saved_tensors
        return kernels.relu_dropout_grad(grad, out, rate), None, None, None

    def keep_fused(ctx, inputs, output):
        x, bias, seed, rate, ctx.rate_bits, ctx.activation, residual = inputs
        ctx.has_residual = residual is not None
        ctx.bias_shape = None if bias is None else bias.shape
        needs_input = ctx.activation != "none"
        ctx.save_for_backward(seed, rate, x if needs_input else None, bias if needs_input else None)

    def fused_backward(ctx, grad):
        seed, rate, x, bias = ctx.saved_tensors
        grad_x = bias_act_dropout_backward(grad, x, bias, seed, rate, ctx.rate_bits, ctx.activation)
        grad_bias = None if ctx.bias_shape is None else grad_x.sum_to_size(ctx.bias_shape)
        return grad_x, grad_bias, None, None, None, None, grad if ctx.has_residual else None

    masked.register_autograd(masked_backward, setup_context=keep_seed)
    masked_save_bits.register_autograd(from_bits_backward, setup_context=keep_bits)
    masked_from_bits.register_autograd(from_bits_backward, setup_context=keep_bits)
    gaussian.register_autograd(gaussian_backward, setup_context=keep_seed_and_rate)
    relu_dropout.register_autograd(relu_dropout_backward, setup_context=keep_output)
    bias_act_dropout.register_autograd(fused_backward, setup_context=keep_fused)


def _triton_mask_op(kind: str, x: torch.Tensor, p: float, seed: torch.Tensor, save_bits: bool) -> torch.Tensor:
    """An element-wise masked op through the ``dropkit::triton_*`` ops (see above)."""
    triton_ops()
    seed, (rate, rate_bits) = seed.to(x.device), _triton_rate(p, x.device)
    if save_bits:
        return torch.ops.dropkit.triton_masked_save_bits(x, seed, rate, rate_bits, kind)[0]
    return torch.ops.dropkit.triton_masked(x, seed, rate, rate_bits, kind)


class _EagerBiasActDropout(torch.autograd.Function):
    """``dropkit::triton_bias_act_dropout`` outside ``torch.compile``: the same kernels with the
    seed as a Python int and ``p`` as a float, so no seed or rate tensor is copied to the device
    (see :class:`_EagerMasked` for the custom-op layer it skips). Backward keeps ``x`` and ``bias``
    for a ReLU or GELU, nothing per element otherwise."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, seed: int, p: float,
                activation: str) -> torch.Tensor:
        from dropkit.kernels import gpu

        x, bias = x.contiguous(), None if bias is None else bias.contiguous()
        out = gpu.bias_act_dropout(x, bias, seed, p, activation, None if residual is None else residual.contiguous())
        ctx.seed, ctx.p, ctx.activation, ctx.has_residual = seed, p, activation, residual is not None
        ctx.bias_shape = None if bias is None else bias.shape
        needs_input = activation != "none"
        ctx.save_for_backward(x if needs_input else None, bias if needs_input else None)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from dropkit.kernels import gpu

        x, bias = ctx.saved_tensors
        grad_x = gpu.bias_act_dropout_backward(grad.contiguous(), x, bias, ctx.seed, ctx.p, ctx.activation)
        grad_bias = None if ctx.bias_shape is None else grad_x.sum_to_size(ctx.bias_shape)
        return grad_x, grad_bias, grad if ctx.has_residual else None, None, None, None


def fused_kernel(x: torch.Tensor) -> bool:
    """Whether :func:`bias_act_dropout` runs ``x`` as one Triton kernel (the triton path, a Triton dtype)."""
    return _triton_traced(x)


def bias_act_dropout(x: torch.Tensor, bias: torch.Tensor | None, p: float, seed: torch.Tensor, activation: str,
                     residual: torch.Tensor | None) -> torch.Tensor:
    """``residual + dropout(act(x + bias))`` (0 <= p < 1) with the element-wise mask of ``seed``.

    On the triton path it is one kernel each way (:class:`_EagerBiasActDropout`; compiled,
    ``dropkit::triton_bias_act_dropout``); backward keeps the seed, and ``x`` for a ReLU or GELU
    (see :data:`FUSED_SAVED`). Elsewhere it is the composition of the ops above,
    ``dropout(act(x + bias))`` with this seed, plus ``residual``: the same masks, values and
    gradients as those ops called one after the other.
    """
    if _triton_traced(x) and not transformed():
        if torch.compiler.is_compiling():
            triton_ops()
            rate, rate_bits = _triton_rate(p, x.device)
            return torch.ops.dropkit.triton_bias_act_dropout(x, bias, seed.to(x.device), rate, rate_bits, activation,
                                                             residual)
        return _EagerBiasActDropout.apply(x, bias, residual, int(seed), p, activation)
    h = x if bias is None else x + bias
    if activation == "relu":
        out = relu_dropout(h, p, seed)
    else:
        out = dropout(torch.nn.functional.gelu(h) if activation == "gelu" else h, p, seed, tuple(h.shape))
    return out if residual is None else residual + out
