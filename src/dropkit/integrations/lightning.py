"""Monte Carlo dropout in Lightning's ``Trainer.predict``.

Lightning puts the whole model in eval mode before predicting, so dropout is off in every
``predict_step`` and a model asked for T stochastic passes returns T identical ones.
:class:`MCDropoutCallback` switches the model's dropout modules back on once the loop has done so
(only them: batch norm stays in eval; see :func:`dropkit.mc.dropout_active`) and restores every
module's mode when predicting ends. With ``samples``, each batch's prediction becomes the stack of
``samples`` passes, drawn by :func:`dropkit.mc.mc_samples` (batched) when the module keeps
Lightning's default ``predict_step`` (``self(batch)``) on a tensor batch, and otherwise by calling
``predict_step`` once per pass. Either way pass ``t`` of batch ``b`` of dataloader ``d`` has the
seed ``derive_seed(seed, d, b)``-derived masks, so predictions repeat run after run.

Needs the ``lightning`` extra (``pip install dropkit[lightning]``).

Example:
    >>> trainer = lightning.Trainer(callbacks=[MCDropoutCallback(samples=30, seed=0)])
    >>> stacks = trainer.predict(model, loader)       # one (30, batch, classes) tensor per batch
    >>> probs = torch.cat([s.softmax(-1).mean(0) for s in stacks])
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("dropkit.integrations.lightning needs Lightning: pip install 'dropkit[lightning]'") from err

from dropkit import rng
from dropkit.mc import DEFAULT_MEMORY_BUDGET, dropout_active, mc_samples

__all__ = ["MCDropoutCallback"]


class MCDropoutCallback(pl.Callback):
    """Keep dropout on during ``Trainer.predict`` (Monte Carlo dropout; Gal & Ghahramani 2016).

    Args:
        samples: passes per batch, stacked along a new first dimension of each prediction; None
            leaves one ``predict_step`` call per batch, with dropout on.
        seed: seed of the passes (with ``samples``); the masks of a batch depend on it and on the
            batch's position only.
        memory_budget: bytes of module outputs per batched forward (see :func:`dropkit.mc.mc_samples`).
    """

    def __init__(self, samples: int | None = None, *, seed: int = 0,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise ValueError(f"samples must be an int >= 1 or None, got {samples!r}")
        rng.check_seed(seed)
        self.samples = samples
        self.seed = seed
        self.memory_budget = memory_budget
        self._stack: ExitStack | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stack = ExitStack()
        stack.enter_context(dropout_active(pl_module))
        if self.samples is not None:
            original = pl_module.__dict__.get("predict_step")
            stack.callback(_restore, pl_module, original)
            pl_module.predict_step = self._sampled_step(pl_module, pl_module.predict_step)
        self._stack = stack

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _sampled_step(self, pl_module: pl.LightningModule, step):
        default = type(pl_module).predict_step is pl.LightningModule.predict_step

        def sampled(batch: Any, batch_idx: int = 0, dataloader_idx: int = 0, *args: Any, **kwargs: Any) -> Any:
            seed = rng.derive_seed(self.seed, dataloader_idx, batch_idx)
            if default and isinstance(batch, torch.Tensor):
                return mc_samples(pl_module, batch, self.samples, seed=seed, memory_budget=self.memory_budget)
            outs = []
            with torch.random.fork_rng(devices=[]):
                for t in range(self.samples):
                    torch.manual_seed(rng.derive_seed(seed, t))
                    outs.append(step(batch, batch_idx, dataloader_idx, *args, **kwargs))
            return torch.stack(outs)

        return sampled


def _restore(module: torch.nn.Module, original: Any) -> None:
    if original is None:
        del module.predict_step
    else:
        module.predict_step = original
