"""The fused ``residual + dropout(act(x + bias))``: functional, module, the residual form of
``Dropout``, ``dropkit.fuse``, README example.

The CPU path is a composition of dropkit's ops and must equal the unfused ops bit for bit with the
same seed; the Triton path (under the interpreter on CPU tensors without a GPU, see
test_gpu_kernels.py) must equal the CPU path: bit for bit for ``none`` and ``relu``, within a few
float32 ulps for ``gelu`` (Triton's erf is not torch's).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

#: CUDA and no interpreter (conftest.py sets TRITON_INTERPRET=1 where there is no GPU)
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

import dropkit  # noqa: E402
from dropkit import functional as DF  # noqa: E402
from dropkit import kernels, ops  # noqa: E402
from dropkit import nn as dnn  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
SEED = 0x7ACE_D00D_1234_5678
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(bits_of(actual.cpu().contiguous()), bits_of(expected.cpu().contiguous()))


def inputs(dtype=torch.float32, shape=(3, 5, 67), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    bias = torch.randn(shape[-1], generator=g).to(dtype)
    residual = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    return x, bias, residual, grad


def run(x, bias, residual, grad, p, activation, device="cpu", fused=True):
    """Output and gradients (x, bias, residual) of the fused op, or of the unfused ops."""
    x, bias, residual = (t.to(device).requires_grad_() for t in (x, bias, residual))
    if fused:
        y = DF.bias_act_dropout(x, bias, p, activation=activation, residual=residual, training=True, seed=SEED)
    else:
        h = x + bias
        a = torch.relu(h) if activation == "relu" else F.gelu(h) if activation == "gelu" else h
        y = residual + DF.dropout(a, p, training=True, seed=SEED)
    y.backward(grad.to(device))
    return [t.detach().cpu() for t in (y, x.grad, bias.grad, residual.grad)]


# --- the CPU path --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_cpu_path_equals_the_unfused_ops_with_the_same_seed(activation, dtype, monkeypatch):
    monkeypatch.setenv(kernels.ENV, "auto")
    args = inputs(dtype)
    for fused, unfused in zip(run(*args, 0.3, activation), run(*args, 0.3, activation, fused=False)):
        assert_bitwise_equal(fused, unfused)


def test_without_bias_or_residual_it_is_dropout_of_the_activation():
    x = inputs()[0]
    y = DF.bias_act_dropout(x, None, 0.5, activation="gelu", training=True, seed=3)
    assert_bitwise_equal(y, DF.dropout(F.gelu(x), 0.5, training=True, seed=3))
    assert_bitwise_equal(DF.bias_act_dropout(x, None, 0.5, training=True, seed=3),
                         DF.dropout(x, 0.5, training=True, seed=3))


def test_eval_and_the_trivial_rates():
    x, bias, residual, _ = inputs()
    expected = residual + F.gelu(x + bias)
    for p, training in ((0.3, False), (0.0, True)):
        out = DF.bias_act_dropout(x, bias, p, activation="gelu", residual=residual, training=training)
        assert_bitwise_equal(out, expected)
    xg = x.clone().requires_grad_()
    out = DF.bias_act_dropout(xg, bias, 1.0, activation="relu", residual=residual, training=True)
    assert torch.equal(out, residual)
    out.sum().backward()
    assert torch.equal(xg.grad, torch.zeros_like(x))


def test_fresh_seeds_differ_and_a_generator_repeats():
    x, bias, _, _ = inputs()
    a = DF.bias_act_dropout(x, bias, 0.5, training=True)
    b = DF.bias_act_dropout(x, bias, 0.5, training=True)
    assert not torch.equal(a, b)
    first = DF.bias_act_dropout(x, bias, 0.5, training=True, generator=torch.Generator().manual_seed(1))
    again = DF.bias_act_dropout(x, bias, 0.5, training=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"activation": "tanh"}, ValueError, "activation must be one of none, relu, gelu, got 'tanh'"),
    ({"p": "0.1"}, TypeError, "p must be a float in"),
    ({"bias": torch.zeros(4)}, ValueError, r"bias must have shape \[67\] for an input of shape \[3, 5, 67\], got \[4\]"),
    ({"residual": torch.zeros(3, 67)}, ValueError, r"residual must have shape \[3, 5, 67\]"),
    ({"bias": torch.zeros(67, dtype=torch.float64)}, TypeError, "bias must be None or a tensor of the input's dtype"),
    ({"residual": [1.0]}, TypeError, "residual must be None or a tensor of the input's dtype"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    x, bias, _, _ = inputs()
    args = {"bias": bias, "p": 0.1, **kwargs}
    with pytest.raises(error, match=message):
        DF.bias_act_dropout(x, args.pop("bias"), args.pop("p"), training=True, **args)
    with pytest.raises(TypeError):
        DF.bias_act_dropout(x, bias, 0.1)  # training is required


# --- the Triton path -----------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_triton_path_equals_the_cpu_path(activation, dtype, monkeypatch):
    """One kernel each way; the same mask as the CPU path. GELU: Triton's erf against torch's, so
    the values agree to a few ulps of float32 (bfloat16: one rounding of those, i.e. 1 ulp)."""
    args = inputs(dtype, shape=(3, 411))
    p = 0.25 if activation == "relu" else 0.1  # draw widths 2 and 16
    monkeypatch.setenv(kernels.ENV, "triton")
    fused = run(*args, p, activation, device=DEVICE)
    monkeypatch.setenv(kernels.ENV, "auto")
    expected = run(*args, p, activation)
    for name, got, want in zip(("out", "grad x", "grad bias", "grad residual"), fused, expected):
        if activation == "gelu":
            assert torch.equal(got == 0, want == 0), name  # the same mask
            eps = torch.finfo(dtype).eps
            # grad bias sums 3 rows of such values
            torch.testing.assert_close(got, want, rtol=4 * eps, atol=4 * eps * float(want.abs().max()), msg=name)
        else:
            assert_bitwise_equal(got, want)


@needs_triton
def test_triton_fused_backward_keeps_only_the_seed_without_an_activation(monkeypatch):
    """activation="none": no tensor is kept for backward (eager mode holds the seed as a Python int
    on the autograd node); relu/gelu keep their input x and the bias."""
    monkeypatch.setenv(kernels.ENV, "triton")
    x, bias, residual, _ = inputs(shape=(4, 300))
    saved = {}
    for activation in ("none", "gelu"):
        xi, bi = x.to(DEVICE).requires_grad_(), bias.to(DEVICE).requires_grad_()
        kept = []

        def pack(t, kept=kept):
            kept.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            DF.bias_act_dropout(xi, bi, 0.2, activation=activation, residual=residual.to(DEVICE), training=True)
        saved[activation] = sorted(t.numel() for t in kept)
    assert saved["none"] == []
    assert saved["gelu"] == sorted([300, 4 * 300])  # bias, x
    assert ops.FUSED_SAVED["none"] == "nothing"


# --- the module and dropkit.fuse ---------------------------------------------------------------------

def test_module_holds_a_bias_and_matches_the_functional_op():
    layer = dnn.BiasActDropout(0.2, activation="gelu", features=67, seed=5)
    assert "activation='gelu'" in repr(layer) and "features=67" in repr(layer) and "seed=5" in repr(layer)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    x, _, residual, _ = inputs()
    y = layer(x, residual=residual)
    expected = DF.bias_act_dropout(x, layer.bias, 0.2, activation="gelu", residual=residual, training=True,
                                   generator=torch.Generator().manual_seed(5))
    assert_bitwise_equal(y.detach(), expected.detach())
    layer.eval()
    assert_bitwise_equal(layer(x).detach(), F.gelu(x))
    with pytest.raises(ValueError, match="activation must be one of"):
        dnn.BiasActDropout(0.1, activation="swish")
    with pytest.raises(ValueError, match="features must be a positive int or None, got True"):
        dnn.BiasActDropout(0.1, features=True)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.2),
        nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(32, 32), nn.GELU(approximate="tanh"), nn.Dropout(0.1),  # not the erf GELU: left alone
        nn.Sequential(nn.Linear(32, 8), nn.GELU(), nn.Dropout(0.5)),
    )


def test_fuse_gives_the_same_outputs_and_gradients_from_the_same_seeds():
    plain, fused = mlp(), mlp()
    dropkit.convert(plain)
    dropkit.convert(fused)
    assert dropkit.fuse(fused) == 3
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("BiasActDropout") == 2 and kinds.count("ReLUDropout") == 1 and kinds.count("Dropout") == 1
    assert list(plain.state_dict()) == list(fused.state_dict())
    x = torch.randn(6, 16)
    results = []
    for model in (plain, fused):
        torch.manual_seed(11)
        out = model(x)
        out.sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    assert_bitwise_equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert_bitwise_equal(a, b)
    fused.eval()
    plain.eval()
    assert_bitwise_equal(fused(x).detach(), plain(x).detach())


def test_fuse_leaves_torchs_own_dropout_and_shared_masks_alone():
    net = nn.Sequential(nn.GELU(), nn.Dropout(0.1), nn.GELU(), dnn.Dropout(0.1, mask_shape=(1, None)))
    assert dropkit.fuse(net) == 0


# --- the residual form: Dropout(x, residual=r) and what fuse makes of it ------------------------------

def paths():
    return ["auto", "triton"] if kernels.triton_available() else ["auto"]


def device_of(path: str) -> str:
    return DEVICE if path == "triton" else "cpu"


@pytest.mark.parametrize("path", paths())
@pytest.mark.parametrize("mask_shape", [None, (None, 1)])
def test_dropout_with_residual_is_residual_plus_dropout_with_the_same_mask(mask_shape, path, monkeypatch):
    """``layer(x, residual=r)`` against ``r + layer(x)`` from the same seed: outputs and the
    gradients of x and r bit for bit (on the triton path one fused kernel each way)."""
    monkeypatch.setenv(kernels.ENV, path)
    x, _, residual, grad = (t.to(device_of(path)) for t in inputs(shape=(3, 300)))
    results = []
    for with_residual in (True, False):
        layer = dnn.Dropout(0.3, mask_shape=mask_shape, seed=4)
        xi, ri = x.clone().requires_grad_(), residual.clone().requires_grad_()
        y = layer(xi, residual=ri) if with_residual else ri + layer(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, ri.grad))
    for got, want in zip(*results):
        assert_bitwise_equal(got, want)
    assert bool((results[0][0] == residual).any()) and bool((results[0][0] != residual).any())
    layer = dnn.Dropout(0.3, mask_shape=mask_shape).eval()
    assert_bitwise_equal(layer(x, residual=residual), residual + x)
    with pytest.raises(ValueError, match=r"residual must have shape \[3, 300\] for an input of shape \[3, 300\]"):
        layer(x, residual=residual[0])


class ResidualMLP(nn.Module):
    """A block that says where its residual add is: ``self.drop(self.act(h), residual=x)``."""

    def __init__(self, activation: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(16, 16)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.drop = dnn.Dropout(0.3)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.act(self.fc(x)), residual=x))


class ActivationReadTwice(ResidualMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.act(self.fc(x)), residual=x) + self.act(x))


@pytest.mark.parametrize("path", paths())
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_fuse_puts_a_fused_layer_where_a_module_calls_its_dropout_with_residual(activation, path, monkeypatch):
    """The pair becomes one BiasActDropout that the module calls with ``residual=``: the same outputs
    and gradients as the unfused block from the same seeds (bit for bit, except Triton's GELU,
    whose erf is not torch's: within 4 float32 epsilons of the largest value, as above)."""
    monkeypatch.setenv(kernels.ENV, path)
    plain, fused = ResidualMLP(activation).to(device_of(path)), ResidualMLP(activation).to(device_of(path))
    assert dropkit.fuse(fused) == 1
    assert isinstance(fused.act, nn.Identity) and isinstance(fused.drop, dnn.BiasActDropout)
    assert fused.drop.activation == activation and fused.drop.p == 0.3 and fused.drop.bias is None
    assert list(plain.state_dict()) == list(fused.state_dict())
    x = torch.randn(6, 16, device=device_of(path))
    results = []
    for model in (plain, fused):
        torch.manual_seed(11)
        out = model(x)
        out.sum().backward()
        results.append([out.detach()] + [q.grad for q in model.parameters()])
    for got, want in zip(results[1], results[0]):
        if activation == "gelu" and path == "triton":
            eps = torch.finfo(torch.float32).eps
            torch.testing.assert_close(got, want, rtol=4 * eps, atol=4 * eps * float(want.abs().max()))
        else:
            assert_bitwise_equal(got, want)


def test_fuse_leaves_a_residual_pair_alone_when_the_activation_is_read_elsewhere():
    assert dropkit.fuse(ActivationReadTwice("gelu")) == 0
    inplace = ResidualMLP("relu")
    inplace.act = nn.ReLU(inplace=True)  # its input could be read after it
    assert dropkit.fuse(inplace) == 0
    torch_dropout = ResidualMLP("gelu")
    torch_dropout.drop = nn.Dropout(0.3)
    assert dropkit.fuse(torch_dropout) == 0


# --- the README example ---------------------------------------------------------------------------

def test_readme_gpt_block_example_runs_as_written():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Fused bias, activation, dropout and residual"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the repository's own README
    assert namespace["y"].shape == namespace["x"].shape


@needs_triton
def test_triton_path_fuses_bias_and_activation_without_dropout_too(monkeypatch):
    """Eval mode or p = 0 on the triton path: the same kernel with nothing dropped, no RNG drawn."""
    x, bias, residual, _ = inputs(shape=(3, 300))
    monkeypatch.setenv(kernels.ENV, "triton")
    assert ops.fused_kernel(x)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    outs = [DF.bias_act_dropout(x.to(DEVICE), bias.to(DEVICE), p, activation="relu", residual=residual.to(DEVICE),
                                training=training).cpu() for p, training in ((0.5, False), (0.0, True))]
    assert torch.equal(torch.get_rng_state(), state)
    for out in outs:
        assert_bitwise_equal(out, residual + torch.relu(x + bias))


# --- the benchmarks' commands (tiny sizes: they must run on the CPU; never timed here) ------------------

def test_bench_fused_command_prints_the_epilogue_and_block_figures(capsys, tmp_path):
    from dropkit.lab.cli import main

    out = tmp_path / "fused.json"
    assert main(["bench", "fused", "--device", "cpu", "--rows", "8", "--cols", "40", "--block-dim", "16",
                 "--block-heads", "2", "--block-seq", "4", "--block-batch", "2", "--repeats", "1",
                 "--compile", "aot_eager", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    assert result["environment"]["device"] == "cpu" and "load_average_1min" in result["environment"]
    epilogue = result["epilogue"]
    assert epilogue["shape"] == [8, 40] and epilogue["dtype"] == "bfloat16" and epilogue["activation"] == "gelu"
    assert set(epilogue["fwd_over_floor"]) == {"dropkit", "eager", "compile"}
    # both rounded to 4 decimals: at most 0.5e-4 + 1.5 * 0.5e-4 apart
    assert epilogue["fwd_floor_ms"] == pytest.approx(1.5 * epilogue["ms"]["copy"], rel=0, abs=1.3e-4)
    block = result["block_step"]
    assert set(block["ms"]) == {"torch", "torch_compile", "dropkit", "dropkit_compile"}
    assert "peak_step_memory_mib" not in block  # CUDA only


def test_bench_kernels_command_on_a_device_with_compiled_variants(capsys):
    from dropkit.lab.cli import main

    assert main(["bench", "kernels", "--device", "cpu", "--sizes", "8", "--dtypes", "float32", "--p", "0.5",
                 "--repeats", "1", "--compile", "aot_eager"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compile_backend"] == "aot_eager" and result["environment"]["kernel_path"] == "numba"
    case = result["cases"][0]
    names = {"torch", "dropkit_seed", "dropkit_bits", "torch_compile", "dropkit_seed_compile"}
    assert set(case["fraction_of_copy_bandwidth"]["fwd"]) == set(case["fraction_of_copy_bandwidth"]["fwd_bwd"]) == names
    assert case["saved_bytes_per_element"]["dropkit_seed"] == 0
    assert case["saved_bytes_per_element"]["dropkit_bits"] == 0.125


@pytest.mark.parametrize(("argv", "message"), [
    (["fused", "--block-dim", "10", "--block-heads", "4"], r"--block-dim \(10\) must be a multiple of --block-heads"),
    (["fused", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_bench_fused_names_a_bad_option(argv, message, capsys):
    from dropkit.lab.cli import main

    try:
        status = main(["bench", *argv])
    except SystemExit as exit_info:  # argparse's own checks
        status = exit_info.code
    assert status == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_bench_on_cuda_without_a_device_says_so(capsys):
    from dropkit.lab.cli import main

    assert main(["bench", "fused", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
