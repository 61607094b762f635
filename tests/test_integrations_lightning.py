"""MC dropout in Lightning's predict loop: on during predict, off and restored after."""

import pytest
import torch
from torch import nn

try:
    import lightning.pytorch as lightning
except Exception as err:  # noqa: BLE001 - e.g. PyPI's CUDA torchvision beside a CPU-only torch breaks its import
    pytest.skip(f"lightning cannot be imported here: {err}", allow_module_level=True)

from dropkit import mc  # noqa: E402
from dropkit.integrations.lightning import MCDropoutCallback  # noqa: E402


class Classifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class CustomStep(Classifier):
    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0]).softmax(-1)


def _predict(module, callbacks, loader):
    trainer = lightning.Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", devices=1)
    return trainer.predict(module, loader)


X = torch.randn(10, 4)


class Batches:
    """Tensor batches as one dataloader (a list would be read as one dataloader per tensor)."""

    def __init__(self, *batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_without_the_callback_predict_is_deterministic():
    module = Classifier()
    first, second = _predict(module, [], Batches(X)), _predict(module, [], Batches(X))
    assert torch.equal(first[0], second[0])


def test_callback_turns_dropout_on_and_restores_modes():
    module = Classifier()
    module.train()
    first = _predict(module, [MCDropoutCallback()], Batches(X))[0]
    second = _predict(module, [MCDropoutCallback()], Batches(X))[0]
    assert not torch.equal(first, second)
    assert all(m.training for m in module.modules()) and torch.backends.mha.get_fastpath_enabled()


def test_samples_stack_matches_mc_samples_and_repeats():
    module = Classifier().eval()
    stacks = _predict(module, [MCDropoutCallback(samples=6, seed=2)], Batches(X[:5], X[5:]))
    assert [s.shape for s in stacks] == [(6, 5, 3), (6, 5, 3)]
    from dropkit import rng
    expected = mc.mc_samples(module, X[5:], 6, seed=rng.derive_seed(2, 0, 1))
    assert torch.equal(stacks[1], expected)
    again = _predict(module, [MCDropoutCallback(samples=6, seed=2)], Batches(X[:5], X[5:]))
    assert torch.equal(stacks[0], again[0]) and torch.equal(stacks[1], again[1])
    assert "predict_step" not in module.__dict__


def test_custom_predict_step_runs_once_per_pass():
    module = CustomStep()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=5)
    stacks = _predict(module, [MCDropoutCallback(samples=4, seed=0)], loader)
    assert stacks[0].shape == (4, 5, 3)
    assert not torch.equal(stacks[0][0], stacks[0][1])
    assert torch.allclose(stacks[0].sum(-1), torch.ones(4, 5))
    assert torch.equal(stacks[0], _predict(module, [MCDropoutCallback(samples=4, seed=0)], loader)[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="samples must be"):
        MCDropoutCallback(samples=0)
    with pytest.raises(ValueError, match="seed must be"):
        MCDropoutCallback(seed=-1)
