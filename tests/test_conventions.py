"""torch's conventions: memory formats, argument order, ``inplace``, ``__all__``, documented examples."""

from __future__ import annotations

import doctest
import importlib
import inspect
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import dropkit
from dropkit import functional as DF
from dropkit import nn as dnn

ROOT = Path(__file__).resolve().parents[1]

#: every public module of the core library
CORE_MODULES = ["dropkit", "dropkit.functional", "dropkit.nn", "dropkit.convert", "dropkit.rng", "dropkit.ops",
                "dropkit.structured", "dropkit.schedule", "dropkit.concrete", "dropkit.mc", "dropkit.mc_thinned",
                "dropkit.mc_metrics", "dropkit.kernels",
                "dropkit.kernels.reference"]


# --- memory format ------------------------------------------------------------------------------------

def _layouts(rank: int):
    """Inputs of one rank in every layout torch's tests use: contiguous, channels_last, permuted,
    sliced, sliced and permuted, expanded."""
    shape = tuple(range(3, 3 + rank))
    base = torch.randn(shape)
    yield "contiguous", base
    if rank == 4:
        yield "channels_last", base.contiguous(memory_format=torch.channels_last)
    if rank == 5:
        yield "channels_last_3d", base.contiguous(memory_format=torch.channels_last_3d)
    if rank >= 2:
        reverse = list(range(rank))[::-1]
        yield "permuted", base.permute(reverse)
        big = torch.randn(tuple(2 * s for s in shape))
        yield "sliced", big[(slice(None, None, 2),) * rank]
        yield "sliced_permuted", big[(slice(None, None, 2),) * rank].permute(reverse)
    yield "expanded", torch.randn((1,) + shape[1:]).expand(shape)


#: (op, ranks it takes): every element-wise op of the family, with the seed fixed
ELEMENTWISE = [
    (lambda x: DF.dropout(x, 0.5, True, seed=1), range(1, 6)),
    (lambda x: DF.alpha_dropout(x, 0.5, True, seed=1), range(1, 6)),
    (lambda x: DF.gaussian_dropout(x, 0.5, True, seed=1), range(1, 6)),
    (lambda x: DF.relu_dropout(x, 0.5, True, seed=1), range(1, 6)),
    (lambda x: DF.dropout(x, 0.3, True, mask_shape=(1,) + tuple(x.shape[1:]), seed=1), range(1, 6)),
    (lambda x: DF.feature_alpha_dropout(x, 0.5, True, seed=1), range(2, 6)),
    (lambda x: DF.dropout1d(x, 0.5, True, seed=1), (2, 3)),
    (lambda x: DF.dropout2d(x, 0.5, True, seed=1), (3, 4)),
    (lambda x: DF.dropout3d(x, 0.5, True, seed=1), (4, 5)),
    (lambda x: DF.locked_dropout(x, 0.5, True, seed=1), range(2, 6)),
    (lambda x: DF.drop_path(x, 0.5, True, seed=1), range(1, 6)),
    (lambda x: DF.drop_block2d(x, 0.2, 3, training=True, seed=1), (4,)),
    (lambda x: DF.dropout(x, 1.0, True), range(1, 6)),
]
_CASES = [(i, rank, name) for i, (_, ranks) in enumerate(ELEMENTWISE) for rank in ranks
          for name, _ in _layouts(rank)]


@pytest.mark.parametrize(("op_index", "rank", "layout"), _CASES)
def test_output_keeps_the_input_memory_format_and_the_mask_stays_on_the_logical_index(op_index, rank, layout):
    op = ELEMENTWISE[op_index][0]
    torch.manual_seed(0)
    x = dict(_layouts(rank))[layout]
    y = op(x)
    # torch's element-wise ops give the layout of empty_like (F.dropout does, for every case here)
    assert y.stride() == torch.empty_like(x).stride()
    assert torch.equal(y, op(x.contiguous()))


def test_torch_dropout_gives_the_layout_the_test_above_asks_for():
    for rank in range(1, 6):
        for _, x in _layouts(rank):
            assert torch.nn.functional.dropout(x, 0.5, True).stride() == torch.empty_like(x).stride()


# --- argument order and inplace ------------------------------------------------------------------------

def test_functional_ops_take_torchs_positional_order():
    x = torch.ones(4, 6)
    assert torch.equal(DF.dropout(x, 0.5, True, False, seed=3), DF.dropout(x, p=0.5, training=True, seed=3))
    assert DF.dropout(x, 0.5, False) is x
    for name in ["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"]:
        ours = list(inspect.signature(getattr(DF, name)).parameters)[1:4]
        assert ours == ["p", "training", "inplace"], name


