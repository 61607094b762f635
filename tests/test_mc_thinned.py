"""Thinned Monte Carlo passes: each pass equals the dense network with one keep mask per layer shared
by the batch, only MLPs are accepted, and a row's passes depend on the seed alone."""

import math

import pytest
import torch
from torch import nn

from dropkit import kernels, mc, mc_thinned, rng
from dropkit import nn as dnn
from dropkit.convert import fuse_relu_dropout
from dropkit.lab.models import srivastava_mlp, tutorial_mlp


def _mlp(activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), dnn.Dropout(0.2), nn.Linear(12, 32), activation(), nn.Dropout(0.5),
                         nn.Linear(32, 16), activation(), nn.Linear(16, 24), activation(), dnn.Dropout(0.25),
                         nn.Linear(24, 5)).double()


def _dense_pass(model: nn.Sequential, x: torch.Tensor, seed: int, t: int) -> torch.Tensor:
    """Pass ``t`` computed densely: every unit, with the documented keep masks multiplied in."""
    h, linear_index = x.flatten(1), 0
    for module in model[1:]:
        if isinstance(module, (nn.Dropout, dnn.Dropout)):
            keep = kernels.keep_mask(rng.derive_seed(seed, mc_thinned._THINNED_STREAM, t, linear_index),
                                     module.p, (h.shape[1],))
            h = h * keep / (1 - module.p)
        else:
            linear_index += isinstance(module, nn.Linear)
            h = module(h)
    return h


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Sigmoid, nn.GELU])
def test_each_pass_is_the_dense_network_with_its_masks(activation):
    # sigmoid(0) = 0.5: a dropped unit must be zeroed after the activation, not before
    model = _mlp(activation)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    samples = mc.mc_samples(model, x, samples=6, seed=21, shared_masks=True)
    assert samples.shape == (6, 7, 5)
    for t in range(6):
        torch.testing.assert_close(samples[t], _dense_pass(model, x, 21, t), rtol=1e-12, atol=1e-12)
    assert not torch.equal(samples[0], samples[1])


def test_rows_share_the_pass_network_and_do_not_depend_on_the_batch():
    model = _mlp()
    x = torch.randn(5, 12, dtype=torch.float64)
    batch = mc.mc_samples(model, torch.cat([x, x[:1]]), samples=8, seed=3, shared_masks=True)
    torch.testing.assert_close(batch[:, 0], batch[:, 5], rtol=1e-12, atol=1e-12)  # same input and pass
    alone = mc.mc_samples(model, x[2:3], samples=8, seed=3, shared_masks=True)
    torch.testing.assert_close(alone[:, 0], batch[:, 2], rtol=1e-12, atol=1e-12)


def test_mean_and_spread_of_the_passes_of_a_linear_read_out():
    # Dropout(p) -> Linear: out = b + sum_j w_j x_j m_j / (1 - p), m_j ~ Bernoulli(1 - q), q the drop
    # rate as drawn (p rounded to 16 bits); mean b + (1 - q) / (1 - p) sum_j w_j x_j, sd as below
    torch.manual_seed(1)
    model = nn.Sequential(dnn.Dropout(0.3), nn.Linear(64, 1)).double()
    x = torch.randn(1, 64, dtype=torch.float64)
    passes = 4000
    samples = mc.mc_samples(model, x, samples=passes, seed=0, shared_masks=True)[:, 0, 0]
    q = rng.threshold(0.3) / 2**16
    wx = model[1].weight[0].detach() * x[0]
    mean = float(model[1].bias.detach()) + (1 - q) / (1 - 0.3) * float(wx.sum())
    sd = math.sqrt(q * (1 - q) * float((wx**2).sum())) / (1 - 0.3)
    assert abs(float(samples.mean()) - mean) < 5 * sd / math.sqrt(passes)
    assert abs(float(samples.std()) / sd - 1) < 5 / math.sqrt(2 * passes)


def test_seeded_repeatable_and_prefix_stable():
    model = _mlp()
    x = torch.randn(4, 12, dtype=torch.float64)
    first = mc.mc_samples(model, x, samples=10, seed=8, shared_masks=True)
    assert torch.equal(first, mc.mc_samples(model, x, samples=10, seed=8, shared_masks=True))
    assert torch.equal(first[:4], mc.mc_samples(model, x, samples=4, seed=8, shared_masks=True))
    assert not torch.equal(first, mc.mc_samples(model, x, samples=10, seed=9, shared_masks=True))


def test_lab_mlps_fused_or_not_are_read():
    fused = srivastava_mlp(p_input=0.2, p_hidden=0.5, width=32, depth=2)
    fuse_relu_dropout(fused)
    assert any(isinstance(m, dnn.ReLUDropout) for m in fused)
    mlp = mc_thinned.parse_mlp(fused)
    assert mlp.flatten and mlp.rates == (0.2, 0.5, 0.5)
    assert [len(a) for a in mlp.activations] == [1, 1, 0]
    assert mc_thinned.parse_mlp(tutorial_mlp(p=0.3)).rates == (0.0, 0.3)
    out = mc.mc_classify(fused, torch.randn(3, 1, 28, 28), samples=5, seed=0, shared_masks=True)
    assert out.probs.shape == (3, 10)


def test_models_that_are_not_mlps_are_refused_with_the_reason():
    cases = {
        "before the first Linear": nn.Sequential(nn.ReLU(), nn.Linear(4, 2)),
        "activation after a dropout": nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sigmoid(), nn.Linear(4, 2)),
        "two dropouts in a row": nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), dnn.Dropout(0.5), nn.Linear(4, 2)),
        "after the last Linear": nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.5)),
        "position 1 holds BatchNorm1d": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
        "shares its mask": nn.Sequential(dnn.Dropout(0.5, mask_shape=(1, None)), nn.Linear(4, 2)),
        "do not chain": nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(5, 2)),
        "only Flatten": nn.Sequential(nn.Flatten(0), nn.Linear(4, 2)),
        "at least one nn.Linear": nn.Sequential(nn.Flatten(), nn.Dropout(0.5)),
        "has no dropout": nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
    }
    failures = []
    for reason, model in cases.items():
        try:
            mc.mc_samples(model, torch.randn(2, 4), samples=2, seed=0, shared_masks=True)
            failures.append(f"{reason}: accepted")
        except ValueError as err:
            if reason not in str(err):
                failures.append(f"{reason}: {err}")
    assert not failures, failures
    with pytest.raises(TypeError, match="nn.Sequential MLP"):
        mc.mc_samples(nn.Linear(4, 2), torch.randn(2, 4), samples=2, seed=0, shared_masks=True)
    with pytest.raises(ValueError, match=r"x must be \(N, 12\)"):
        mc.mc_samples(_mlp(), torch.randn(2, 5, dtype=torch.float64), samples=2, seed=0, shared_masks=True)
    with pytest.raises(TypeError, match="shared_masks must be a bool"):
        mc.mc_samples(_mlp(), torch.randn(2, 12), samples=2, shared_masks=1)


def test_every_unit_dropped_leaves_the_biases():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), dnn.Dropout(1.0), nn.Linear(4, 2))
    out = mc.mc_samples(model, torch.randn(5, 3), samples=3, seed=0, shared_masks=True)
    torch.testing.assert_close(out, model[3].bias.detach().expand(3, 5, 2))
