"""dropkit: dropout for PyTorch, correct, fast and easy to tune.

The common entry points are re-exported here::

    import dropkit
    dropkit.manual_seed(0)
    y = dropkit.dropout(x, 0.5, training=True)
    layer = dropkit.nn.Dropout(0.5)
    n = dropkit.convert(model)   # swap torch dropout modules for dropkit ones
    dropkit.fuse_relu_dropout(model)  # ReLU -> Dropout pairs become one pass each way
"""

from dropkit import functional, nn, rng
from dropkit.convert import convert, fuse_relu_dropout
from dropkit.functional import dropout
from dropkit.rng import manual_seed

__all__ = ["convert", "dropout", "fuse_relu_dropout", "functional", "manual_seed", "nn", "rng"]
__version__ = "0.1.0"
