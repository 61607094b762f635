"""Monte Carlo dropout: predictive uncertainty from a network trained with dropout.

Gal & Ghahramani ("Dropout as a Bayesian Approximation", ICML 2016) show that keeping dropout on
at test time and averaging T stochastic forward passes approximates the predictive distribution
of a Bayesian network. The spread of the T passes measures the model's uncertainty: for a
classifier, the entropy of the mean prediction (total) splits into the mean entropy of the passes
(aleatoric: noise in the data) and their mutual information with the weights (epistemic: what
more data would fix; BALD, Houlsby et al. 2011). The original work used T = 10,000; 30 to 100
passes are the usual practice.

Which modules sample (:func:`dropout_modules`): dropkit's dropout layers (:mod:`dropkit.nn`, also
:class:`~dropkit.nn.WeightDropout`), :class:`~dropkit.concrete.ConcreteDropout`,
:class:`~dropkit.structured.StructuredLinearStack`, torch's dropout modules and the attention
dropout of ``nn.MultiheadAttention``. Only they are put in training mode; batch norm and everything
else stay in eval mode, and every module's mode is restored afterwards. Torch's fused inference
path of ``nn.TransformerEncoderLayer`` never calls its dropout modules, so it is switched off
(``torch.backends.mha.set_fastpath_enabled``) while sampling and restored after. A model with none
of these modules is refused. The between-layer dropout of ``nn.LSTM``/``GRU``/``RNN`` is a flag of
the fused kernel, not a module, and stays off (a warning says so).

Batched sampling. The T passes run as a few large forwards: the batch is replicated ``R`` times
(pass-major: rows ``r*N .. (r+1)*N - 1`` are pass ``r``), with ``R`` set by a memory budget, so the
layers without randomness run one large product instead of ``R`` small ones. dropkit's element-wise
layers (``Dropout``, ``ReLUDropout``, ``AlphaDropout`` and ``GaussianDropout`` without a
``mask_shape``) on a batch-first input draw every pass of a forward in one kernel call: call ``c``
of the layer with index ``i`` reads the Philox stream of ``derive_seed(seed, i, c)``, pass ``t``
at the counters after those of passes ``0 .. t-1`` (each pass starts at a fresh counter). Every
other sampling module splits its input into the ``R`` passes and draws the masks of pass ``t``
from torch's generator seeded with ``derive_seed(derive_seed(seed, t), i, c)``. Either way a pass's
masks depend on ``seed``, its index and the per-pass shape only, never on how many passes share a
forward: with the same ``seed`` the samples are the same whatever the budget, including one pass
per forward (sequential sampling).
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dropkit import kernels, mc_thinned, rng
from dropkit import nn as dnn
from dropkit.concrete import ConcreteDropout
from dropkit.convert import TWINS
from dropkit.nn import DropoutLayer, LockedDropout

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "DROPOUT_TYPES",
    "ClassUncertainty",
    "dropout_active",
    "dropout_modules",
    "entropy",
    "mc_classify",
    "mc_regress",
    "mc_samples",
    "uncertainty_from_probs",
]

#: module types that sample when switched on (``nn.MultiheadAttention`` only with ``dropout > 0``);
#: :class:`~dropkit.structured.StructuredLinearStack` samples too, recognised once
#: :mod:`dropkit.structured` is imported (no model holds one before), so that numba loads only
#: where structured dropout is used
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (DropoutLayer, *TWINS, ConcreteDropout, nn.MultiheadAttention)

#: bytes of module outputs one batched forward may produce (see :func:`mc_samples`)
DEFAULT_MEMORY_BUDGET = 256 * 2**20

#: stream of :func:`dropkit.rng.derive_seed` that the pass seeds come from
_PASS_STREAM = 3
#: stream of :func:`dropkit.rng.derive_seed` that the keys of the one-call layers come from
_LAYER_STREAM = 4

#: bytes of module outputs of one pass, per model and input (shape, dtype, device), measured by
#: :func:`mc_samples`; held weakly, so a model that is let go takes its entries with it
_PASS_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()
#: input shapes remembered per model (the oldest is forgotten first)
_PASS_BYTES_SHAPES = 8

#: layers whose passes are drawn in one kernel call when they have no ``mask_shape``: the kernel's kind
_ONE_CALL_KINDS = {dnn.Dropout: "dropout", dnn.ReLUDropout: "relu_dropout", dnn.AlphaDropout: "alpha",
                   dnn.GaussianDropout: "gaussian"}


def _is_structured(module: nn.Module) -> bool:
    structured = sys.modules.get("dropkit.structured")
    return structured is not None and isinstance(module, structured.StructuredLinearStack)


def _samples_noise(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return module.dropout > 0
    return isinstance(module, DROPOUT_TYPES) or _is_structured(module)


def dropout_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that Monte Carlo dropout switches on, by name, in ``modules()`` order."""
    return [(name, m) for name, m in model.named_modules() if _samples_noise(m)]


