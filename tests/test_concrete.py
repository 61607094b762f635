"""dropkit.concrete: the relaxed mask, the regulariser's value, p learnt by gradient and kept in
(0, 1), eval as identity, and the conversion of a model."""

import math

import pytest
import torch
from torch import nn

import dropkit
from dropkit import nn as dnn
from dropkit.concrete import (
    ConcreteDropout,
    concrete_rates,
    concrete_regularisation,
    regularizer_weights,
    to_concrete,
)
from dropkit.lab.models import output_layer, srivastava_mlp


def concrete(in_features=8, layer=None, **kwargs):
    kwargs.setdefault("weight_regularizer", 0.0)
    kwargs.setdefault("dropout_regularizer", 0.0)
    return ConcreteDropout(in_features, layer, **kwargs)


def test_eval_mode_is_identity():
    layer = concrete(init_p=0.5).eval()
    x = torch.randn(4, 8)
    assert layer(x) is x
    linear = nn.Linear(8, 3)
    wrapped = concrete(layer=linear, init_p=0.5).eval()
    assert torch.equal(wrapped(x), linear(x))


def test_train_mode_drops_a_binomial_fraction_and_scales_by_keep():
    # z > 1/2 exactly when logit(p) + logit(u) > 0, i.e. u > 1 - p: a Bernoulli(p) event per element
    dropkit.manual_seed(0)
    p, n = 0.3, 200_000
    layer = concrete(n, init_p=p)
    with torch.no_grad():
        y = layer(torch.ones(1, n))
    keep = y * (1 - layer.p)  # the keep mask 1 - z
    assert keep.min() >= 0 and keep.max() <= 1
    dropped = (keep < 0.5).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    # at temperature 0.1 the mask is nearly binary: most entries lie within 0.05 of 0 or 1
    assert ((keep < 0.05) | (keep > 0.95)).float().mean() > 0.8


def test_same_seed_same_mask():
    x = torch.randn(16, 8)
    dropkit.manual_seed(3)
    a = concrete(init_p=0.4)(x)
    dropkit.manual_seed(3)
    b = concrete(init_p=0.4)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, concrete(init_p=0.4)(x))
    assert torch.equal(concrete(init_p=0.4, seed=7)(x), concrete(init_p=0.4, seed=7)(x))


def test_regulariser_has_documented_value():
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.fill_(2.0)  # ||W||^2 = 12 * 4 = 48
    layer = ConcreteDropout(4, linear, init_p=0.25, weight_regularizer=1e-2, dropout_regularizer=1e-3)
    assert layer.p == pytest.approx(0.25, abs=1e-6)
    expected = 1e-2 * 48 / 0.75 + 1e-3 * 4 * (0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert layer.regularisation().item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.6377507, rel=1e-6)
    # an explicit weight, and a shape for K (2 * 2 = 4 inputs)
    shaped = ConcreteDropout((2, 2), init_p=0.25, weight_regularizer=1e-2, dropout_regularizer=1e-3)
    assert shaped.regularisation(torch.full((3, 4), 2.0)).item() == pytest.approx(expected, rel=1e-5)


