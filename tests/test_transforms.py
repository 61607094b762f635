"""torch.compile with a changing rate, torch.func.vmap's randomness modes, and seeded layers' state."""

from __future__ import annotations

import io
import os

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import dropkit
from dropkit import functional as DF
from dropkit import kernels
from dropkit import nn as dnn
from dropkit.lora import DropoutLinear
from dropkit.seeded import SeededRate

#: the Triton path's tensors: CUDA ones, or CPU ones under Triton's interpreter (conftest.py sets it without a GPU)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"


class _WithResidual(nn.Module):
    """Calls ``layer(x, residual=x / 2)``: the residual form of the dropout layers."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, residual=x / 2)


#: the layers, each built at rate p
LAYERS = {
    "Dropout": lambda p: dnn.Dropout(p),
    "ReLUDropout": lambda p: dnn.ReLUDropout(p),
    "Dropout2d": lambda p: dnn.Dropout2d(p),
    "AlphaDropout": lambda p: dnn.AlphaDropout(p),
    "FeatureAlphaDropout": lambda p: dnn.FeatureAlphaDropout(p),
    "GaussianDropout": lambda p: dnn.GaussianDropout(p),
    "GaussianDropout_shared": lambda p: dnn.GaussianDropout(p, mask_shape=(None, 1, None, None)),
    "LockedDropout": lambda p: dnn.LockedDropout(p),
    "DropPath": lambda p: dnn.DropPath(p),
    "DropBlock2d": lambda p: dnn.DropBlock2d(p, 3),
    "Dropout_residual": lambda p: _WithResidual(dnn.Dropout(p)),
    "BiasActDropout": lambda p: _WithResidual(dnn.BiasActDropout(p, activation="gelu", features=5)),
}
RATES = [0.5, 0.3, 0.2, 0.7, 0.11, 0.9, 0.25, 0.6]


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 2
    yield
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.reset()


#: one layer per kind of Triton kernel (element-wise masks, shared masks, Gaussian noise, the fused op)
TRITON_LAYERS = ["Dropout", "ReLUDropout", "AlphaDropout", "FeatureAlphaDropout", "GaussianDropout", "DropPath",
                 "DropBlock2d", "Dropout_residual", "BiasActDropout"]


@pytest.mark.parametrize(("path", "name"), [("auto", name) for name in LAYERS] +
                         [("triton", name) for name in TRITON_LAYERS])
def test_changing_p_keeps_fullgraph_and_one_graph_and_eager_masks(path, name, dynamo, monkeypatch):
    """Eight rates, a recompile limit of 2: the first call specialises, the second makes the rate an
    input, and no rate after that compiles again (fullgraph would raise on the limit). The compiled
    outputs and gradients equal eager mode's bit for bit from the same seed. On the triton path the
    graph runs the Triton kernels with the rate and the seed as tensors (on the interpreter without a GPU)."""
    if path == "triton" and not kernels.triton_available():
        pytest.skip("Triton is not installed")
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv(kernels.ENV, path)
    layer = LAYERS[name](0.5)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    x0 = torch.randn(4, 6, 5, 5, device=TRITON_DEVICE if path == "triton" else "cpu")
    for i, p in enumerate(RATES):
        for module in layer.modules():
            if isinstance(module, SeededRate):
                module.p = p
        x = x0.clone().requires_grad_()
        torch.manual_seed(i)
        y = compiled(x)
        y.backward(torch.ones_like(y))
        ref = x0.clone().requires_grad_()
        torch.manual_seed(i)
        want = layer(ref)
        want.backward(torch.ones_like(want))
        assert torch.equal(y, want) and torch.equal(x.grad, ref.grad), (name, p)
    assert counters["stats"]["unique_graphs"] <= 2
    if path == "triton":
        assert all("torch.ops.dropkit.triton_" in graph.code for graph in counter.graphs)


def test_p_zero_and_one_are_their_own_branches_not_a_graph_per_value(dynamo):
    layer = dnn.Dropout(0.5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch._dynamo.config.recompile_limit = 4
    x = torch.ones(64)
    for p in [0.5, 0.3, 0.0, 1.0, 0.4, 0.8, 0.0, 1.0]:
        layer.p = p
        y = compiled(x)
        if p == 0.0:
            assert torch.equal(y, x)
        elif p == 1.0:
            assert torch.equal(y, torch.zeros_like(x))
    assert counters["stats"]["unique_graphs"] <= 4


@pytest.mark.slow
def test_inductor_compiles_the_mlp_step_without_breaks_and_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), dnn.Dropout(0.5), nn.Linear(32, 4))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 16)
    for p in (0.5, 0.3):
        model[2].p = p
        torch.manual_seed(1)
        y = compiled(x)
        y.sum().backward()
        grads = [q.grad.clone() for q in model.parameters()]
        model.zero_grad()
        torch.manual_seed(1)
        want = model(x)
        want.sum().backward()
        assert torch.allclose(y, want, atol=1e-6)
        for g, q in zip(grads, model.parameters()):
            assert torch.allclose(g, q.grad, atol=1e-6)
        model.zero_grad()


# --- vmap --------------------------------------------------------------------------------------------

VMAP_OPS = {
    "dropout": lambda t: DF.dropout(t, 0.5, True),
    "alpha_dropout": lambda t: DF.alpha_dropout(t, 0.5, True),
    "gaussian_dropout": lambda t: DF.gaussian_dropout(t, 0.5, True),
    "relu_dropout": lambda t: DF.relu_dropout(t, 0.5, True),
    "dropout1d": lambda t: DF.dropout1d(t, 0.5, True),
    "drop_block2d": lambda t: DF.drop_block2d(t[None, None], 0.3, 2, training=True)[0, 0],
    "layer": dnn.Dropout(0.5),
    "seeded layer": dnn.Dropout(0.5, seed=3),
}


@pytest.mark.parametrize("name", VMAP_OPS)
def test_vmap_randomness_different_same_and_error(name):
    op = VMAP_OPS[name]
    xs = (torch.rand(4, 40) + 1.0).expand(6, 4, 40).clone()  # six equal samples: equal masks, equal outputs
    different = torch.func.vmap(op, randomness="different")(xs)
    assert any(not torch.equal(different[0], y) for y in different[1:]), "one mask for every sample"
    same = torch.func.vmap(op, randomness="same")(xs)
    assert all(torch.equal(same[0], y) for y in same[1:]), "samples got different masks"
    assert not torch.equal(same[0], xs[0])
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(op, randomness="error")(xs)


def test_vmap_draws_the_masks_the_kernels_draw_and_differentiates():
    xs = torch.randn(3, 50)
    fixed = torch.func.vmap(lambda t: DF.dropout(t, 0.3, True, seed=11))(xs)
    for i in range(3):
        assert torch.equal(fixed[i], DF.dropout(xs[i], 0.3, True, seed=11))
    grads = torch.func.vmap(torch.func.grad(lambda t: DF.dropout(t, 0.3, True, seed=11).sum()))(xs)
    assert torch.equal(grads, (fixed != 0).float() / 0.7)


# --- seeded layers' random state ----------------------------------------------------------------------

def _seeded_dropout_linear() -> DropoutLinear:
    torch.manual_seed(0)  # the same weights in the layer and its resumed copy
    return DropoutLinear(6, 3, p=0.5, seed=7)


@pytest.mark.parametrize("make", [lambda: dnn.Dropout(0.5, seed=7), lambda: dnn.DropPath(0.5, seed=7),
                                  lambda: dnn.DropBlock2d(0.3, 2, seed=7), lambda: dnn.Dropout2d(0.5, seed=7),
                                  lambda: dnn.DropPathResidual(nn.Identity(), 0.5, seed=7), _seeded_dropout_linear])
def test_seeded_layer_state_dict_resumes_the_mask_sequence(make):
    x = torch.ones(8, 4, 6, 6)
    layer = make()
    layer(x)
    layer(x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    continued = [layer(x) for _ in range(3)]
    resumed = make()
    resumed(x)  # a different position in the sequence, overwritten by the load
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for want in continued:
        assert torch.equal(resumed(x), want)


def test_generator_state_is_in_the_model_state_dict_and_strict_loading_checks_it():
    model = nn.Sequential(nn.Linear(4, 4), dnn.Dropout(0.5, seed=1), dnn.Dropout(0.5))
    state = model.state_dict()
    assert "1.generator_state" in state and "2.generator_state" not in state
    assert state["1.generator_state"].dtype == torch.uint8
    fresh = nn.Sequential(nn.Linear(4, 4), dnn.Dropout(0.5, seed=1), dnn.Dropout(0.5))
    fresh.load_state_dict(state)
    del state["1.generator_state"]
    with pytest.raises(RuntimeError, match="generator_state"):
        fresh.load_state_dict(state)
    fresh.load_state_dict(state, strict=False)
    unseeded = nn.Sequential(nn.Linear(4, 4), dnn.Dropout(0.5), dnn.Dropout(0.5))
    with pytest.raises(RuntimeError, match="Unexpected key.*generator_state"):
        unseeded.load_state_dict(model.state_dict())
    bad = model.state_dict()
    bad["1.generator_state"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="expected a uint8 tensor"):
        model.load_state_dict(bad)


def test_fused_layers_share_the_generator_and_its_state():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), dnn.Dropout(0.5, seed=2))
    dropkit.fuse_relu_dropout(model)
    assert "2.generator_state" in model.state_dict()
