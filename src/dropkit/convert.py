"""Swap the dropout modules of any model for their dropkit twins, in place, keeping behaviour.

A swapped module behaves as the original on every input rank the original accepts: the same
dimensions share a mask, the same scaling, the same ``inplace``, the same train/eval mode (the
random draws themselves come from dropkit's generator). Swapped are torch's ``nn.Dropout``,
``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout`` and ``nn.FeatureAlphaDropout``, timm's ``DropPath``
and torchvision's ``StochasticDepth`` (recognised by class, so neither package is imported here).

Dropout that is not a module cannot be swapped: ``nn.MultiheadAttention``'s ``dropout`` (a float
passed to its attention function), a model's own ``F.dropout`` calls, attention that passes
``dropout_p`` to ``F.scaled_dot_product_attention``. :func:`unconverted` lists what a model holds
of that kind (``convert`` logs it as a warning), and :func:`functional_dropout_calls` finds the
functional calls a forward pass makes.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import textwrap
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dropkit import nn as dnn
from dropkit.lora import convert_peft_lora

__all__ = ["TWINS", "DropoutCall", "Unconverted", "convert", "functional_dropout_calls", "fuse", "fuse_relu_dropout",
           "unconverted"]

log = logging.getLogger(__name__)


def _twin(cls: type[dnn.DropoutLayer], **options) -> Callable[[nn.Module], nn.Module]:
    return lambda m: cls(m.p, m.inplace, **options)


#: torch module type -> builder of its dropkit twin (same ``p``, ``inplace`` and input ranks)
TWINS: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {
    nn.Dropout: _twin(dnn.Dropout),
    nn.Dropout1d: _twin(dnn.Dropout1d, torch_ranks=True),
    nn.Dropout2d: _twin(dnn.Dropout2d, torch_ranks=True),
    nn.Dropout3d: _twin(dnn.Dropout3d, torch_ranks=True),
    nn.AlphaDropout: _twin(dnn.AlphaDropout),
    nn.FeatureAlphaDropout: _twin(dnn.FeatureAlphaDropout, torch_ranks=True),
}

#: (module, class name) of third-party classes -> builder of their dropkit twin
_THIRD_PARTY: dict[tuple[str, str], Callable[[nn.Module], nn.Module]] = {
    ("timm.layers.drop", "DropPath"): lambda m: dnn.DropPath(float(m.drop_prob), scale_by_keep=bool(m.scale_by_keep)),
    ("timm.models.layers.drop", "DropPath"): lambda m: dnn.DropPath(float(m.drop_prob),
                                                                    scale_by_keep=bool(m.scale_by_keep)),
    ("torchvision.ops.stochastic_depth", "StochasticDepth"): lambda m: dnn.DropPath(float(m.p), mode=m.mode),
}

#: class-name fragments of modules that look like dropout
_DROPOUT_NAMES = ("dropout", "droppath", "dropblock", "stochasticdepth", "dropconnect")


def _builder(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    cls = type(module)
    return TWINS.get(cls) or _THIRD_PARTY.get((cls.__module__, cls.__name__))


class Unconverted(NamedTuple):
    """A piece of a model with dropout that :func:`convert` cannot swap."""

    #: the module's name in ``model.named_modules()`` ("" for the model itself)
    name: str
    #: its class name
    kind: str
    #: what the dropout is and why it stays
    reason: str


def unconverted(model: nn.Module) -> list[Unconverted]:
    """What of ``model``'s dropout :func:`convert` leaves to torch (or to another library).

    Found by looking at the modules: ``nn.MultiheadAttention`` with ``dropout > 0`` (a float that
    its attention function applies), modules that hold such a rate for
    ``F.scaled_dot_product_attention`` (a float attribute ``dropout_p``, or a fused-attention
    module whose ``attn_drop`` rate is passed to it), and modules whose class name says dropout
    but which are neither dropkit's nor swappable. Dropout written as ``F.dropout`` in a
    ``forward`` is code, not a module: :func:`functional_dropout_calls` finds it by running one pass.

    Example:
        >>> found = unconverted(nn.TransformerEncoderLayer(16, 2, dropout=0.1))
        >>> [(u.name, u.kind) for u in found]
        [('self_attn', 'MultiheadAttention')]
    """
    _check_model(model)
    found = []
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, nn.MultiheadAttention):
            if module.dropout > 0:
                found.append(Unconverted(name, cls.__name__, f"attention dropout p={module.dropout} is a float "
                                         "argument of F.multi_head_attention_forward, not a module"))
        elif isinstance(getattr(module, "dropout_p", None), float) and module.dropout_p > 0:
            found.append(Unconverted(name, cls.__name__, f"dropout_p={module.dropout_p} is applied by a "
                                     "functional call (e.g. F.scaled_dot_product_attention)"))
        elif getattr(module, "fused_attn", False) and isinstance(getattr(module, "attn_drop", None), nn.Module) \
                and getattr(module.attn_drop, "p", 0) > 0:
            found.append(Unconverted(name, cls.__name__, f"fused attention passes attn_drop.p={module.attn_drop.p} "
                                     "to F.scaled_dot_product_attention; the attn_drop module itself is not called"))
        elif (any(part in cls.__name__.lower() for part in _DROPOUT_NAMES) and _builder(module) is None
              and not cls.__module__.startswith("dropkit.")):
            found.append(Unconverted(name, cls.__name__, f"{cls.__module__}.{cls.__qualname__} has no dropkit twin"))
    return found


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def convert(model: nn.Module, *, structured: bool = False, fuse: bool = False) -> int | nn.Module:
    """Replace every dropout module inside ``model`` by its dropkit twin, keeping its behaviour.

    The replacement is in place: other modules, their weights and the train/eval mode are left as
    they are; each twin takes the original's rate, ``inplace`` and reading of input ranks (a
    converted ``nn.Dropout2d`` reads a 3-D input as (N, C, L), as torch's does). Swapped: torch's
    ``nn.Dropout``, ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``, timm's
    ``DropPath`` and torchvision's ``StochasticDepth`` (``mode="row"`` or ``"batch"``).

    Returns how many modules were replaced (also logged). Dropout it cannot swap (attention
    dropout, see :func:`unconverted`) is logged as a warning, one line per module. In a PEFT model
    each LoRA adapter's dropout is moved into its ``lora_A`` projection
    (:func:`dropkit.lora.convert_peft_lora`), so backward keeps no dropped copy of the input; each
    adapter converted counts as one replacement.

    With ``structured=True``, ``nn.Sequential`` MLPs (``Linear -> activation -> Dropout ... ->
    Linear``) become :class:`dropkit.structured.StructuredLinearStack` modules sharing their weights,
    and the structured model is returned instead of a count (see :func:`dropkit.structured.to_structured`).
    With ``fuse=True``, the converted ``ReLU -> Dropout`` pairs are then fused (:func:`fuse_relu_dropout`).

    Args:
        model: the model to convert in place.
        structured: build structured-dropout MLPs instead (returns the new model). Default: False.
        fuse: fuse ``ReLU -> Dropout`` pairs after converting. Default: False.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3))
        >>> convert(net)
        1
        >>> net[1]
        Dropout(p=0.3)
    """
    _check_model(model)
    for value, name in ((structured, "structured"), (fuse, "fuse")):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    if structured:
        from dropkit.structured import to_structured  # here, so numba loads only when it is used

        return to_structured(model)
    if _builder(model) is not None:
        raise ValueError("model is itself a dropout module; convert the model that contains it")
    replaced = convert_peft_lora(model)  # PEFT LoRA layers: dropout moves into lora_A (dropkit.lora)
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            builder = _builder(child)
            if builder is None:
                continue
            new = builder(child)
            new.train(child.training)
            setattr(parent, name, new)
            replaced += 1
    log.info("dropkit.convert: replaced %d dropout module(s)", replaced)
    for item in unconverted(model):
        log.warning("dropkit.convert: not converted: %s (%s): %s", item.name or "<model>", item.kind, item.reason)
    if fuse:
        fuse_relu_dropout(model)
    return replaced


class DropoutCall(NamedTuple):
    """A functional dropout call seen by :func:`functional_dropout_calls`."""

    #: name of the innermost module running when the call was made ("" for the model itself)
    module: str
    #: the function called, e.g. ``"dropout"`` or ``"scaled_dot_product_attention"``
    function: str
    #: its drop rate
    p: float


#: functions torch applies dropout in -> (name of the rate argument, its position, training's position)
_FUNCTIONAL = {
    torch.nn.functional.dropout: ("p", 1, 2),
    torch.nn.functional.dropout1d: ("p", 1, 2),
    torch.nn.functional.dropout2d: ("p", 1, 2),
    torch.nn.functional.dropout3d: ("p", 1, 2),
    torch.nn.functional.alpha_dropout: ("p", 1, 2),
    torch.nn.functional.feature_alpha_dropout: ("p", 1, 2),
    torch.nn.functional.scaled_dot_product_attention: ("dropout_p", 4, None),
    torch.nn.functional.multi_head_attention_forward: ("dropout_p", 10, 13),
}


class _Recorder(TorchFunctionMode):
    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack, self.calls = stack, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spec = _FUNCTIONAL.get(func)
        if spec is not None:
            rate_name, rate_pos, training_pos = spec
            p = kwargs.get(rate_name, args[rate_pos] if len(args) > rate_pos else 0.0)
            training = kwargs.get("training", args[training_pos] if training_pos is not None and
                                  len(args) > training_pos else True)
            if training and p:
                self.calls.append(DropoutCall(self.stack[-1], func.__name__, float(p)))
        return func(*args, **kwargs)


def functional_dropout_calls(model: nn.Module, *args: Any, **kwargs: Any) -> list[DropoutCall]:
    """Run ``model(*args, **kwargs)`` once in training mode, without gradients, and list the
    functional dropout calls it makes: torch's ``F.dropout`` family, and
    ``F.scaled_dot_product_attention`` / ``F.multi_head_attention_forward`` with a non-zero rate.
    These stay torch's after :func:`convert`. The model's mode is restored afterwards.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, dropout=0.1)
        >>> q = torch.randn(3, 1, 8)
        >>> [(c.module, c.function) for c in functional_dropout_calls(mha, q, q, q)][:1]
        [('', 'multi_head_attention_forward')]
    """
    _check_model(model)
    stack = [""]
    names = {module: name for name, module in model.named_modules()}
    def enter(name: str) -> None:
        stack.append(name)

    def leave() -> None:
        stack.pop()

    hooks = []
    for module, name in names.items():
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: enter(name)))
        hooks.append(module.register_forward_hook(lambda m, a, o: leave(), always_call=True))
    modes = {m: m.training for m in model.modules()}
    recorder = _Recorder(stack)
    try:
        model.train()
        with torch.no_grad(), recorder:
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    return recorder.calls


def fuse_relu_dropout(model: nn.Module) -> int:
    """Fuse every ``nn.ReLU`` directly followed by a :class:`dropkit.nn.Dropout` (element-wise mask)
    in the ``nn.Sequential`` containers of ``model`` into one :class:`dropkit.nn.ReLUDropout`, in place.

    The fused layer takes the Dropout's place, name, rate, mode and random generator, and the ReLU
    becomes ``nn.Identity``, so module names, ``state_dict`` keys and the sequence of masks stay as
    they were: a fused model computes the same outputs and gradients from the same seeds, with one
    memory pass less each way and one activation tensor less kept for backward. Returns the number
    of pairs fused. Torch's own ``nn.Dropout`` is left alone (``convert`` it first).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), dnn.Dropout(0.5), nn.Linear(4, 2))
        >>> fuse_relu_dropout(net)
        1
    """
    _check_model(model)
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for relu_name, drop_name in zip(names, names[1:]):
            relu, drop = seq._modules[relu_name], seq._modules[drop_name]
            if type(relu) is not nn.ReLU or type(drop) is not dnn.Dropout or drop.mask_shape is not None:
                continue
            layer = dnn.ReLUDropout(drop.p, drop.inplace and relu.inplace)
            layer.seed, layer.generator = drop.seed, drop.generator
            layer.train(drop.training)
            seq._modules[relu_name] = nn.Identity()
            seq._modules[drop_name] = layer
            fused += 1
    log.info("dropkit.fuse_relu_dropout: fused %d ReLU -> Dropout pair(s)", fused)
    return fused


def fuse(model: nn.Module) -> int:
    """Fuse every activation directly followed by a :class:`dropkit.nn.Dropout` (element-wise mask),
    in place: in the ``nn.Sequential`` containers of ``model``, ``ReLU -> Dropout`` into
    :class:`dropkit.nn.ReLUDropout` (as :func:`fuse_relu_dropout`) and ``GELU -> Dropout`` (the exact
    erf GELU) into :class:`dropkit.nn.BiasActDropout` with ``activation="gelu"``; in any module
    whose code calls them as ``self.drop(self.act(h), residual=x)`` (the residual form of
    :class:`dropkit.nn.Dropout`, see there), the pair and the residual add into a
    :class:`dropkit.nn.BiasActDropout` that the module then calls with ``residual=x``.

    The typical place is a ``Linear -> activation -> Dropout`` MLP; the ``Linear`` keeps its own
    bias (on CUDA its matmul adds it for free), so the fused layer has none. As in
    :func:`fuse_relu_dropout`, the fused layer takes the Dropout's place, name, rate, mode and
    random generator and the activation becomes ``nn.Identity``: a fused model computes the same
    outputs and gradients from the same seeds. A module's pair is fused only when its class's
    methods (the module's class and its bases below ``nn.Module``, read with :mod:`inspect`) use
    neither attribute anywhere else, so nothing else sees the activation go; a class whose source
    cannot be read (defined in ``python -c`` or ``exec``) is left as it is, and so is an in-place
    ReLU (its input may be read after it). torch's ``nn.Dropout`` takes no ``residual``: ``convert``
    a model first and write the residual form with :class:`dropkit.nn.Dropout`. Returns the number
    of pairs fused.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.GELU(), dnn.Dropout(0.1), nn.Linear(4, 2))
        >>> fuse(net)
        1
    """
    fused = fuse_relu_dropout(model)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for act_name, drop_name in zip(names, names[1:]):
            act, drop = seq._modules[act_name], seq._modules[drop_name]
            if _activation(act) == "gelu" and _fusable_dropout(drop):
                _swap_in_fused(seq, act_name, drop_name, "gelu")
                fused += 1
    for module in [m for m in model.modules() if not isinstance(m, nn.Sequential)]:
        for act_name, drop_name in _residual_pairs(module):
            _swap_in_fused(module, act_name, drop_name, _activation(module._modules[act_name]))
            fused += 1
    log.info("dropkit.fuse: fused %d activation -> Dropout pair(s) in all", fused)
    return fused


def _activation(module: nn.Module | None) -> str | None:
    """``"relu"`` or ``"gelu"`` for the activation modules :func:`fuse` takes (not an in-place ReLU,
    not the tanh GELU), else None."""
    if type(module) is nn.ReLU and not module.inplace:
        return "relu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    return None


def _fusable_dropout(module: nn.Module | None) -> bool:
    return type(module) is dnn.Dropout and module.mask_shape is None


def _swap_in_fused(parent: nn.Module, act_name: str, drop_name: str, activation: str) -> None:
    """Put a :class:`dropkit.nn.BiasActDropout` with the Dropout's rate, mode and generator in its
    place and ``nn.Identity`` in the activation's."""
    drop = parent._modules[drop_name]
    layer = dnn.BiasActDropout(drop.p, activation=activation)
    layer.seed, layer.generator = drop.seed, drop.generator
    layer.train(drop.training)
    parent._modules[act_name] = nn.Identity()
    parent._modules[drop_name] = layer


