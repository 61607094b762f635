"""The settings every random layer of dropkit shares: a validated rate ``p`` and an optional seeded
generator whose state is part of the layer's ``state_dict``.

:class:`SeededRate` is a mixin for ``nn.Module`` subclasses (dropkit's dropout layers,
:class:`dropkit.residual.DropPathResidual`, :class:`dropkit.lora.DropoutLinear`): ``p`` is checked
on every assignment (schedules and controllers change it between steps), and ``seed`` gives the
layer its own ``torch.Generator``, seeded once, whose state is saved under the key
``generator_state`` and restored on load, so a resumed run continues the mask sequence exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from dropkit.functional import check_p
from dropkit.rng import check_seed

__all__ = ["GENERATOR_STATE", "SeededRate"]

#: the ``state_dict`` key (after the layer's prefix) of a seeded layer's generator state
GENERATOR_STATE = "generator_state"


class SeededRate:
    """Mixin: ``p`` validated on assignment; ``seed`` -> ``generator`` kept in ``state_dict``.

    Call :meth:`_init_rate_and_seed` from ``__init__`` after ``nn.Module.__init__``.
    """

    generator: torch.Generator | None

    def _init_rate_and_seed(self, p: float, seed: int | None) -> None:
        self.p = p
        self.seed = seed
        self.generator = None
        if seed is not None:
            check_seed(seed)
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = check_p(value)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.generator is not None:
            destination[prefix + GENERATOR_STATE] = self.generator.get_state()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + GENERATOR_STATE
        if self.generator is not None:
            if key in state_dict:
                state = state_dict.pop(key)
                if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
                    error_msgs.append(f"{key}: expected a uint8 tensor (torch.Generator.get_state()), "
                                      f"got {type(state).__name__}")
                else:
                    self.generator.set_state(state.cpu())
            elif strict:
                missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _seed_repr(self, text: str) -> str:
        return text if self.seed is None else f"{text}, seed={self.seed}"
