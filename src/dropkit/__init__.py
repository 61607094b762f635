"""dropkit: dropout for PyTorch, correct, fast and easy to tune.

The common entry points are re-exported here::

    import dropkit
    dropkit.manual_seed(0)
    y = dropkit.dropout(x, 0.5, training=True)
    layer = dropkit.nn.Dropout(0.5)
    n = dropkit.convert(model)   # swap torch dropout modules for dropkit ones
    dropkit.fuse_relu_dropout(model)  # ReLU -> Dropout pairs become one pass each way
    dropkit.fuse(model)  # ReLU or GELU -> Dropout pairs, one pass each way

They are loaded on first use (PEP 562), so ``import dropkit`` alone, and the ``dropkit --help``
that runs it, does not import torch.
"""

import importlib
import sys
import types
from typing import Any

__all__ = ["convert", "dropout", "fuse", "fuse_relu_dropout", "functional", "manual_seed", "nn", "rng"]
__version__ = "0.1.0"

#: public name -> (module, attribute in it; None for the module itself)
_LAZY = {
    "functional": ("dropkit.functional", None), "nn": ("dropkit.nn", None), "rng": ("dropkit.rng", None),
    "convert": ("dropkit.convert", "convert"), "fuse_relu_dropout": ("dropkit.convert", "fuse_relu_dropout"),
    "fuse": ("dropkit.convert", "fuse"),
    "dropout": ("dropkit.functional", "dropout"), "manual_seed": ("dropkit.rng", "manual_seed"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dropkit' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """The package object: importing the submodule ``dropkit.convert`` would bind its name here
    and hide the function ``dropkit.convert``; the function is kept, as an eager import had it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name, ("", None))[1] is not None:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
