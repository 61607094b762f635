"""Monte Carlo dropout in Hugging Face's ``Trainer.predict`` and ``Trainer.evaluate``.

``Trainer.evaluation_loop`` puts the model in eval mode right before its first prediction step,
and no ``TrainerCallback`` event falls between that call and the step (``on_prediction_step``
comes after each step), so a callback cannot turn dropout back on in time. The hook is the
trainer's own ``prediction_step``: :class:`MCDropoutTrainerMixin` runs it inside
:func:`dropkit.mc.dropout_active` (only the dropout modules in training mode, torch's fused
transformer path off, every mode restored after the step). Each ``predict`` call is then one
stochastic pass; call it T times (with ``transformers.set_seed`` for repeatable passes) and
average the probabilities.

Needs ``transformers`` (``pip install dropkit[huggingface]``).

Example:
    >>> class MCTrainer(MCDropoutTrainerMixin, transformers.Trainer):
    ...     pass
    >>> trainer = MCTrainer(model=model, args=args)
    >>> passes = []
    >>> for t in range(30):
    ...     transformers.set_seed(t)
    ...     passes.append(trainer.predict(dataset).predictions)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dropkit.mc import dropout_active

__all__ = ["MCDropoutTrainerMixin"]


class MCDropoutTrainerMixin:
    """Mix in before ``transformers.Trainer``: prediction steps run with dropout on.

    Set ``mc_dropout = False`` on an instance to predict deterministically again.
    """

    mc_dropout: bool = True

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        if not self.mc_dropout:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        with dropout_active(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
