"""The layers (dropkit.nn) and dropkit.convert: modes, validation, repr, mask sharing, weights."""

import pytest
import torch
from torch import nn

import dropkit
from dropkit import nn as dnn

LAYERS = [
    lambda: dnn.Dropout(0.5),
    lambda: dnn.Dropout2d(0.5),
    lambda: dnn.AlphaDropout(0.5),
    lambda: dnn.FeatureAlphaDropout(0.5),
    lambda: dnn.GaussianDropout(0.5),
    lambda: dnn.LockedDropout(0.5),
    lambda: dnn.DropPath(0.5),
    lambda: dnn.DropBlock2d(0.5, block_size=3),
]


@pytest.mark.parametrize("make", LAYERS)
def test_eval_mode_is_identity_and_train_mode_is_not(make):
    layer = make()
    x = torch.randn(4, 3, 8, 8)
    assert not torch.equal(layer(x), x)
    layer.eval()
    assert layer(x) is x


@pytest.mark.parametrize("cls", [dnn.Dropout, dnn.Dropout1d, dnn.Dropout2d, dnn.Dropout3d, dnn.AlphaDropout,
                                 dnn.FeatureAlphaDropout, dnn.GaussianDropout, dnn.LockedDropout, dnn.DropPath])
def test_constructor_validates_p_and_repr_shows_it(cls):
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.2"):
        cls(1.2)
    assert "p=0.25" in repr(cls(0.25))


def test_p_is_validated_on_assignment():
    layer = dnn.Dropout(0.1)
    layer.p = 0.7
    assert layer.p == 0.7
    with pytest.raises(ValueError):
        layer.p = float("nan")


def test_repr_shows_every_setting():
    assert repr(dnn.Dropout(0.3, mask_shape=(None, 1), seed=4)) == "Dropout(p=0.3, seed=4, mask_shape=(None, 1))"
    assert "batch_first=True" in repr(dnn.LockedDropout(0.3, batch_first=True))
    assert "block_size=5" in repr(dnn.DropBlock2d(0.1, 5))
    assert "scale_by_keep=False" in repr(dnn.DropPath(0.1, scale_by_keep=False))


def test_block_size_is_validated_in_constructor():
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        dnn.DropBlock2d(0.1, 0)


def test_mask_shape_is_validated_in_constructor():
    with pytest.raises(ValueError, match="mask_shape entries"):
        dnn.Dropout(0.5, mask_shape=(0, 1))


def test_layer_seed_gives_a_repeatable_sequence_of_different_masks():
    a, b = dnn.Dropout(0.5, seed=3), dnn.Dropout(0.5, seed=3)
    x = torch.ones(256)
    first = [a(x) for _ in range(3)]
    assert all(torch.equal(u, b(x)) for u in first)
    assert not torch.equal(first[0], first[1])


def test_weight_dropout_drops_weights_and_keeps_state_dict():
    lstm = nn.LSTM(5, 8)
    wrapped = dnn.WeightDropout(lstm, ["weight_hh_l0"], 0.5)
    assert set(wrapped.module.state_dict()) == set(nn.LSTM(5, 8).state_dict())
    x = torch.randn(6, 2, 5)
    out, _ = wrapped(x)
    out.sum().backward()
    grad = lstm.weight_hh_l0.grad
    assert 0.3 < float((grad == 0).float().mean()) < 0.7  # dropped weights get no gradient
    assert lstm.weight_ih_l0.grad.abs().sum() > 0
    wrapped.eval()
    assert torch.equal(wrapped(x)[0], lstm(x)[0])


def test_weight_dropout_rejects_unknown_names():
    with pytest.raises(ValueError, match="not parameters of Linear"):
        dnn.WeightDropout(nn.Linear(2, 2), ["weight_hh_l0"], 0.5)


def test_convert_replaces_every_torch_dropout_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Dropout2d(0.2), nn.Flatten(),
        nn.Sequential(nn.Linear(4 * 6 * 6, 10), nn.Dropout(0.4), nn.AlphaDropout(0.1)), nn.Linear(10, 2),
    )
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    before = model(x)
    assert dropkit.convert(model) == 3
    assert isinstance(model[1], dnn.Dropout2d) and model[1].p == 0.2
    assert isinstance(model[3][1], dnn.Dropout) and model[3][1].p == 0.4
    assert isinstance(model[3][2], dnn.AlphaDropout)
    assert not model[1].training
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), before)
    assert dropkit.convert(model) == 0


def _mlp_with_pairs() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), dnn.Dropout(0.2), nn.Linear(20, 64), nn.ReLU(), dnn.Dropout(0.5, seed=11),
        nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), dnn.Dropout(0.3)),
        nn.Linear(64, 32), nn.ReLU(), dnn.Dropout(0.4, mask_shape=(1, None)),  # shared mask: not fused
        nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.5),  # torch's dropout: not fused
        nn.Linear(16, 3),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_relu_dropout_keeps_names_masks_outputs_and_gradients(dtype):
    torch.manual_seed(0)
    plain, fused = _mlp_with_pairs().to(dtype), _mlp_with_pairs().to(dtype)
    fused.load_state_dict(plain.state_dict())
    fused[4].eval()  # the mode of each Dropout carries over
    plain[4].eval()
    assert dropkit.fuse_relu_dropout(fused) == 2
    assert isinstance(fused[3], nn.Identity) and isinstance(fused[4], dnn.ReLUDropout) and fused[4].p == 0.5
    assert fused[4].seed == 11 and not fused[4].training
    assert isinstance(fused[5][2], dnn.ReLUDropout) and fused[5][2].training
    assert type(fused[8]) is dnn.Dropout and type(fused[11]) is nn.Dropout
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = torch.randn(16, 4, 5, dtype=dtype)
    results = []
    for model in (plain, fused):
        torch.manual_seed(7)
        out = model(x)
        out.square().sum().backward()
        results.append((out, [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert dropkit.fuse_relu_dropout(fused) == 0


def test_relu_dropout_layer_is_relu_in_eval_mode_and_zero_at_p_one():
    x = torch.randn(8, 100, requires_grad=True)
    layer = dnn.ReLUDropout(0.5)
    y = layer(x)
    assert bool((y >= 0).all()) and not torch.equal(y, torch.relu(x))
    assert set(torch.unique(y[x > 0] / x[x > 0]).tolist()) <= {0.0, 2.0}
    assert torch.equal(layer.eval()(x), torch.relu(x))
    layer.train().p = 1.0
    out = layer(x)
    out.sum().backward()
    assert not out.any() and not x.grad.any()
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\]"):
        dnn.ReLUDropout(-0.1)


def test_convert_can_fuse_after_replacing():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    assert dropkit.convert(model, fuse=True) == 1
    assert isinstance(model[2], dnn.ReLUDropout) and isinstance(model[1], nn.Identity)
