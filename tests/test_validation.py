"""Every public op and layer of the core refuses bad arguments up front, naming the argument.

Two generated suites over one catalogue of calls (each with valid arguments and, per argument, a
category of bad values):
* the catalogue itself: every bad value of every category, one argument at a time, on every call
  that takes that argument; each must end in a TypeError or ValueError whose message names it;
* Hypothesis: random mixes of valid and bad values over all arguments of a call at once; a call
  with no bad value must return a correct result, any other must be refused naming a bad argument.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dropkit
from dropkit import concrete, mc, rng, schedule, structured
from dropkit import functional as DF
from dropkit import nn as dnn
from dropkit.convert import convert, functional_dropout_calls, fuse_relu_dropout, unconverted

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

# --- bad values by category -----------------------------------------------------------------------------

def _sparse() -> torch.Tensor:
    return torch.ones(2, 2).to_sparse()


BAD: dict[str, list[Callable[[], Any]]] = {
    "tensor": [lambda: None, lambda: [1.0, 2.0], lambda: "x", lambda: 3, lambda: 2.5, lambda: np.ones(3),
               lambda: torch.ones(3, dtype=torch.int64), lambda: torch.ones(3, dtype=torch.bool),
               lambda: torch.ones(3, dtype=torch.uint8), lambda: torch.ones(3, dtype=torch.complex64),
               lambda: torch.ones(3).to(torch.float8_e4m3fn), lambda: torch.ones(3).to(torch.float8_e5m2),
               _sparse, lambda: torch.ones(2, 2).to_sparse_csr()],
    "rate": [lambda: True, lambda: False, lambda: "0.5", lambda: None, lambda: math.nan, lambda: math.inf,
             lambda: -math.inf, lambda: -0.1, lambda: 1.0001, lambda: 2, lambda: -1, lambda: 0.5 + 0j,
             lambda: [0.5], lambda: torch.tensor(0.5), lambda: np.float64("nan")],
    "bool": [lambda: "False", lambda: "True", lambda: None, lambda: 0, lambda: 1, lambda: 0.0, lambda: [True],
             lambda: torch.tensor(True), lambda: np.bool_(True)],
    "seed": [lambda: -1, lambda: 2**63, lambda: 1.5, lambda: "1", lambda: True, lambda: [1],
             lambda: torch.tensor(1), lambda: math.nan],
    "generator": [lambda: 1, lambda: "gen", lambda: object(), lambda: torch.device("cpu"),
                  lambda: np.random.default_rng(0), lambda: True],
    "mask_shape": [lambda: 5, lambda: "abc", lambda: (8, 1.0, 6), lambda: (True, 1, 1), lambda: (-1, 1, 1),
                   lambda: (0, 1, 1), lambda: (2,), lambda: (2, 3, 4, 5), lambda: ((1,), 1, 1), lambda: 1.5,
                   lambda: {1: 2}],
    "layer_mask_shape": [lambda: 5, lambda: "abc", lambda: (8, 1.0, 6), lambda: (True, 1, 1), lambda: (-1, 1, 1),
                         lambda: (0, 1, 1), lambda: ((1,), 1, 1), lambda: 1.5, lambda: {1: 2}],
    "block_size": [lambda: 0, lambda: -3, lambda: 1.5, lambda: True, lambda: "3", lambda: None, lambda: [3]],
    "spatial_dims": [lambda: 0, lambda: 4, lambda: True, lambda: "2", lambda: None, lambda: 2.0],
    "mode": [lambda: "rows", lambda: None, lambda: 1, lambda: True, lambda: "ROW"],
    "model": [lambda: None, lambda: "model", lambda: 3, lambda: torch.ones(2), lambda: nn.Linear],
    "module": [lambda: (lambda x: x), lambda: None, lambda: "lstm", lambda: nn.LSTM],
    "optional_module": [lambda: (lambda x: x), lambda: "lstm", lambda: nn.LSTM, lambda: 3],
    "weights": [lambda: "weight", lambda: [], lambda: [1], lambda: None, lambda: ["nope"], lambda: 5],
    "count": [lambda: 0, lambda: -1, lambda: True, lambda: 2.5, lambda: "3", lambda: None],
    "index": [lambda: -1, lambda: True, lambda: 2.5, lambda: "3", lambda: None],
    "rate_bits": [lambda: 8.0, lambda: 16.0, lambda: True, lambda: "8", lambda: 4, lambda: 32, lambda: None],
    "activation": [lambda: "tanh", lambda: None, lambda: 1, lambda: True, lambda: ["gelu"], lambda: "GELU"],
}


# --- the catalogue of calls -----------------------------------------------------------------------------

@dataclass
class Call:
    """One public callable: how to call it, valid arguments, their categories, the result check."""

    name: str
    fn: Callable[..., Any]
    valid: dict[str, Callable[[], Any]]
    kinds: dict[str, str]
    check: Callable[[Any, dict[str, Any]], None] = lambda out, args: None
    #: how the message calls an argument, when not by its own name
    said: dict[str, str] = field(default_factory=dict)


def _tensor_like_input(out, args) -> None:
    x = args.get("x", args.get("weight"))
    assert isinstance(out, torch.Tensor) and out.shape == x.shape and out.dtype == x.dtype


def _op(name, fn, shape=(2, 3, 4, 4), extra=None, kinds=None, said=None):
    valid = {"x": lambda: torch.rand(shape) + 0.5, "p": lambda: 0.3, "training": lambda: True,
             "seed": lambda: None, "generator": lambda: None}
    all_kinds = {"x": "tensor", "p": "rate", "training": "bool", "seed": "seed", "generator": "generator"}
    valid.update(extra or {})
    all_kinds.update(kinds or {})
    return Call(name, fn, valid, all_kinds, _tensor_like_input, {"x": "input", **(said or {})})


_INPLACE = ({"inplace": lambda: False}, {"inplace": "bool"})
_MASK = ({"mask_shape": lambda: None}, {"mask_shape": "mask_shape"})


def _with(*parts):
    extra, kinds = {}, {}
    for e, k in parts:
        extra.update(e)
        kinds.update(k)
    return {"extra": extra, "kinds": kinds}


OPS = [
    _op("dropout", DF.dropout, (2, 3, 4), **_with(_INPLACE, _MASK)),
    _op("alpha_dropout", DF.alpha_dropout, (2, 3, 4), **_with(_INPLACE, _MASK)),
    _op("gaussian_dropout", DF.gaussian_dropout, (2, 3, 4), **_with(_INPLACE, _MASK)),
    _op("relu_dropout", DF.relu_dropout, **_with(_INPLACE)),
    _op("dropout1d", DF.dropout1d, (2, 3, 4), **_with(_INPLACE)),
    _op("dropout2d", DF.dropout2d, **_with(_INPLACE)),
    _op("dropout3d", DF.dropout3d, (2, 3, 4, 4, 4), **_with(_INPLACE)),
    _op("channel_dropout", DF.channel_dropout,
        **_with(_INPLACE, ({"spatial_dims": lambda: 2}, {"spatial_dims": "spatial_dims"}))),
    _op("feature_alpha_dropout", DF.feature_alpha_dropout, **_with(_INPLACE)),
    _op("locked_dropout", DF.locked_dropout, (5, 2, 3),
        **_with(_INPLACE, ({"batch_first": lambda: False}, {"batch_first": "bool"}))),
    _op("drop_path", DF.drop_path,
        **_with(_INPLACE, ({"scale_by_keep": lambda: True, "mode": lambda: "row"},
                           {"scale_by_keep": "bool", "mode": "mode"}))),
    _op("drop_block2d", DF.drop_block2d,
        **_with(_INPLACE, ({"block_size": lambda: 3, "couple_channels": lambda: True, "scale_by_keep": lambda: True},
                           {"block_size": "block_size", "couple_channels": "bool", "scale_by_keep": "bool"}))),
]
OPS.append(_op("bias_act_dropout", DF.bias_act_dropout, (2, 3, 4),
              extra={"bias": lambda: torch.rand(4), "activation": lambda: "gelu", "residual": lambda: None},
              kinds={"activation": "activation"}))
_dropconnect = _op("dropconnect", lambda weight, **kw: DF.dropconnect(weight, **kw), (4, 3), **_with(_MASK))
_dropconnect.valid["weight"] = _dropconnect.valid.pop("x")
_dropconnect.kinds["weight"] = _dropconnect.kinds.pop("x")
_dropconnect.said = {"weight": "input"}
OPS.append(_dropconnect)


def _layer_call(cls, extra=None, kinds=None, *, seed=True):
    valid = {"p": lambda: 0.3, "inplace": lambda: False}
    all_kinds = {"p": "rate", "inplace": "bool"}
    if seed:
        valid["seed"] = lambda: None
        all_kinds["seed"] = "seed"
    valid.update(extra or {})
    all_kinds.update(kinds or {})
    return Call(cls.__name__, cls, valid, all_kinds, lambda out, args: isinstance(out, nn.Module))


LAYERS = [
    _layer_call(dnn.Dropout, {"mask_shape": lambda: None}, {"mask_shape": "layer_mask_shape"}),
    _layer_call(dnn.ReLUDropout),
    _layer_call(dnn.Dropout1d, {"torch_ranks": lambda: False}, {"torch_ranks": "bool"}),
    _layer_call(dnn.Dropout2d, {"torch_ranks": lambda: False}, {"torch_ranks": "bool"}),
    _layer_call(dnn.Dropout3d),
    _layer_call(dnn.AlphaDropout, {"mask_shape": lambda: None}, {"mask_shape": "layer_mask_shape"}),
    _layer_call(dnn.FeatureAlphaDropout, {"torch_ranks": lambda: False}, {"torch_ranks": "bool"}),
    _layer_call(dnn.GaussianDropout, {"mask_shape": lambda: None}, {"mask_shape": "layer_mask_shape"}),
    _layer_call(dnn.LockedDropout, {"batch_first": lambda: False}, {"batch_first": "bool"}),
    _layer_call(dnn.DropPath, {"scale_by_keep": lambda: True, "mode": lambda: "row"},
                {"scale_by_keep": "bool", "mode": "mode"}),
    _layer_call(dnn.DropBlock2d, {"block_size": lambda: 3, "couple_channels": lambda: True,
                                  "scale_by_keep": lambda: True},
                {"block_size": "block_size", "couple_channels": "bool", "scale_by_keep": "bool"}),
]
_weight_dropout = _layer_call(dnn.WeightDropout, {"module": lambda: nn.Linear(3, 3), "weights": lambda: ["weight"],
                                                  "mask_shape": lambda: None},
                              {"module": "module", "weights": "weights", "mask_shape": "layer_mask_shape"})
del _weight_dropout.valid["inplace"], _weight_dropout.kinds["inplace"]
LAYERS.append(_weight_dropout)
_bias_act_dropout = _layer_call(dnn.BiasActDropout, {"activation": lambda: "relu", "features": lambda: 4},
                                {"activation": "activation"})
del _bias_act_dropout.valid["inplace"], _bias_act_dropout.kinds["inplace"]
LAYERS.append(_bias_act_dropout)


def _forward_call(layer_factory, shape, name):
    """A layer's forward with a bad input (layers take the input's checks from the ops)."""
    return Call(f"{name}.forward", lambda x: layer_factory()(x), {"x": lambda: torch.rand(shape) + 0.5},
                {"x": "tensor"}, _tensor_like_input, {"x": "input"})


FORWARDS = [_forward_call(lambda: dnn.Dropout(0.3), (2, 3), "Dropout"),
            _forward_call(lambda: dnn.Dropout2d(0.3), (2, 3, 4, 4), "Dropout2d"),
            _forward_call(lambda: dnn.DropBlock2d(0.3, 2), (2, 3, 4, 4), "DropBlock2d"),
            _forward_call(lambda: dnn.ReLUDropout(0.3), (2, 3), "ReLUDropout")]


def _model():
    return nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Dropout(0.2))


OTHERS = [
    Call("convert", convert, {"model": _model, "structured": lambda: False, "fuse": lambda: False},
         {"model": "model", "structured": "bool", "fuse": "bool"}, lambda out, args: out == 1),
    Call("fuse_relu_dropout", fuse_relu_dropout, {"model": _model}, {"model": "model"}),
    Call("fuse", dropkit.fuse, {"model": _model}, {"model": "model"}),
    Call("unconverted", unconverted, {"model": _model}, {"model": "model"}, lambda out, args: out == []),
    Call("functional_dropout_calls", lambda model: functional_dropout_calls(model, torch.ones(1, 3)),
         {"model": _model}, {"model": "model"}),
    Call("manual_seed", dropkit.manual_seed, {"seed": lambda: 3}, {"seed": "seed"}),
    Call("rng.resolve_seed", rng.resolve_seed, {"seed": lambda: 3, "generator": lambda: None},
         {"seed": "seed", "generator": "generator"}, lambda out, args: int(out) == 3),
    Call("rng.draw_seed", rng.draw_seed, {"generator": lambda: torch.Generator()}, {"generator": "generator"}),
    Call("rng.set_rate_bits", lambda bits: rng.set_rate_bits(bits) and rng.set_rate_bits(16), {"bits": lambda: 16},
         {"bits": "rate_bits"}),
    Call("mc.mc_samples", lambda model, samples: mc.mc_samples(model, torch.ones(1, 3), samples),
         {"model": _model, "samples": lambda: 2}, {"model": "model", "samples": "count"},
         lambda out, args: out.shape == (2, 1, 3)),
    Call("schedule.Constant", schedule.Constant, {"p": lambda: 0.2}, {"p": "rate"}),
    Call("schedule.EarlyDropout", schedule.EarlyDropout, {"p": lambda: 0.2, "cutoff": lambda: 3},
         {"p": "rate", "cutoff": "index"}),
    Call("schedule.LateDropout", schedule.LateDropout, {"p": lambda: 0.2, "start": lambda: 3},
         {"p": "rate", "start": "index"}),
    Call("structured.kept_count", structured.kept_count, {"width": lambda: 8, "p": lambda: 0.5},
         {"width": "count", "p": "rate"}),
    Call("concrete.ConcreteDropout", concrete.ConcreteDropout,
         {"in_features": lambda: 4, "init_p": lambda: 0.1, "weight_regularizer": lambda: 1e-6,
          "dropout_regularizer": lambda: 1e-5, "seed": lambda: None, "layer": lambda: None},
         {"in_features": "count", "init_p": "rate", "seed": "seed", "layer": "optional_module"}),
]

CALLS = OPS + LAYERS + FORWARDS + OTHERS

#: bad values that some argument legitimately accepts (a plain ``0`` or ``1`` rate)
ACCEPTED = {("rate", 2): False}


def _names_argument(message: str, names: list[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in names)


def _call(call: Call, args: dict[str, Any]):
    return call.fn(**args)


def _cases():
    for call in CALLS:
        for arg, kind in call.kinds.items():
            for i in range(len(BAD[kind])):
                yield call, arg, kind, i


CASES = list(_cases())
TALLY: Counter = Counter()


def _refusal_problem(call: Call, arg: str, kind: str, index: int) -> str | None:
    """What is wrong with how ``call`` refuses bad value ``index`` of ``kind`` for ``arg`` (the
    other arguments valid): None when it raises a TypeError or ValueError whose short message
    names the argument."""
    args = {name: make() for name, make in call.valid.items()}
    args[arg] = BAD[kind][index]()
    case = f"{call.name}({arg}={args[arg]!r}) [{kind} {index}]"
    try:
        _call(call, args)
    except (TypeError, ValueError) as err:
        message = str(err)
        if not _names_argument(message, [call.said.get(arg, arg), arg]):
            return f"{case}: the message does not name it: {message}"
        if "Traceback" in message or len(message) >= 400:
            return f"{case}: not a short message: {message}"
        return None
    except Exception as err:  # noqa: BLE001 - any other exception is a failure to report, with the rest
        return f"{case}: raised {type(err).__name__}: {err}"
    return f"{case}: accepted"


@pytest.mark.parametrize("call", CALLS, ids=[c.name for c in CALLS])
def test_each_bad_argument_is_refused_naming_it(call):
    """Every case of the call (one test per call rather than per case: the cases take
    microseconds each, a test of its own costs more); every failure is listed."""
    problems = [_refusal_problem(call, arg, kind, index) for c, arg, kind, index in CASES if c is call]
    assert problems, f"{call.name} has no case"
    failures = [problem for problem in problems if problem is not None]
    assert not failures, "\n".join(failures)


def test_the_catalogue_covers_every_public_op_and_layer():
    named = {c.name for c in CALLS}
    for op in DF.__all__:
        if callable(getattr(DF, op)) and op not in ("check_p", "resolve_mask_shape"):
            assert op in named, op
    for layer in dnn.__all__:
        if layer != "DropoutLayer":
            assert layer in named, layer
    kinds = Counter(k for _, _, k, _ in CASES)
    assert len(CASES) > 600 and len(kinds) == len(BAD)


@pytest.mark.parametrize("call", CALLS, ids=[c.name for c in CALLS])
def test_valid_arguments_give_a_correct_result(call):
    args = {name: make() for name, make in call.valid.items()}
    call.check(_call(call, args), args)


@st.composite
def _mixed_call(draw):
    call = draw(st.sampled_from(CALLS))
    args, bad = {}, []
    for name, kind in call.kinds.items():
        if draw(st.integers(0, 3)) == 0:
            args[name] = BAD[kind][draw(st.integers(0, len(BAD[kind]) - 1))]()
            bad.append(name)
        else:
            args[name] = call.valid[name]()
    for name, make in call.valid.items():
        args.setdefault(name, make())
    return call, args, bad


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mixed_call())
def test_random_mixes_of_bad_arguments_end_in_a_clear_error_or_a_correct_result(case):
    call, args, bad = case
    TALLY["calls"] += 1
    if not bad:
        call.check(_call(call, args), args)
        TALLY["correct result"] += 1
        return
    with pytest.raises((TypeError, ValueError)) as err:
        _call(call, args)
    names = [n for b in bad for n in (b, call.said.get(b, b))]
    assert _names_argument(str(err.value), names), f"{call.name} {bad}: {err.value}"
    TALLY[type(err.value).__name__] += 1
