"""Make torchvision's Python modules importable where its compiled operators cannot load.

The torchvision wheels built for torch 2.13 are CUDA builds; on torch's CPU build their C++
extension does not load, and ``import torchvision`` then fails while registering fake kernels for
the detection operators it lacks (``operator torchvision::nms does not exist``). timm imports
torchvision, and transformers does too when it is installed, so both fail with it. The models these
benchmarks and tests use (ViT, Swin, ConvNeXt) need none of those operators: when the import fails
that way, :func:`import_torchvision` imports torchvision again without its fake-kernel module.
"""

from __future__ import annotations

import sys
import types


def import_torchvision() -> bool:
    """Import torchvision (without its fake kernels if its operators cannot load); whether it imported."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
    return True
