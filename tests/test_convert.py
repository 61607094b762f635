"""dropkit.convert keeps behaviour: each swapped module acts as the original on every rank it takes."""

from __future__ import annotations

import importlib
import logging
import warnings

import pytest
import torch
from torch import nn

import dropkit
from dropkit import nn as dnn
from dropkit.convert import convert, functional_dropout_calls, unconverted

#: torch's dropout classes and the ranks to try (0-D to 6-D: some ranks torch refuses, some it takes)
TORCH_CLASSES = [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout]
SHAPES = [(), (7,), (6, 7), (5, 6, 7), (4, 5, 6, 7), (3, 4, 5, 6, 7), (3, 2, 3, 4, 3, 5)]


def _optional(name: str):
    """The module ``name``, or a skip when it is missing or cannot be imported (a PyPI torchvision
    built for CUDA fails to load its operators next to torch's CPU build)."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any import failure means the package is unusable here
        pytest.skip(f"{name} is not importable here: {type(err).__name__}: {str(err)[:120]}")


def _run(module: nn.Module, x: torch.Tensor):
    """The module's output on ``x``, or the exception class it raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return module(x.clone())
        except (RuntimeError, ValueError, IndexError) as err:
            return type(err)


def _shared_dims(y: torch.Tensor, x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions along which the drop pattern of ``y`` (the output for input ``x``) is shared."""
    dropped = y != x
    return tuple(d for d in range(dropped.dim()) if dropped.shape[d] > 1
                 and bool((dropped == dropped.narrow(d, 0, 1)).all()))


@pytest.mark.parametrize("cls", TORCH_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("training", [True, False])
def test_converted_module_behaves_like_torchs_on_every_rank(cls, shape, training):
    original = cls(0.5).train(training)
    model = nn.Sequential(cls(0.5)).train(training)
    x = torch.rand(shape) + 1.0  # positive, so a dropped value (0, or alpha's) differs from the input
    expected = _run(original, x)
    assert convert(model) == 1 and type(model[0]).__module__ == "dropkit.nn"
    assert model[0].training == training
    got = _run(model, x)
    if isinstance(expected, type):  # torch refuses this rank: so does the twin
        assert isinstance(got, type), f"{cls.__name__} refuses {len(shape)}-D input, the twin accepted it"
        return
    assert isinstance(got, torch.Tensor), f"{cls.__name__} takes {len(shape)}-D input, the twin raised {got}"
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if not training:
        assert torch.equal(got, x)
        return
    # the same dimensions share a draw (over several draws: a dimension of >= 3 draws shares one
    # value by chance with probability <= 2 * 0.5**3 per draw, and all three draws must agree)
    for seed in range(3):
        torch.manual_seed(seed)
        want = _shared_dims(_run(original, x), x)
        dropkit.manual_seed(seed)
        have = _shared_dims(_run(model, x), x)
        assert set(have) >= set(want), (cls.__name__, shape, have, want)
    if x.numel() >= 24:
        assert _shared_dims(got, x) == _shared_dims(expected, x) or len(shape) >= 5
    # the same values where kept and where dropped
    if cls in (nn.AlphaDropout, nn.FeatureAlphaDropout):
        a, b = dropkit.ops.alpha_dropout_affine(0.5)
        kept, dropped = a * x + b, torch.full_like(x, a * dropkit.ops.SELU_SATURATION + b)
        for y in (got, expected):
            assert bool((torch.isclose(y, kept, atol=1e-5) | torch.isclose(y, dropped, atol=1e-5)).all())
    else:
        for y in (got, expected):
            assert set((y / x).unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("cls", TORCH_CLASSES, ids=lambda c: c.__name__)
def test_convert_keeps_p_and_inplace(cls):
    model = nn.Sequential(cls(0.3, inplace=True))
    convert(model)
    assert model[0].p == 0.3 and model[0].inplace is True


def test_converted_dropout2d_reads_3d_input_as_torch_does_while_dropkits_own_reads_it_unbatched():
    x = torch.ones(4, 8, 50)
    model = nn.Sequential(nn.Dropout2d(0.5))
    convert(model)
    y = model(x)  # (N, C, L): one draw per (sample, channel), shared along L
    assert torch.equal(y == 0, (y[..., :1] == 0).expand_as(y))
    assert not torch.equal(y == 0, (y[:, :1] == 0).expand_as(y))
    own = dnn.Dropout2d(0.5)(x)  # (C, H, W): one draw per leading index, shared over the rest
    assert torch.equal(own == 0, (own[:, :1, :1] == 0).expand_as(own))


def test_convert_refuses_what_is_not_a_model():
    for bad in [None, "model", 3, torch.ones(2)]:
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            convert(bad)
    with pytest.raises(TypeError, match="fuse must be a bool"):
        convert(nn.Linear(2, 2), fuse="yes")
    with pytest.raises(ValueError, match="itself a dropout module"):
        convert(nn.Dropout(0.1))


def test_attention_dropout_is_reported_not_swapped(caplog):
    layer = nn.TransformerEncoderLayer(16, 2, dropout=0.1, batch_first=True)
    with caplog.at_level(logging.WARNING, logger="dropkit.convert"):
        assert convert(layer) == 3  # dropout, dropout1, dropout2
    assert "not converted: self_attn (MultiheadAttention)" in caplog.text
    assert [(u.name, u.kind) for u in unconverted(layer)] == [("self_attn", "MultiheadAttention")]
    calls = functional_dropout_calls(layer, torch.randn(2, 5, 16))
    assert [(c.module, c.function, c.p) for c in calls] == [("self_attn", "multi_head_attention_forward", 0.1)]
    assert layer.training  # mode restored


def test_functional_calls_in_a_forward_are_found_with_their_module():
    class Block(nn.Module):
        def forward(self, x):
            x = nn.functional.dropout(x, 0.2, self.training)
            return nn.functional.scaled_dot_product_attention(x, x, x, dropout_p=0.3 if self.training else 0.0)

    model = nn.Sequential(nn.Linear(4, 4), Block()).eval()
    calls = functional_dropout_calls(model, torch.randn(1, 3, 4))
    assert [(c.module, c.function, c.p) for c in calls] == [
        ("1", "dropout", 0.2), ("1", "scaled_dot_product_attention", 0.3)]
    assert not model.training and not model[1].training
    assert unconverted(model) == []


def test_unknown_dropout_like_modules_are_reported():
    class MyDropout(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(2, 2), MyDropout(), dnn.Dropout(0.1))
    (item,) = unconverted(model)
    assert item.name == "1" and item.kind == "MyDropout" and "no dropkit twin" in item.reason


def test_timm_drop_path_is_swapped_and_behaves_alike():
    drop = _optional("timm.layers.drop")
    model = nn.Sequential(nn.Identity(), drop.DropPath(0.4, scale_by_keep=False))
    assert convert(model) == 1
    layer = model[1]
    assert isinstance(layer, dnn.DropPath) and layer.p == 0.4 and layer.scale_by_keep is False
    y = model(torch.ones(64, 3, 5))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y == 0, (y[:, :1, :1] == 0).expand_as(y))


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_torchvision_stochastic_depth_is_swapped_and_behaves_alike(mode):
    ops = _optional("torchvision.ops")
    model = nn.Sequential(ops.StochasticDepth(0.5, mode))
    assert convert(model) == 1
    layer = model[0]
    assert isinstance(layer, dnn.DropPath) and layer.p == 0.5 and layer.mode == mode
    y = model(torch.ones(64, 3, 5))
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    if mode == "batch":
        assert len(y.unique()) == 1


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_drop_path_modes_match_torchvisions_definition(mode):
    """torchvision's stochastic_depth: one draw per sample ("row") or per batch ("batch"), kept
    samples scaled by 1/(1-p), p=1 gives zeros, eval returns the input."""
    x = torch.ones(4000, 2)
    y = dnn.DropPath(0.25, mode=mode)(x)
    assert set(y.unique().tolist()) <= {0.0, float(torch.tensor(4 / 3))}
    if mode == "row":
        assert torch.equal(y[:, 0], y[:, 1])
        assert abs(float((y[:, 0] == 0).float().mean()) - 0.25) < 0.04  # 5 sigma of 4000 draws
    else:
        assert len(y.unique()) == 1
    assert torch.equal(dnn.DropPath(1.0, mode=mode)(x), torch.zeros_like(x))
    assert dnn.DropPath(0.5, mode=mode).eval()(x) is x
    with pytest.raises(ValueError, match="mode must be 'row' or 'batch'"):
        dnn.DropPath(0.5, mode="rows")


def test_convert_recognises_third_party_classes_by_their_qualified_name():
    """The recogniser reads module and class name, so neither timm nor torchvision is imported."""
    convert_module = importlib.import_module("dropkit.convert")

    assert ("timm.layers.drop", "DropPath") in convert_module._THIRD_PARTY
    assert ("torchvision.ops.stochastic_depth", "StochasticDepth") in convert_module._THIRD_PARTY
