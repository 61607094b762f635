"""Monte Carlo dropout: only dropout switches on, modes are restored, the uncertainty split holds."""

import pytest
import torch
from torch import nn

import dropkit
from dropkit import mc
from dropkit import nn as dnn


def _net(p: float) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), dnn.Dropout(p), nn.Linear(32, 3))


def test_only_dropout_is_switched_on_and_modes_are_restored():
    net = _net(0.5)
    net.train()
    seen = {}

    def record(module, *_):
        seen[type(module).__name__] = module.training

    for module in net:
        module.register_forward_hook(record)
    mc.mc_samples(net, torch.randn(4, 6), samples=2)
    assert seen["Dropout"] is True and seen["BatchNorm1d"] is False
    assert all(m.training for m in net.modules())


def test_passes_differ_with_dropout_and_agree_without():
    x = torch.randn(8, 6)
    stochastic = mc.mc_samples(_net(0.5), x, samples=5)
    assert not torch.equal(stochastic[0], stochastic[1])
    deterministic = mc.mc_samples(_net(0.0), x, samples=5)
    assert torch.equal(deterministic[0], deterministic[4])


def test_uncertainty_split_sums_and_is_zero_without_noise():
    x = torch.randn(16, 6)
    dropkit.manual_seed(1)
    out = mc.mc_classify(_net(0.5), x, samples=40)
    assert torch.allclose(out.probs.sum(-1), torch.ones(16))
    assert torch.allclose(out.aleatoric + out.epistemic, out.total, atol=1e-6)
    assert (out.epistemic > 0).all()
    calm = mc.mc_classify(_net(0.0), x, samples=5)
    assert torch.allclose(calm.epistemic, torch.zeros(16), atol=1e-6)


def test_regression_mean_and_variance():
    net = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 1))
    mean, var = mc.mc_regress(net, torch.randn(10, 3), samples=30)
    assert mean.shape == var.shape == (10, 1) and (var > 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        mc.mc_samples(_net(0.5), torch.randn(2, 6), samples=0)
    with pytest.raises(ValueError, match="no dropout layer"):
        mc.mc_samples(nn.Linear(2, 2), torch.randn(2, 2))