@pytest.mark.parametrize("op", [DF.dropout, DF.alpha_dropout, DF.gaussian_dropout, DF.relu_dropout,
                                DF.dropout2d, DF.drop_path, DF.locked_dropout])
def test_training_has_no_default_and_must_be_a_bool(op):
    x = torch.ones(2, 3, 4, 4)
    with pytest.raises(TypeError, match="missing required argument 'training'"):
        op(x, 0.5)
    for bad in ["False", None, 0, 1]:
        with pytest.raises(TypeError, match="training must be a bool"):
            op(x, 0.5, bad)


@pytest.mark.parametrize(("functional", "layer"), [
    (lambda x: DF.dropout(x, 0.5, True, True, seed=4), lambda x: DF.dropout(x, 0.5, True, seed=4)),
    (lambda x: DF.alpha_dropout(x, 0.5, True, True, seed=4), lambda x: DF.alpha_dropout(x, 0.5, True, seed=4)),
    (lambda x: DF.relu_dropout(x, 0.5, True, True, seed=4), lambda x: DF.relu_dropout(x, 0.5, True, seed=4)),
    (lambda x: DF.dropout2d(x, 0.5, True, True, seed=4), lambda x: DF.dropout2d(x, 0.5, True, seed=4)),
    (lambda x: DF.drop_block2d(x, 0.3, 2, training=True, inplace=True, seed=4),
     lambda x: DF.drop_block2d(x, 0.3, 2, training=True, seed=4)),
    (lambda x: DF.dropout(x, 1.0, True, True), lambda x: DF.dropout(x, 1.0, True)),
])
def test_inplace_writes_into_the_input_returns_it_and_gives_the_same_gradients(functional, layer):
    leaf = torch.randn(2, 3, 4, 4, requires_grad=True)
    expected = layer(leaf)
    (expected * torch.arange(expected.numel()).reshape(expected.shape)).sum().backward()
    want = leaf.grad.clone()
    leaf.grad = None
    x = leaf * 1.0  # a non-leaf, as torch requires for in-place ops on tensors that need grad
    y = functional(x)
    assert y is x and x.data_ptr() == y.data_ptr()
    assert torch.equal(y, expected)
    (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
    assert torch.equal(leaf.grad, want)


def test_inplace_on_a_leaf_that_requires_grad_is_refused_as_torch_refuses_it():
    x = torch.ones(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        DF.dropout(x, 0.5, True, True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        torch.nn.functional.dropout(x, 0.5, True, True)


def test_inplace_layers_write_into_the_input_and_eval_returns_it():
    for layer in [dnn.Dropout(0.5, True), dnn.Dropout2d(0.5, True), dnn.AlphaDropout(0.5, True),
                  dnn.FeatureAlphaDropout(0.5, True), dnn.GaussianDropout(0.5, True), dnn.ReLUDropout(0.5, True),
                  dnn.LockedDropout(0.5, True), dnn.DropPath(0.5, True), dnn.DropBlock2d(0.5, 3, True)]:
        torch.manual_seed(0)
        x = torch.randn(4, 3, 12, 12)  # DropBlock2d: about 32 block corners drawn, none would leave x as it was
        before = x.clone()
        assert layer(x) is x and not torch.equal(x, before), type(layer).__name__
        assert "inplace=True" in repr(layer)
        assert layer.eval()(x) is x or isinstance(layer, dnn.ReLUDropout)


def test_layers_take_torchs_positional_order():
    assert dnn.Dropout(0.2, True).inplace and dnn.Dropout(0.2, True).p == 0.2
    assert dnn.Dropout2d(0.2, True).inplace and dnn.AlphaDropout(0.2, True).inplace


# --- DropBlock2d as timm defines its options ---------------------------------------------------------------

def test_drop_block_couples_channels_by_default_and_not_when_asked():
    x = torch.ones(4, 6, 16, 16)
    coupled = DF.drop_block2d(x, 0.3, 3, training=True, seed=0)
    assert torch.equal(coupled == 0, (coupled[:, :1] == 0).expand_as(coupled))
    apart = DF.drop_block2d(x, 0.3, 3, training=True, couple_channels=False, seed=0)
    assert not torch.equal(apart == 0, (apart[:, :1] == 0).expand_as(apart))
    assert dnn.DropBlock2d().couple_channels and "couple_channels=False" in repr(dnn.DropBlock2d(couple_channels=False))


def test_drop_block_scale_by_keep():
    x = torch.ones(8, 2, 12, 12)
    scaled = DF.drop_block2d(x, 0.3, 3, training=True, seed=1)
    kept = scaled[scaled != 0]
    assert torch.allclose(kept, torch.full_like(kept, x.numel() / kept.numel()))
    plain = DF.drop_block2d(x, 0.3, 3, training=True, scale_by_keep=False, seed=1)
    assert set(plain.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(plain == 0, scaled == 0)


def test_drop_block_rate_is_about_p_on_large_and_clipped_maps():
    # about a fraction p dropped: block centres drawn at gamma over the valid positions
    for size, block in [(32, 5), (4, 7), (3, 7)]:
        x = torch.ones(400, 1, size, size)
        y = DF.drop_block2d(x, 0.2, block, training=True, seed=5)
        fraction = float((y == 0).float().mean())
        assert 0.1 < fraction < 0.35, (size, block, fraction)


def test_drop_block_eval_mode_accepts_blocks_larger_than_the_map():
    layer = dnn.DropBlock2d(0.1, block_size=7).eval()
    x = torch.randn(2, 3, 2, 2)
    assert layer(x) is x
    assert layer.train()(x).shape == x.shape


# --- public modules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CORE_MODULES)
def test_every_public_core_module_declares_all_and_every_name_exists(name):
    module = importlib.import_module(name)
    assert isinstance(module.__all__, list) and module.__all__, name
    for symbol in module.__all__:
        assert hasattr(module, symbol), f"{name}.{symbol}"


PUBLIC_OPS = [DF.dropout, DF.relu_dropout, DF.channel_dropout, DF.dropout1d, DF.dropout2d, DF.dropout3d,
              DF.alpha_dropout, DF.feature_alpha_dropout, DF.gaussian_dropout, DF.locked_dropout, DF.drop_path,
              DF.drop_block2d, DF.dropconnect]
PUBLIC_LAYERS = [dnn.Dropout, dnn.ReLUDropout, dnn.Dropout1d, dnn.Dropout2d, dnn.Dropout3d, dnn.AlphaDropout,
                 dnn.FeatureAlphaDropout, dnn.GaussianDropout, dnn.LockedDropout, dnn.DropPath, dnn.DropBlock2d,
                 dnn.WeightDropout]


@pytest.mark.parametrize("obj", PUBLIC_OPS + PUBLIC_LAYERS, ids=lambda o: o.__name__)
def test_every_layer_and_op_is_documented_like_torchs(obj):
    doc = inspect.getdoc(obj)
    for section in ("Shape:", "Example:", ">>> "):
        assert section in doc, f"{obj.__name__} lacks {section!r}"
    assert "Args:" in doc or "arguments" in doc, obj.__name__
    assert any(year in doc for year in ("201", "202")), f"{obj.__name__} names no paper"


def test_returns_are_consistent_tensors_of_the_input_type():
    for dtype in (torch.float64, torch.bfloat16):
        for op in PUBLIC_OPS:
            x = torch.randn({DF.dropout1d: (2, 3, 4), DF.dropout3d: (2, 3, 4, 4, 4)}.get(op, (2, 3, 4, 4)), dtype=dtype)
            if op is DF.drop_block2d:
                y = op(x, 0.5, 3, training=True)
            else:
                y = op(x, 0.5, True, **({"spatial_dims": 2} if op is DF.channel_dropout else {}))
            assert type(y) is torch.Tensor and y.dtype == x.dtype and y.shape == x.shape, op.__name__


@pytest.mark.parametrize("name", CORE_MODULES)
def test_documented_examples_run(name):
    """Every ``>>>`` example in the core library's docstrings runs and prints what it says."""
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = {"torch": torch, "nn": nn, "dropkit": dropkit, "dnn": dnn, "DF": DF, **vars(module)}
    torch.manual_seed(0)
    for test in finder.find(module, name, globs=globs):
        if test.examples and test.name.startswith(name):
            runner.run(test)
    assert runner.failures == 0, f"{runner.failures} failing example(s) in {name} (see the output above)"


def test_every_public_layer_and_op_has_an_example_that_the_doctest_runs():
    counted = 0
    finder = doctest.DocTestFinder()
    for obj in PUBLIC_OPS + PUBLIC_LAYERS:
        (test,) = [t for t in finder.find(obj) if t.name.endswith(obj.__name__)]
        assert test.examples, obj.__name__
        counted += 1
    assert counted == len(PUBLIC_OPS) + len(PUBLIC_LAYERS)


@pytest.mark.slow
def test_the_wheel_ships_py_typed_and_every_core_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("dropkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dropkit/py.typed" in names
    for module in CORE_MODULES + ["dropkit._compiled_ops"]:
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, module