def _warn_rnn_dropout(model: nn.Module) -> None:
    rnns = [name for name, m in model.named_modules() if isinstance(m, nn.RNNBase) and m.dropout > 0]
    if rnns:
        warnings.warn(f"the between-layer dropout of {rnns} is part of torch's fused RNN kernel and stays off "
                      "while sampling; use dropkit.nn.LockedDropout or WeightDropout for sampled RNN dropout",
                      stacklevel=3)


@contextmanager
def dropout_active(model: nn.Module) -> Iterator[list[tuple[str, nn.Module]]]:
    """Put ``model`` in eval mode with only its dropout modules in training mode; restore on exit.

    Also switches off torch's fused transformer inference path, which skips dropout, and restores
    it on exit. Yields :func:`dropout_modules`. Raises ``ValueError`` for a model with no dropout.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), dnn.Dropout(0.5))
        >>> with dropout_active(net):
        ...     net[1].training, net[0].training
        (True, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = dropout_modules(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no dropout module: Monte Carlo dropout would return "
                         "T identical passes")
    _warn_rnn_dropout(model)
    modes = {module: module.training for module in model.modules()}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    for _, layer in layers:
        layer.training = True  # this module only: a wrapped layer (Concrete's, WeightDropout's) stays in eval
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield layers
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for module, training in modes.items():
            module.training = training
        for _, layer in layers:
            if _is_structured(layer) and not layer.training:
                layer.workspace.clear()


def _preferred_dim(name: str, module: nn.Module, model: nn.Module) -> int:
    """The dimension of ``module``'s input that holds the batch: 0, or 1 in a sequence-first
    (``batch_first=False``) module or under one (nearest first)."""
    if isinstance(module, LockedDropout):
        return 0 if module.batch_first else 1
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        flag = getattr(owner, "batch_first", None)
        if flag is None:
            flag = getattr(getattr(owner, "self_attn", None), "batch_first", None)
        if isinstance(flag, bool):
            return 0 if flag else 1
    return 0


def _find_dim(t: torch.Tensor, preferred: int, size: int) -> int | None:
    """``preferred`` if ``t`` has ``size`` there, else the first dimension that has, else None."""
    if t.dim() > preferred and t.shape[preferred] == size:
        return preferred
    return next((d for d in range(t.dim()) if t.shape[d] == size), None)


class _Sampler:
    """Runs forwards of ``model`` with ``R`` passes in one batch, each pass with its own masks."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.dims = {id(m): _preferred_dim(name, m, model) for name, m in layers}
        self.index = {id(m): i for i, (_, m) in enumerate(layers)}
        self.kinds = {id(m): _one_call_kind(m) for _, m in layers}
        self.seed = 0
        self.start = 0  # index of the first pass of the current forward
        self.seeds: list[int] = []
        self.rows = 0
        self.current: int | None = None  # the pass being computed inside a module, if any
        self.calls: dict[tuple[int, int], int] = {}
        self.cuda = False

    @contextmanager
    def installed(self) -> Iterator[_Sampler]:
        saved = []
        for _, module in self.layers:
            saved.append((module, module.__dict__.get("forward"), getattr(module, "generator", None)))
            if hasattr(module, "generator"):
                module.generator = None  # the pass seeds drive torch's generator, which fork_rng restores
            module.forward = self._wrap(module, module.forward)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=devices):
                yield self
        finally:
            for module, forward, generator in saved:
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward
                if hasattr(module, "generator"):
                    module.generator = generator

    def forward(self, model: nn.Module, x: torch.Tensor, seed: int, start: int, passes: int) -> torch.Tensor:
        """Passes ``start .. start + passes - 1`` of ``model`` on ``x``: output ``(passes, *model(x).shape)``."""
        self.seed, self.start, self.calls, self.cuda = seed, start, {}, x.is_cuda
        self.seeds = [rng.derive_seed(seed, _PASS_STREAM, t) for t in range(start, start + passes)]
        batch = x.repeat(passes, *([1] * (x.dim() - 1))) if passes > 1 else x
        self.rows = batch.shape[0]
        out = model(batch)
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != self.rows:
            raise ValueError("mc_samples needs a model that maps a batch (N, ...) to one tensor (N, ...); got "
                             f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}")
        return out.view(passes, x.shape[0], *out.shape[1:])

    def _wrap(self, module: nn.Module, forward):
        key = id(module)

        def sampled(*args: Any, **kwargs: Any) -> Any:
            if self.current is not None:  # inside another sampling module's pass: one pass of input
                return self._one_pass(key, self.current, forward, args, kwargs)
            passes, dim = len(self.seeds), self.dims[key]
            if self.kinds[key] is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) \
                    and args[0].dim() > 0 and args[0].shape[0] == self.rows:
                return self._one_call(module, key, forward, args[0])
            pieces = _split(module, args, kwargs, passes, dim, self.rows)
            outs = []
            for r, (a, k) in enumerate(pieces):
                self.current = r
                try:
                    outs.append(self._one_pass(key, r, forward, a, k))
                finally:
                    self.current = None
            return outs[0] if passes == 1 else _merge(outs, dim, self.rows // passes)

        return sampled

    def _one_pass(self, key: int, r: int, forward, args: tuple, kwargs: dict) -> Any:
        call = self.calls.get((r, key), 0)
        self.calls[(r, key)] = call + 1
        seed = rng.derive_seed(self.seeds[r], self.index[key], call)
        # the generators themselves: torch.manual_seed also queues a seeding of every lazy device
        # backend, recording a stack trace each time, which costs more than a small layer
        torch.default_generator.manual_seed(seed)
        if self.cuda:
            torch.cuda.manual_seed(seed)
        # torch draws a mask in its input's memory order: contiguous inputs make it the logical order
        args = tuple(_contiguous(a) for a in args)
        kwargs = {k: _contiguous(v) for k, v in kwargs.items()}
        return forward(*args, **kwargs)


    def _one_call(self, module: nn.Module, key: int, forward, x: torch.Tensor) -> torch.Tensor:
        """Every pass of an element-wise dropkit layer on the replicated batch ``x``, in one kernel
        call when each pass fills whole Philox counters, else one call per pass (same masks)."""
        call = self.calls.get((-1, key), 0)  # pass -1: the calls that cover every pass
        self.calls[(-1, key)] = call + 1
        p, kind = module.p, self.kinds[key]
        if not 0.0 < p < 1.0 or x.numel() == 0:  # nothing random: the identity, or every unit dropped
            return forward(x)
        layer_seed = rng.derive_seed(self.seed, _LAYER_STREAM, self.index[key], call)
        passes = len(self.seeds)
        per_pass = x.numel() // passes
        if kind == "gaussian":
            bits = rng.BITS_PER_COUNTER // 2  # two normal draws per Philox call

            def draw(part: torch.Tensor, offset: int) -> torch.Tensor:
                return kernels.gaussian(part, layer_seed, p, offset)
        else:
            bits = rng.keep_threshold(p)[0]

            def draw(part: torch.Tensor, offset: int) -> torch.Tensor:
                return kernels.masked(part, layer_seed, p, kind, offset=offset)[0]
        counters = -(-per_pass * bits // rng.BITS_PER_COUNTER)
        if per_pass * bits % rng.BITS_PER_COUNTER == 0:  # the passes lie end to end in one stream
            out = draw(x, self.start * counters)
        else:
            out = torch.cat([draw(part, (self.start + r) * counters) for r, part in enumerate(x.chunk(passes))])
        return x.copy_(out) if module.inplace else out.view(x.shape)


def _one_call_kind(module: nn.Module) -> str | None:
    """The kernel kind of a layer drawn in one call (see the module docstring), else None."""
    kind = _ONE_CALL_KINDS.get(type(module))
    return kind if kind is not None and getattr(module, "mask_shape", None) is None else None


def _contiguous(value: Any) -> Any:
    return value.contiguous() if isinstance(value, torch.Tensor) else value


def _split(module: nn.Module, args: tuple, kwargs: dict, passes: int, dim: int, rows: int) -> list[tuple[tuple, dict]]:
    """The arguments of each of the ``passes`` passes: every tensor with the replicated batch
    (``rows``) cut into ``passes`` parts along its batch dimension, other arguments shared."""
    if passes == 1:
        return [(args, kwargs)]
    found = False
    done: dict[int, list[Any]] = {}  # a tensor passed twice (query is key is value) is cut once

    def cut(value: Any, name: str | None) -> list[Any]:
        nonlocal found
        if isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            return list(zip(*(cut(v, name) for v in value)))
        if not isinstance(value, torch.Tensor):
            return [value] * passes
        if id(value) in done:
            return done[id(value)]
        done[id(value)] = parts = _cut_tensor(value, name)
        return parts

    def _cut_tensor(value: torch.Tensor, name: str | None) -> list[Any]:
        nonlocal found
        if isinstance(module, nn.MultiheadAttention) and name == "attn_mask":
            # (L, S) is shared; (N * heads, L, S) is batch-major
            return list(value.chunk(passes, 0)) if value.dim() == 3 else [value] * passes
        d = _find_dim(value, dim, rows)
        if d is None:
            return [value] * passes
        found = True
        return list(value.chunk(passes, d))

    names = [None] * len(args)
    if isinstance(module, nn.MultiheadAttention):
        names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"][:len(args)]
    cut_args = [cut(a, n) for a, n in zip(args, names)]
    cut_kwargs = {k: cut(v, k) for k, v in kwargs.items()}
    if not found:
        shapes = [tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        raise ValueError(f"{type(module).__name__}: no input has the replicated batch ({rows} rows) at dimension "
                         f"{dim} or elsewhere (input shapes {shapes}); mc_samples needs batch-first inputs")
    return [(tuple(a[r] for a in cut_args), {k: v[r] for k, v in cut_kwargs.items()}) for r in range(passes)]


def _merge(outs: list[Any], dim: int, per_pass: int) -> Any:
    """The passes' outputs joined again along their batch dimension."""
    first = outs[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(_merge([o[i] for o in outs], dim, per_pass) for i in range(len(first)))
    if not isinstance(first, torch.Tensor):
        raise ValueError(f"cannot join outputs of type {type(first).__name__} across passes")
    d = _find_dim(first, dim, per_pass)
    if d is None:
        raise ValueError(f"an output of shape {tuple(first.shape)} has no batch dimension of size {per_pass}")
    return torch.cat(outs, d)


def _output_bytes(model: nn.Module, run) -> tuple[Any, int]:
    """``run()``'s result and the total bytes of every module's tensor outputs during it."""
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        stack = [output]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                total += item.nelement() * item.element_size()
            elif isinstance(item, (tuple, list)):
                stack.extend(item)

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        return run(), total
    finally:
        for handle in handles:
            handle.remove()


def _remember_pass_bytes(model: nn.Module, key: tuple, pass_bytes: int) -> None:
    known = _PASS_BYTES[model]
    known[key] = pass_bytes
    while len(known) > _PASS_BYTES_SHAPES:
        del known[next(iter(known))]


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@torch.no_grad()
def mc_samples(model: nn.Module, x: torch.Tensor, samples: int = 30, *, seed: int | None = None,
               memory_budget: int = DEFAULT_MEMORY_BUDGET, shared_masks: bool = False) -> torch.Tensor:
    """``samples`` stochastic forward passes of ``model`` on ``x`` with dropout on, stacked.

    Monte Carlo dropout (Gal & Ghahramani, ICML 2016). The passes run batched (see the module
    docstring): as many passes per forward as fit in ``memory_budget`` (at least one), by the
    bytes of every module's outputs in one pass. Those bytes are measured on a first pass run
    alone, once per model and input shape: later calls with the same shape run every pass batched.
    Pass ``t`` draws its masks from ``derive_seed(seed, t)`` only, so the result is the same for
    any budget.

    With ``shared_masks=True`` each pass is one thinned network applied to the whole batch
    (:mod:`dropkit.mc_thinned`): for an ``nn.Sequential`` MLP the dropped units' rows and columns
    of the weights are left out of the products, which pays at large batches. Every input gets
    passes with the same distribution as with per-element masks; the inputs of a batch share them.

    Args:
        model: a module mapping a batch-first ``(N, ...)`` tensor to one ``(N, ...)`` tensor, with
            at least one module of :data:`DROPOUT_TYPES`.
        x: the inputs, batch first.
        samples: T, the number of passes.
        seed: seed of the passes (an int in [0, 2**63 - 1]); None draws one from torch's generator,
            which ``dropkit.manual_seed`` seeds. Same seed, same samples. Layers' own ``seed``
            generators are not used while sampling.
        memory_budget: bytes of module outputs (the sum over every module's outputs, measured on
            a first pass) one forward may produce; 0 runs one pass per forward.
        shared_masks: one mask per layer and pass for the whole batch, the dropped work skipped
            (an MLP only, see :func:`dropkit.mc_thinned.parse_mlp`); ``memory_budget`` then
            does not apply (one pass at a time).

    Shape: ``x``: (N, ...); output: (samples, N, ...).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), dnn.Dropout(0.5), nn.Linear(8, 3))
        >>> x = torch.randn(2, 4)
        >>> logits = mc_samples(net, x, samples=5, seed=0)
        >>> logits.shape
        torch.Size([5, 2, 3])
        >>> torch.equal(logits, mc_samples(net, x, samples=5, seed=0))  # same seed, same passes
        True
        >>> mc_samples(net, x, samples=5, seed=0, shared_masks=True).shape  # thinned networks
        torch.Size([5, 2, 3])
    """
    _check_int("samples", samples, 1)
    _check_int("memory_budget", memory_budget, 0)
    if seed is None:
        seed = int(rng.draw_seed())
    rng.check_seed(seed)
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"x must be a batch-first tensor (N, ...), got {type(x).__name__}")
    if not isinstance(shared_masks, bool):
        raise TypeError(f"shared_masks must be a bool, got {type(shared_masks).__name__}")
    if shared_masks:
        return mc_thinned.thinned_samples(model, x, samples, seed)
    with dropout_active(model) as layers, _Sampler(model, layers).installed() as sampler:
        outs = []
        key = (tuple(x.shape), x.dtype, x.device)
        pass_bytes = _PASS_BYTES.setdefault(model, {}).get(key)
        if pass_bytes is None:
            first, pass_bytes = _output_bytes(model, lambda: sampler.forward(model, x, seed, 0, 1))
            outs.append(first)
            _remember_pass_bytes(model, key, pass_bytes)
        per_forward = max(1, memory_budget // max(pass_bytes, 1))
        for start in range(len(outs), samples, per_forward):
            outs.append(sampler.forward(model, x, seed, start, min(per_forward, samples - start)))
    return torch.cat(outs)


@dataclass(frozen=True)
class ClassUncertainty:
    """MC-dropout prediction for a classifier, one row per input.

    Attributes:
        probs: mean class probabilities over the passes, (N, classes).
        total: entropy of ``probs`` (nats), the predictive uncertainty.
        aleatoric: mean entropy of the individual passes.
        epistemic: ``total - aleatoric``, the mutual information between prediction and weights.
    """

    probs: torch.Tensor
    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the distributions along the last dimension (0 log 0 = 0)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def uncertainty_from_probs(probs: torch.Tensor) -> ClassUncertainty:
    """The mean prediction and uncertainty split of per-pass class probabilities ``(T, N, classes)``."""
    if probs.dim() != 3:
        raise ValueError(f"probs must be (passes, N, classes), got shape {list(probs.shape)}")
    mean = probs.mean(0)
    total = entropy(mean)
    aleatoric = entropy(probs).mean(0)
    return ClassUncertainty(mean, total, aleatoric, (total - aleatoric).clamp_min(0.0))


def mc_classify(model: nn.Module, x: torch.Tensor, samples: int = 30, *, seed: int | None = None,
                memory_budget: int = DEFAULT_MEMORY_BUDGET, shared_masks: bool = False) -> ClassUncertainty:
    """Mean prediction and its uncertainty split for a model that outputs class logits.

    Arguments as :func:`mc_samples`.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), dnn.Dropout(0.5), nn.Linear(16, 3))
        >>> out = mc_classify(net, torch.randn(4, 8), samples=50, seed=0)
        >>> flagged = out.epistemic > 0.2   # inputs the model has not learned to handle
        >>> out.probs.shape, flagged.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """
    logits = mc_samples(model, x, samples, seed=seed, memory_budget=memory_budget, shared_masks=shared_masks)
    return uncertainty_from_probs(logits.float().softmax(-1))


def mc_regress(model: nn.Module, x: torch.Tensor, samples: int = 30, *, seed: int | None = None,
               memory_budget: int = DEFAULT_MEMORY_BUDGET, shared_masks: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance over the passes for a model with real-valued outputs.

    The variance is the model (epistemic) part only; add the data noise variance (e.g. tau^-1 in
    Gal & Ghahramani 2016) for a full predictive variance. Arguments as :func:`mc_samples`.
    """
    outputs = mc_samples(model, x, samples, seed=seed, memory_budget=memory_budget, shared_masks=shared_masks)
    return outputs.mean(0), outputs.var(0, unbiased=False)