def test_model_regularisation_sums_layers_and_needs_wrapped_layers():
    a = ConcreteDropout(4, nn.Linear(4, 4), weight_regularizer=1e-2, dropout_regularizer=1e-3)
    b = ConcreteDropout(4, nn.Linear(4, 2), init_p=0.3, weight_regularizer=1e-2, dropout_regularizer=1e-3)
    model = nn.Sequential(a, nn.ReLU(), b)
    total = concrete_regularisation(model)
    assert total.item() == pytest.approx((a.regularisation() + b.regularisation()).item())
    assert total.requires_grad
    assert concrete_rates(model) == {"0": pytest.approx(0.1), "2": pytest.approx(0.3)}
    with pytest.raises(ValueError, match="wrap no layer"):
        concrete_regularisation(nn.Sequential(concrete(4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="no ConcreteDropout"):
        concrete_regularisation(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="weight"):
        concrete(4).regularisation()


def test_entropy_term_pushes_p_towards_half():
    layer = ConcreteDropout(8, nn.Linear(8, 1), init_p=0.1, weight_regularizer=0.0, dropout_regularizer=1.0)
    optimizer = torch.optim.SGD([layer.p_logit], lr=0.1)
    ps = [layer.p]
    for _ in range(5):
        optimizer.zero_grad()
        layer.regularisation().backward()
        optimizer.step()
        ps.append(layer.p)
    assert all(a < b < 0.5 for a, b in zip(ps, ps[1:]))


def test_p_falls_when_noise_only_hurts_the_fit():
    # noiseless linear regression: any dropout adds error, so with no regulariser p must go down
    dropkit.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    model = concrete(8, nn.Linear(8, 1), init_p=0.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    assert model.p < 0.15


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_p_stays_inside_zero_one_under_huge_gradients(direction):
    layer = concrete(8, nn.Linear(8, 2), init_p=0.5, weight_regularizer=1e-2, dropout_regularizer=1e-2)
    optimizer = torch.optim.SGD([layer.p_logit], lr=1e6)
    for _ in range(3):
        optimizer.zero_grad()
        (direction * 1e6 * layer.drop_probability()).backward()
        optimizer.step()
    assert abs(layer.p_logit.item()) > 1e4  # pushed far into saturation
    assert 0.0 < layer.p < 1.0
    out = layer(torch.randn(4, 8))
    reg = layer.regularisation()
    (out.sum() + reg).backward()
    assert torch.isfinite(out).all() and torch.isfinite(reg)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_input_shape_and_settings_are_validated():
    with pytest.raises(ValueError, match="expected input of shape"):
        concrete(8)(torch.randn(4, 7))
    with pytest.raises(ValueError, match="in_features"):
        concrete(0)
    with pytest.raises(ValueError, match="init_p"):
        concrete(init_p=0.9995)
    with pytest.raises(ValueError, match="p_bounds"):
        concrete(p_bounds=(0.0, 0.5))
    with pytest.raises(ValueError, match="temperature"):
        concrete(temperature=0.0)
    with pytest.raises(ValueError, match="regularizers"):
        concrete(weight_regularizer=-1.0)


def test_regularizer_weights_follow_gal_et_al():
    wr, dr = regularizer_weights(50_000, length_scale=1e-2, precision=2.0)
    assert wr == pytest.approx(1e-4 / 1e5) and dr == pytest.approx(2 / 1e5)
    with pytest.raises(ValueError):
        regularizer_weights(0)


def test_to_concrete_converts_an_mlp_and_keeps_its_rates():
    model = srivastava_mlp(p_input=0.2, p_hidden=0.5, width=16, depth=2)
    last = output_layer(model)
    assert to_concrete(model, weight_regularizer=1e-6, dropout_regularizer=1e-5) == 3
    layers = [m for m in model.modules() if isinstance(m, ConcreteDropout)]
    assert [m.p for m in layers] == pytest.approx([0.2, 0.5, 0.5])
    assert not any(isinstance(m, dnn.Dropout) for m in model.modules())
    assert output_layer(model) is last and layers[-1].layer is last
    assert model(torch.randn(5, 28, 28)).shape == (5, 10)
    assert concrete_regularisation(model).requires_grad
    # a Dropout with a mask shape, or one not followed by a Linear, is left alone
    other = nn.Sequential(dnn.Dropout(0.1, mask_shape=(None, 1)), nn.Linear(4, 4), dnn.Dropout(0.1))
    assert to_concrete(other, weight_regularizer=0.0, dropout_regularizer=0.0) == 0


def test_low_precision_input_gives_finite_output_of_its_dtype():
    dropkit.manual_seed(1)
    x = torch.randn(4096, 8, dtype=torch.float16)
    y = concrete(init_p=0.5)(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