def _residual_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """The ``(activation, dropout)`` child names that ``module``'s class calls as
    ``self.<dropout>(self.<activation>(h), residual=r)`` and reads nowhere else (see :func:`fuse`)."""
    children = module._modules
    if not any(_fusable_dropout(c) for c in children.values()) or not any(map(_activation, children.values())):
        return []
    trees = _method_trees(type(module))
    if trees is None:
        log.info("dropkit.fuse: the source of %s cannot be read; its dropout is not fused", type(module).__qualname__)
        return []
    reads = Counter(node.attr for tree in trees for node in ast.walk(tree) if _self_attribute(node) is not None
                    and isinstance(node.ctx, ast.Load))
    pairs = []
    for tree in trees:
        for call in ast.walk(tree):
            drop_name = _self_attribute(getattr(call, "func", None)) if isinstance(call, ast.Call) else None
            if drop_name is None or len(call.args) != 1 or [k.arg for k in call.keywords] != ["residual"]:
                continue
            inner = call.args[0]
            act_name = _self_attribute(inner.func) if isinstance(inner, ast.Call) else None
            if (act_name is None or len(inner.args) != 1 or inner.keywords or reads[act_name] != 1
                    or reads[drop_name] != 1 or not _fusable_dropout(children.get(drop_name))
                    or _activation(children.get(act_name)) is None):
                continue
            pairs.append((act_name, drop_name))
    return pairs


def _self_attribute(node: ast.AST | None) -> str | None:
    """``name`` for an expression ``self.name``, else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


@functools.lru_cache(maxsize=128)
def _method_trees(cls: type) -> tuple[ast.Module, ...] | None:
    """The parsed methods of ``cls`` and of its bases below ``nn.Module``; None if one cannot be read."""
    trees = []
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            continue
        for value in vars(klass).values():
            function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if not inspect.isfunction(function):
                continue
            try:
                trees.append(ast.parse(textwrap.dedent(inspect.getsource(function))))
            except (OSError, TypeError, SyntaxError):
                return None
    return tuple(trees)
