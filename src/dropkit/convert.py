"""Swap torch's dropout modules in any model for their dropkit twins, in place."""

from __future__ import annotations

import logging

from torch import nn

from dropkit import nn as dnn

log = logging.getLogger(__name__)

#: torch module type -> dropkit twin taking the same ``p``
TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Dropout: dnn.Dropout,
    nn.Dropout1d: dnn.Dropout1d,
    nn.Dropout2d: dnn.Dropout2d,
    nn.Dropout3d: dnn.Dropout3d,
    nn.AlphaDropout: dnn.AlphaDropout,
    nn.FeatureAlphaDropout: dnn.FeatureAlphaDropout,
}


def convert(model: nn.Module, *, structured: bool = False, fuse: bool = False) -> int | nn.Module:
    """Replace every torch dropout module inside ``model`` by its dropkit twin with the same ``p``.

    The replacement is in place: other modules, their weights and the train/eval mode are left
    as they are. Returns how many modules were replaced (also logged). Dropout that a model calls
    as a function (``F.dropout`` in ``forward``) is code, not a module, and is not touched.

    With ``structured=True``, ``nn.Sequential`` MLPs (``Linear -> activation -> Dropout ... ->
    Linear``) become :class:`dropkit.structured.StructuredLinearStack` modules sharing their weights,
    and the structured model is returned instead of a count (see :func:`dropkit.structured.to_structured`).
    With ``fuse=True``, the converted ``ReLU -> Dropout`` pairs are then fused (:func:`fuse_relu_dropout`).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3))
        >>> convert(net)
        1
    """
    if structured:
        from dropkit.structured import to_structured  # here, so numba loads only when it is used

        return to_structured(model)
    if type(model) in TWINS:
        raise ValueError("model is itself a dropout module; convert the model that contains it")
    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            twin = TWINS.get(type(child))
            if twin is None:
                continue
            new = twin(child.p)
            new.train(child.training)
            setattr(parent, name, new)
            replaced += 1
    log.info("dropkit.convert: replaced %d dropout module(s)", replaced)
    if fuse:
        fuse_relu_dropout(model)
    return replaced


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
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for relu_name, drop_name in zip(names, names[1:]):
            relu, drop = seq._modules[relu_name], seq._modules[drop_name]
            if type(relu) is not nn.ReLU or type(drop) is not dnn.Dropout or drop.mask_shape is not None:
                continue
            layer = dnn.ReLUDropout(drop.p)
            layer.seed, layer.generator = drop.seed, drop.generator
            layer.train(drop.training)
            seq._modules[relu_name] = nn.Identity()
            seq._modules[drop_name] = layer
            fused += 1
    log.info("dropkit.fuse_relu_dropout: fused %d ReLU -> Dropout pair(s)", fused)
    return fused
