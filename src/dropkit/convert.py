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


def convert(model: nn.Module, *, structured: bool = False) -> int | nn.Module:
    """Replace every torch dropout module inside ``model`` by its dropkit twin with the same ``p``.

    The replacement is in place: other modules, their weights and the train/eval mode are left
    as they are. Returns how many modules were replaced (also logged). Dropout that a model calls
    as a function (``F.dropout`` in ``forward``) is code, not a module, and is not touched.

    With ``structured=True``, ``nn.Sequential`` MLPs (``Linear -> activation -> Dropout ... ->
    Linear``) become :class:`dropkit.structured.StructuredLinearStack` modules sharing their weights,
    and the structured model is returned instead of a count (see :func:`dropkit.structured.to_structured`).

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
    return replaced
