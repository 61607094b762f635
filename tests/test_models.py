"""dropkit.lab.models: shapes, where dropout sits, train/eval behaviour and the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropkit.lab.models import MODELS, RowLSTM, build_model, main_rate, output_layer
from dropkit.nn import Dropout, Dropout2d, LockedDropout, WeightDropout

DROPOUTS = (Dropout, Dropout2d, LockedDropout, WeightDropout)
VARIANTS = [
    ("tutorial_mlp", {}),
    ("tutorial_mlp", {"batchnorm": True}),
    ("srivastava_mlp", {"width": 64, "depth": 2}),
    ("srivastava_mlp", {"width": 64, "batchnorm": True}),
    ("cnn", {"channels": (4, 8), "hidden": 32}),
    ("cnn", {"channels": (4, 8), "hidden": 32, "batchnorm": True}),
    ("lstm", {"hidden": 16}),
    ("lstm", {"hidden": 16, "layers": 1, "p_weight": 0.5}),
]
IDS = [f"{name}-{'-'.join(kwargs) or 'default'}" for name, kwargs in VARIANTS]


@pytest.fixture(params=VARIANTS, ids=IDS)
def model(request) -> nn.Module:
    torch.manual_seed(0)
    name, kwargs = request.param
    return build_model(name, p=0.5, **kwargs)


def test_every_registered_model_has_a_variant_here():
    assert {name for name, _ in VARIANTS} == set(MODELS)


@pytest.mark.parametrize("shape", [(5, 28, 28), (5, 1, 28, 28), (5, 784)])
def test_output_is_one_logit_per_class_for_any_input_layout(model, shape):
    assert model(torch.randn(shape)).shape == (5, 10)


def test_nothing_follows_the_output_layer(model):
    """In training mode the model's output is exactly what its last Linear produced: no dropout on logits."""
    seen = []
    output_layer(model).register_forward_hook(lambda module, args, out: seen.append(out))
    model.train()
    out = model(torch.randn(6, 28, 28))
    assert len(seen) == 1 and torch.equal(out, seen[0])
    assert output_layer(model).out_features == 10


def test_eval_mode_is_deterministic_and_train_mode_is_not(model):
    x = torch.randn(8, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_every_parameter_gets_a_gradient(model):
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(8, 28, 28)), torch.arange(8)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", ["tutorial_mlp", "srivastava_mlp", "cnn"])
def test_batchnorm_comes_before_activation_and_dropout(name):
    model = build_model(name, batchnorm=True)
    layers = list(model)
    norms = [i for i, m in enumerate(layers) if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert norms, "batchnorm=True added no BatchNorm"
    for i in norms:
        assert isinstance(layers[i - 1], (nn.Linear, nn.Conv2d)) and layers[i - 1].bias is None
        assert isinstance(layers[i + 1], nn.ReLU)
    for i, m in enumerate(layers):
        if isinstance(m, DROPOUTS) and i > 1:  # all but the input dropout follow an activation or a pool
            assert isinstance(layers[i - 1], (nn.ReLU, nn.MaxPool2d))
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in build_model(name).modules())


def _rates(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, DROPOUTS)]


def test_p_sets_the_main_rate_of_each_model():
    assert _rates(build_model("tutorial_mlp", p=0.3)) == [0.3]
    assert _rates(build_model("srivastava_mlp", p=0.4)) == [0.2, 0.4, 0.4, 0.4]
    assert _rates(build_model("cnn", p=0.4, p_channel=0.2)) == [0.2, 0.2, 0.4]
    assert _rates(build_model("lstm", p=0.4, p_input=0.1, layers=2)) == [0.1, 0.4, 0.4]
    assert _rates(build_model("srivastava_mlp")) == [0.2, 0.5, 0.5, 0.5]  # Srivastava et al. 2014 defaults


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS, ids=IDS)
def test_main_rate_reports_what_build_model_sets(name, kwargs):
    main = [m.p for m in build_model(name, **kwargs).modules() if isinstance(m, DROPOUTS)][-1]
    assert main_rate(name, **kwargs) == main
    assert main_rate(name, 0.3, **kwargs) == 0.3


def test_srivastava_mlp_has_the_paper_shape():
    linears = [m for m in build_model("srivastava_mlp").modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 1024), (1024, 1024), (1024, 1024), (1024, 10)]


def test_p_zero_makes_training_mode_equal_eval_mode():
    model = build_model("tutorial_mlp", p=0.0)
    x = torch.randn(4, 28, 28)
    assert torch.equal(model.train()(x), model.eval()(x))


def test_lstm_weight_dropout_wraps_the_recurrent_matrix_only_when_asked():
    plain = build_model("lstm", hidden=8)
    assert not any(isinstance(m, WeightDropout) for m in plain.modules())
    wrapped = build_model("lstm", hidden=8, p_weight=0.3)
    assert isinstance(wrapped, RowLSTM)
    assert [m.weights for m in wrapped.modules() if isinstance(m, WeightDropout)] == [["weight_hh_l0"]] * 2


def test_build_model_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model 'mlp'.*tutorial_mlp"):
        build_model("mlp")
    with pytest.raises(ValueError, match="no argument widht.*width"):
        build_model("srivastava_mlp", widht=10)
    with pytest.raises(ValueError, match="p or p_hidden"):
        build_model("srivastava_mlp", p=0.1, p_hidden=0.2)
    with pytest.raises(ValueError, match=r"p .*\[0, 1\].*1\.5"):
        build_model("tutorial_mlp", p=1.5)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: build_model("srivastava_mlp", depth=0), "depth must be an integer >= 1, got 0"),
    (lambda: build_model("lstm", layers=0), "layers must be an integer >= 1, got 0"),
    (lambda: main_rate("mlp"), "unknown model 'mlp'.*tutorial_mlp"),
    (lambda: output_layer(nn.Sequential(nn.Flatten(), nn.ReLU())), "Sequential has no nn.Linear output layer"),
])
def test_model_shapes_and_lookups_name_what_is_wrong(build, message):
    with pytest.raises(ValueError, match=message):
        build()
