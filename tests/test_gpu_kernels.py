"""The Triton kernels (dropkit.kernels.gpu) against the CPU kernels and the reference, and the dispatcher.

Without a GPU the kernels run under Triton's interpreter on CPU tensors: ``TRITON_INTERPRET`` is read
when a function is decorated (Triton's own ``tl.randint4x`` when triton is first imported), so
conftest.py sets it before any test module is imported, and every test here forces the ``triton``
path with ``DROPKIT_KERNELS``. With a GPU (and ``TRITON_INTERPRET``
unset) the same tests run compiled on CUDA tensors. The interpreter is slow (~0.1 s per launch),
so sizes are small: each still spans several programs and ends in a partial one.
"""

from __future__ import annotations

import math
import os
import types
from pathlib import Path
import warnings

import pytest
import torch

#: CUDA and no interpreter (conftest.py sets TRITON_INTERPRET=1 where there is no GPU)
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'dropkit[gpu]')")
tl = pytest.importorskip("triton.language")

from dropkit import functional as DF  # noqa: E402
from dropkit import kernels, ops, rng  # noqa: E402
from dropkit.kernels import gpu, reference  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
BIG_SEED = 0x7ACE_D00D_1234_5678  # both key words non-zero
#: drop rates at every draw width: 1 bit (0.5), 2 (0.25), 4 (0.125), 8 (1/256), 16 (0.1)
RATES = {1: 0.5, 2: 0.25, 4: 0.125, 8: 1 / 256, 16: 0.1}
#: sizes: one element, a partial first program, several programs ending in a partial byte and program
SIZES = [1, 7, 1029, 3 * gpu.BLOCK + 13]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def test_the_kernels_run_compiled_on_a_gpu_and_interpreted_elsewhere():
    """Without a GPU every test below needs the interpreter, and Triton's own functions with it."""
    assert gpu.INTERPRETED == (not ON_GPU)
    assert isinstance(tl.randint4x, type(gpu._masked_kernel))


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "triton")


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor, so that -0.0 != 0.0 counts."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(bits_of(actual.cpu().contiguous()), bits_of(expected.cpu().contiguous()))


def sample(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def numba_masked(x, seed, p, kind, offset=0):
    """The CPU kernels' result for a tensor on any device."""
    out, bits = kernels.NUMBA.masked(x.cpu(), seed, p, kind, True, offset)
    return out, bits


# --- the generator ------------------------------------------------------------------------------------

@triton.jit
def _philox_probe(counter_ptr, out_ptr, seed, n, BLOCK: tl.constexpr):
    index = tl.arange(0, BLOCK)
    counter = tl.load(counter_ptr + index, mask=index < n, other=0)
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    for k, word in enumerate((w0, w1, w2, w3)):
        tl.store(out_ptr + 4 * index + k, word.to(tl.int64) & 0xFFFFFFFF, mask=index < n)


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, BIG_SEED, rng.SEED_BOUND])
def test_randint4x_is_rngs_philox_with_the_counters_high_word_in_c1(seed):
    """tl.randint4x(seed, counter) with a 64-bit counter: key (seed low, seed high), counter
    (counter low, counter high, 0, 0): exactly rng.philox4x32, also across the 2**32 carry."""
    counters = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62], dtype=torch.int64)
    out = torch.empty(len(counters), 4, dtype=torch.int64, device=DEVICE)
    _philox_probe[(1,)](counters.to(DEVICE), out, seed, len(counters), BLOCK=8)
    expected = torch.stack(rng.philox4x32(counters, seed), dim=1)
    assert torch.equal(out.cpu(), expected)


# --- keep masks and masked ops, bit for bit --------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 5, 2**32 - 3])  # the last one carries into the counter's high word
@pytest.mark.parametrize("width", sorted(RATES))
def test_keep_mask_equals_the_reference_at_every_width(width, offset):
    p = RATES[width]
    assert rng.keep_threshold(p)[0] == width
    for n in SIZES:
        mask = kernels.keep_mask(BIG_SEED, p, (n,), offset, DEVICE)
        assert mask.dtype == torch.bool and mask.device.type == DEVICE
        assert torch.equal(mask.cpu(), reference.keep_mask(BIG_SEED, p, (n,), offset)), n
    shape = (3, 1, 5)  # a shared mask of a broadcasting variant
    assert torch.equal(kernels.keep_mask(7, p, shape, device=DEVICE).cpu(), reference.keep_mask(7, p, shape))


@pytest.mark.parametrize("offset", [0, 2**32 - 3])
@pytest.mark.parametrize("width", sorted(RATES))
def test_dropout_and_packed_mask_equal_the_cpu_kernels_at_every_width(width, offset):
    for n in SIZES:
        x = sample(n, torch.float32, seed=n).to(DEVICE)
        out, bits = kernels.masked(x, BIG_SEED, RATES[width], "dropout", save_bits=True, offset=offset)
        expected, expected_bits = numba_masked(x, BIG_SEED, RATES[width], "dropout", offset)
        assert_bitwise_equal(out, expected)
        assert torch.equal(bits.cpu(), expected_bits), n  # pad bits of the last byte are 0 in both


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", reference.KINDS)
def test_every_kind_and_dtype_equals_the_cpu_kernels_in_both_modes(kind, dtype):
    p, n = 0.35, 2 * gpu.BLOCK + 3
    x = sample(n, dtype, seed=3).to(DEVICE)
    expected, expected_bits = numba_masked(x, BIG_SEED, p, kind)
    out, bits = kernels.masked(x, BIG_SEED, p, kind, save_bits=True)
    assert_bitwise_equal(out, expected)
    assert torch.equal(bits.cpu(), expected_bits)
    assert_bitwise_equal(kernels.masked_from_bits(x, bits, p, kind), expected)
    no_bits = kernels.masked(x, BIG_SEED, p, kind)
    assert no_bits[1] is None
    assert_bitwise_equal(no_bits[0], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_special_values_follow_the_reference(dtype):
    x = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40, -1e-40, 3.0] * 40, dtype=dtype)
    for kind in ("dropout", "relu_dropout", "alpha"):
        out = kernels.masked(x.to(DEVICE), 11, 0.5, kind)[0].cpu()
        expected = reference.masked_from_seed(x, 11, 0.5, kind)
        finite = ~expected.isnan()
        assert torch.equal(out.isnan(), expected.isnan()), kind
        assert_bitwise_equal(out[finite], expected[finite])


def test_eight_bit_rates_equal_the_cpu_kernels():
    previous = rng.set_rate_bits(8)
    try:
        for p in (0.1, 0.3):
            assert rng.keep_threshold(p)[0] <= 8
            x = sample(1500, torch.float32).to(DEVICE)
            assert_bitwise_equal(kernels.masked(x, 3, p, "dropout")[0], numba_masked(x, 3, p, "dropout")[0])
    finally:
        rng.set_rate_bits(previous)


def test_the_seed_may_be_a_tensor_read_inside_the_kernel():
    """The torch.library ops pass the seed as a 0-dim tensor (a graph replays it, never a constant)."""
    x = sample(1100, torch.float32).to(DEVICE)
    seed = torch.tensor(BIG_SEED, device=DEVICE)
    assert_bitwise_equal(gpu.masked(x, seed, 0.1, "dropout")[0], gpu.masked(x, BIG_SEED, 0.1, "dropout")[0])
    assert torch.equal(gpu.keep_mask(seed, 0.5, (300,), 0, DEVICE), gpu.keep_mask(BIG_SEED, 0.5, (300,), 0, DEVICE))
    assert_bitwise_equal(gpu.gaussian(x, seed, 0.2), gpu.gaussian(x, BIG_SEED, 0.2))


@pytest.mark.parametrize("bits", rng.RATE_BITS)
def test_rate_params_are_what_a_launch_with_a_python_float_passes(bits):
    """The rate kernels' parameters, computed by torch ops from a rate tensor: the draw width and
    threshold of rng.keep_threshold (rounding ties to even included) and the float32 constants."""
    ties = [2**-17, 3 * 2**-17, 2**-9, 3 * 2**-9]  # p * 2**bits half-way between integers
    rates = [0.0, 1e-6, 1 / 256, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 1 - 2**-17, *ties]
    previous = rng.set_rate_bits(bits)
    try:
        for kind in (*reference.KINDS, "gaussian"):
            for p in rates:
                params = gpu.rate_params(torch.tensor(p, dtype=torch.float64), kind, bits)
                constants = (math.sqrt(p / (1 - p)), 0.0, 0.0) if kind == "gaussian" else gpu._constants(kind, p)
                expected = torch.tensor([*rng.keep_threshold(p), *constants], dtype=torch.float32)
                assert torch.equal(params.view(torch.int32), expected.view(torch.int32)), (kind, p)
    finally:
        rng.set_rate_bits(previous)


def test_empty_inputs_launch_nothing():
    x = torch.empty(0, device=DEVICE)
    out, bits = kernels.masked(x, 1, 0.5, "dropout", save_bits=True)
    assert out.numel() == 0 and bits.numel() == 0
    assert kernels.keep_mask(1, 0.5, (0, 3), device=DEVICE).shape == (0, 3)


# --- Gaussian noise ---------------------------------------------------------------------------------------

def radius(seed: int, offset: int, n: int) -> torch.Tensor:
    """The Box-Muller radius sqrt(-2 log u1) of each element's draw (|z| <= radius)."""
    w0, _, w2, _ = rng.philox4x32(torch.arange(-(-n // 2)) + offset, seed)
    u1 = (torch.stack((w0, w2), dim=1).reshape(-1)[:n].double() + 0.5) * 2.0**-32
    return torch.sqrt(-2.0 * torch.log(u1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 2**32 - 1])
def test_gaussian_within_the_stated_float32_bound_of_the_reference(dtype, offset):
    """float32 Box-Muller against the reference's float64: the multiplier 1 + sigma z within
    GAUSSIAN_TOLERANCE float32 epsilons of 1 + sigma r (r the draw's radius: the angle's float32
    rounding moves z by up to r times it), then the rounding of the result to the dtype."""
    p = 0.3
    sigma = math.sqrt(p / (1 - p))
    n = 2 * gpu.BLOCK + 5
    x = sample(n, dtype, seed=5)
    out = kernels.gaussian(x.to(DEVICE), BIG_SEED, p, offset).cpu().double()
    expected = reference.gaussian(x, BIG_SEED, p, offset).double()
    eps = torch.finfo(torch.float32).eps
    bound = (x.double().abs() * (gpu.GAUSSIAN_TOLERANCE * eps * (1 + sigma * radius(BIG_SEED, offset, n)))
             + expected.abs() * torch.finfo(dtype).eps)
    assert bool(((out - expected).abs() <= bound).all())


def test_gaussian_draws_in_the_tails_are_accurate():
    """u1 near 1 (z near 0) and near 0 (|z| up to 6.7): where a plain float32 log(u1) would be
    off by up to 25 % (1 - u1 below float32's resolution near 1)."""
    n = 4000
    z = rng.normal(9, 0, n)
    out = kernels.gaussian(torch.ones(n, device=DEVICE), 9, 0.5).cpu().double()  # sigma = 1: out = 1 + z
    error = (out - 1.0 - z).abs() - (1.0 + z).abs() * 2**-24  # less the rounding of the result
    assert bool((error <= gpu.GAUSSIAN_TOLERANCE * 2**-23 * (1 + radius(9, 0, n))).all())
    assert float(radius(9, 0, n).min()) < 1e-2  # the sample does reach the region near u1 = 1


# --- through the ops: gradients, saved modes -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["dropout", "alpha_dropout", "relu_dropout", "gaussian_dropout"])
def test_functional_outputs_and_gradients_equal_the_reference_path(name, dtype, monkeypatch):
    fn = getattr(DF, name)
    x = sample(3 * 411, dtype, seed=2).reshape(3, 411)
    grad = sample(3 * 411, dtype, seed=4).reshape(3, 411)
    results = []
    for path, device in (("triton", DEVICE), ("reference", "cpu")):
        monkeypatch.setenv(kernels.ENV, path)
        xi = x.to(device).requires_grad_()
        y = fn(xi, 0.3, training=True, seed=BIG_SEED)
        y.backward(grad.to(device))
        results.append((y.detach().cpu(), xi.grad.cpu()))
    (y, g), (y_ref, g_ref) = results
    if name == "gaussian_dropout":
        eps = torch.finfo(dtype).eps * 4
        torch.testing.assert_close(y, y_ref, rtol=eps, atol=eps)
        torch.testing.assert_close(g, g_ref, rtol=eps, atol=eps)
    else:
        assert_bitwise_equal(y, y_ref)
        assert_bitwise_equal(g, g_ref)


@pytest.mark.parametrize("saved", ops.SAVED_MODES)
@pytest.mark.parametrize("kind", ["dropout", "alpha"])
def test_ops_in_both_saved_modes_equal_the_reference_with_gradients(kind, saved):
    op = ops.dropout if kind == "dropout" else ops.alpha_dropout
    p = 0.25
    x = sample(2 * 777, torch.float32).reshape(2, 777).to(DEVICE).requires_grad_()
    grad = sample(2 * 777, torch.float32, seed=1).reshape(2, 777)
    y = op(x, p, torch.tensor(BIG_SEED), tuple(x.shape), saved=saved)
    y.backward(grad.to(DEVICE))
    keep = reference.keep_mask(BIG_SEED, p, tuple(x.shape))
    assert_bitwise_equal(y, reference.masked(x.detach().cpu(), keep, kind, p))
    assert_bitwise_equal(x.grad, reference.masked(grad, keep, "dropout" if kind == "dropout" else "alpha_grad", p))


def test_shared_masks_of_the_broadcasting_variants_equal_the_reference_path(monkeypatch):
    x = sample(4 * 6 * 5, torch.float32).reshape(4, 6, 5)
    outputs = []
    for path, device in (("triton", DEVICE), ("reference", "cpu")):
        monkeypatch.setenv(kernels.ENV, path)
        xi = x.to(device)
        outputs.append(torch.cat([
            DF.dropout1d(xi, 0.5, training=True, seed=3).flatten(),
            DF.locked_dropout(xi, 0.25, training=True, seed=4).flatten(),
            DF.drop_path(xi, 0.5, training=True, seed=5).flatten(),
        ]).cpu())
    assert_bitwise_equal(outputs[0], outputs[1])


# --- the dispatcher ---------------------------------------------------------------------------------------

def test_dropkit_kernels_selects_the_path(monkeypatch):
    x = torch.zeros(3)
    for value, path in (("triton", "triton"), ("reference", "reference"), ("numba", "numba"), ("auto", "numba"),
                        ("", "numba"), (" Triton ", "triton")):
        monkeypatch.setenv(kernels.ENV, value)
        assert kernels.path_for(x) == path
    monkeypatch.delenv(kernels.ENV)
    assert kernels.path_for(x) == "numba"
    assert kernels.path_for(torch.zeros(3, dtype=torch.int32)) == "reference"
    monkeypatch.setenv(kernels.ENV, "cuda")
    with pytest.raises(ValueError, match="DROPKIT_KERNELS must be one of auto, numba, triton, reference"):
        kernels.path_for(x)
    monkeypatch.setenv(kernels.ENV, "numba")
    with pytest.raises(ValueError, match="numba runs CPU tensors only"):
        kernels.path_for(torch.empty(3, device="meta"))


def test_the_triton_path_backend_is_the_gpu_module(monkeypatch):
    assert kernels._backend(torch.zeros(1)) is gpu.BACKEND
    assert gpu.BACKEND._fields == kernels.Backend._fields


def _cuda_like() -> types.SimpleNamespace:
    """What path_for reads of a tensor, for a CUDA tensor on a machine without one."""
    return types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)


def test_cuda_tensors_take_triton_when_it_is_importable(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "auto")
    assert kernels.path_for(_cuda_like()) == "triton"


def test_cuda_without_triton_runs_the_reference_and_warns_once_why(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "auto")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    kernels._warn_reference_on_gpu.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.path_for(_cuda_like()) == "reference"
        assert kernels.path_for(_cuda_like()) == "reference"
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert "Triton is not importable" in str(caught[0].message) and "pip install triton" in str(caught[0].message)
    monkeypatch.setenv(kernels.ENV, "triton")
    with pytest.raises(RuntimeError, match="DROPKIT_KERNELS=triton, but Triton cannot be imported"):
        kernels.path_for(torch.zeros(1))
    kernels._warn_reference_on_gpu.cache_clear()


# --- torch integration: the dropkit::triton_* ops ---------------------------------------------------------

TRITON_OPS = ("triton_masked", "triton_masked_save_bits", "triton_masked_from_bits", "triton_relu_dropout",
              "triton_gaussian", "triton_keep_mask", "triton_bias_act_dropout", "triton_bias_act_dropout_backward")


def test_triton_ops_are_registered_with_fake_implementations_of_the_right_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert ops.triton_ops()
    for name in TRITON_OPS:
        assert hasattr(torch.ops.dropkit, name), name
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.empty(3, 1001, dtype=torch.bfloat16, device=DEVICE))
        seed = mode.from_tensor(torch.tensor(5, device=DEVICE))
        rate = mode.from_tensor(torch.tensor(0.5, dtype=torch.float64, device=DEVICE))
        out = torch.ops.dropkit.triton_masked(x, seed, rate, 16, "dropout")
        assert out.shape == (3, 1001) and out.dtype == torch.bfloat16
        out, bits = torch.ops.dropkit.triton_masked_save_bits(x, seed, rate, 16, "alpha")
        assert out.shape == (3, 1001) and bits.shape == (376,) and bits.dtype == torch.uint8
        assert torch.ops.dropkit.triton_masked_from_bits(x, bits, rate, "dropout").shape == (3, 1001)
        assert torch.ops.dropkit.triton_gaussian(x, seed, rate).shape == (3, 1001)
        keep = torch.ops.dropkit.triton_keep_mask(seed, rate, 16, [3, 1, 7])
        assert keep.shape == (3, 1, 7) and keep.dtype == torch.bool and keep.device == x.device
        bias = mode.from_tensor(torch.empty(1001, dtype=torch.bfloat16, device=DEVICE))
        assert torch.ops.dropkit.triton_bias_act_dropout(x, bias, seed, rate, 16, "gelu", x).shape == (3, 1001)


@pytest.mark.parametrize("kind", ["dropout", "alpha"])
def test_triton_ops_equal_the_kernels_and_their_gradients_the_reference(kind):
    """The ops a compiled graph runs: the seed and the rate as tensors, autograd from the seed or the bits."""
    ops.triton_ops()
    p, seed = 0.3, torch.tensor(BIG_SEED, device=DEVICE)
    rate = torch.tensor(p, dtype=torch.float64, device=DEVICE)
    x = sample(1500, torch.float32).to(DEVICE).requires_grad_()
    grad = sample(1500, torch.float32, seed=1)
    keep = reference.keep_mask(BIG_SEED, p, (1500,))
    grad_kind = "dropout" if kind == "dropout" else "alpha_grad"
    for op in (torch.ops.dropkit.triton_masked, lambda *a: torch.ops.dropkit.triton_masked_save_bits(*a)[0]):
        y = op(x, seed, rate, rng.rate_bits(), kind)
        (gx,) = torch.autograd.grad(y, x, grad.to(DEVICE))
        assert_bitwise_equal(y.detach(), reference.masked(x.detach().cpu(), keep, kind, p))
        assert_bitwise_equal(gx, reference.masked(grad, keep, grad_kind, p))
    y = torch.ops.dropkit.triton_relu_dropout(x, seed, rate, rng.rate_bits())
    (gx,) = torch.autograd.grad(y, x, grad.to(DEVICE))
    assert_bitwise_equal(gx, reference.relu_dropout_grad(grad, y.detach().cpu(), p))
    shape = (3, 1, 7)
    assert torch.equal(torch.ops.dropkit.triton_keep_mask(seed, rate, rng.rate_bits(), list(shape)).cpu(),
                       reference.keep_mask(BIG_SEED, p, shape))


class _Net(torch.nn.Module):
    def __init__(self, saved: str = "seed") -> None:
        super().__init__()
        self.inp = torch.nn.Linear(12, 32)
        self.out = torch.nn.Linear(32, 1)
        self.bias = torch.nn.Parameter(torch.zeros(32))
        self.saved = saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = ops.dropout(h, 0.5, rng.draw_seed(), tuple(h.shape), saved=self.saved)
        h = DF.relu_dropout(h - 0.1, 0.25, training=True)
        h = DF.alpha_dropout(h, 0.2, training=True) + DF.gaussian_dropout(h, 0.1, training=True)
        h = DF.bias_act_dropout(h, self.bias, 0.1, activation="gelu", residual=h, training=True)
        return self.out(h).sum()


@pytest.mark.parametrize("saved", ops.SAVED_MODES)
def test_torch_compile_fullgraph_runs_the_triton_ops_and_matches_eager(saved):
    """torch.compile(fullgraph=True) on the triton path: no graph breaks, the graph calls the
    dropkit::triton_* ops (the seed a tensor input, drawn in the graph), same gradients as eager."""
    torch.manual_seed(0)
    net = _Net(saved).to(DEVICE)
    x = torch.randn(4, 12, device=DEVICE)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def grads(model) -> list[torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(5)
        model(x).backward()
        return [p.grad.clone() for p in net.parameters()]

    eager = grads(net)
    traced = grads(torch.compile(net, fullgraph=True, backend=backend))
    assert len(graphs) == 1
    for name in ("triton_masked_save_bits" if saved == "bits" else "triton_masked", "triton_relu_dropout",
                 "triton_gaussian", "triton_bias_act_dropout"):
        assert f"dropkit.{name}" in graphs[0], name
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    for a, b in zip(eager, grads(compiled)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved", ops.SAVED_MODES)
def test_checkpoint_recomputation_reproduces_masks_and_gradients(saved):
    torch.manual_seed(0)
    net = _Net(saved).to(DEVICE)
    x = torch.randn(4, 12, device=DEVICE)

    def grads(use_checkpoint: bool) -> list[torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(1)
        out = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False) if use_checkpoint else net(x)
        out.backward()
        return [p.grad.clone() for p in net.parameters()]

    for plain, recomputed in zip(grads(False), grads(True)):
        assert torch.equal(plain, recomputed)


def _masks_of_every_kind(x: torch.Tensor) -> torch.Tensor:
    """An element-wise mask, a shared one, a fused op and Gaussian noise, summed."""
    return (DF.dropout(x, 0.5, training=True) + DF.dropout1d(x, 0.25, training=True)
            + DF.bias_act_dropout(x, None, 0.1, training=True, activation="relu", residual=x)
            + DF.gaussian_dropout(x, 0.2, training=True))


def test_a_compiled_graph_reads_a_fresh_seed_at_every_call_and_draws_eagers_masks():
    """No seed is a constant of the graph (a replayed CUDA graph would repeat its masks forever):
    it is drawn in the graph from torch's generator and enters the kernels as a tensor. Two calls
    of one graph draw different masks, the very masks eager mode draws from the same generator
    state, and the second call compiles nothing."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(_masks_of_every_kind, fullgraph=True, backend=counter)
    x = torch.ones(2, 8, 70, device=DEVICE)
    torch.manual_seed(3)
    first, second = f(x), f(x)
    torch.manual_seed(3)
    assert torch.equal(first, _masks_of_every_kind(x)) and torch.equal(second, _masks_of_every_kind(x))
    assert not torch.equal(first, second)
    assert counter.frame_count == 1
    code = counter.graphs[0].code
    for op in ("triton_masked", "triton_keep_mask", "triton_bias_act_dropout", "triton_gaussian"):
        assert f"torch.ops.dropkit.{op}" in code, op
    assert code.count("torch.randint") == 4  # one seed drawn per op, in the graph
    torch._dynamo.reset()


SHARED_MASKS = {
    "dropout1d": lambda x: DF.dropout1d(x, 0.5, training=True, seed=3),
    "locked_dropout": lambda x: DF.locked_dropout(x, 0.25, training=True, seed=4),
    "drop_path": lambda x: DF.drop_path(x, 0.1, training=True, seed=5),
    "feature_alpha_dropout": lambda x: DF.feature_alpha_dropout(x, 0.3, training=True, seed=6),
    "drop_block2d": lambda x: DF.drop_block2d(x[:, :, :, None].expand(-1, -1, -1, 5), 0.3, 2, training=True, seed=7),
}


class _Launches:
    """Wraps ``gpu._launch``: notes each kernel launched with the device of its first tensor, and
    runs it unless that is the meta device (whose tensors hold no memory)."""

    def __init__(self) -> None:
        self.kernels = []

    def __call__(self, launch):
        log = self

        class Grid:
            def __init__(self, kernel, traceable) -> None:
                self.kernel, self.traceable = kernel, traceable

            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    log.kernels.append((self.kernel, args[0].device))
                    if args[0].device.type != "meta":
                        launch(self.kernel, self.traceable)[grid](*args, **kwargs)
                return call

        return Grid


@pytest.mark.parametrize("name", SHARED_MASKS)
def test_shared_masks_come_from_the_triton_keep_mask_kernel_on_the_inputs_device(name, monkeypatch):
    """The channel, locked and path variants draw their small masks with the Triton kernel on the
    input's device, eager and compiled (no mask is drawn on the CPU and copied), and they are the
    numba path's masks bit for bit. The meta device shows where the eager mask is drawn."""
    op = SHARED_MASKS[name]
    x = sample(4 * 6 * 9, torch.float32).reshape(4, 6, 9)
    launches = _Launches()
    monkeypatch.setattr(gpu, "_launch", launches(gpu._launch))
    eager = op(x.to(DEVICE))
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")(x.to(DEVICE))
    assert [k for k, _ in launches.kernels] == [gpu._keep_mask_kernel, gpu._keep_mask_rate_kernel]
    assert {device.type for _, device in launches.kernels} == {torch.device(DEVICE).type}
    launches.kernels.clear()
    op(torch.empty(4, 6, 9, device="meta"))
    assert [(k, d.type) for k, d in launches.kernels] == [(gpu._keep_mask_kernel, "meta")]
    monkeypatch.setenv(kernels.ENV, "numba")
    expected = op(x)
    assert_bitwise_equal(eager, expected)
    assert_bitwise_equal(compiled, expected)
    torch._dynamo.reset()


# --- the kernels compile for a GPU ------------------------------------------------------------------------

#: compiles kernels ahead of time for sm_90 (an H100) to PTX, no GPU needed, and prints which float
#: instructions each one holds; run without TRITON_INTERPRET (this process imported the kernels interpreted)
_COMPILE_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dropkit.kernels import gpu

def ptx(fn, signature, constexprs):
    names = list(fn.arg_names)
    sig = {name: signature.get(name, "constexpr") for name in names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32)).asm["ptx"]

def float_ops(text):
    return sorted(set(re.findall(r"\b((?:fma|div|mul|add)\.[a-z.]*f32)\b", text)))

out = {}
for dtype, kind, seed in [("bf16", 0, "*i64"), ("bf16", 1, "*i64"), ("bf16", 2, "*i64"), ("bf16", 3, "*i64"),
                          ("bf16", 0, "i64"), ("fp16", 1, "i64"), ("fp32", 0, "i64"), ("fp32", 1, "i64")]:
    sig = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "bits_ptr": "*u8", "seed": seed, "offset": "i64",
           "n": "i32", "thr": "i32", "a": "fp32", "b": "fp32", "c": "fp32"}
    const = {"KIND": kind, "WIDTH": (16, 1, 2, 8)[kind], "SAVE_BITS": seed == "i64", "SEED_IN_TENSOR": seed != "i64",
             "BLOCK": gpu.BLOCK}
    out[f"masked {dtype} kind {kind} seed {seed}"] = float_ops(ptx(gpu._masked_kernel, sig, const))
sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "bits_ptr": "*u8", "seed_ptr": "*i64", "params_ptr": "*fp32",
       "offset": "i32", "n": "i32"}
for kind in (0, 1):  # the rate read from memory: one branch per draw width
    out[f"masked bf16 kind {kind} rate tensor"] = float_ops(ptx(gpu._masked_rate_kernel, sig, {
        "KIND": kind, "SAVE_BITS": True, "BLOCK": gpu.BLOCK}))
sig = {"x_ptr": "*bf16", "bits_ptr": "*u8", "out_ptr": "*bf16", "n": "i32", "a": "fp32", "b": "fp32", "c": "fp32"}
out["from_bits bf16"] = float_ops(ptx(gpu._from_bits_kernel, sig, {
    "KIND": 1, "RATE_IN_TENSOR": False, "BLOCK": gpu.BLOCK}))
out["keep_mask rate tensor"] = float_ops(ptx(gpu._keep_mask_rate_kernel, {
    "out_ptr": "*u8", "seed_ptr": "*i64", "params_ptr": "*fp32", "offset": "i32", "n": "i32"}, {"BLOCK": gpu.BLOCK}))
out["keep_mask"] = float_ops(ptx(gpu._keep_mask_kernel, {"out_ptr": "*u8", "seed": "*i64", "offset": "i32",
                                                          "n": "i32", "thr": "i32"},
                                 {"WIDTH": 16, "SEED_IN_TENSOR": True, "BLOCK": gpu.BLOCK}))
out["gaussian"] = float_ops(ptx(gpu._gaussian_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16", "seed": "i64",
                                                        "offset": "i64", "n": "i32", "sigma": "fp32"},
                                {"SEED_IN_TENSOR": False, "RATE_IN_TENSOR": False, "BLOCK": gpu.BLOCK}))
sig = {"x_ptr": "*bf16", "bias_ptr": "*bf16", "residual_ptr": "*bf16", "out_ptr": "*bf16", "seed": "*i64",
       "n": "i32", "features": "i32", "thr": "i32", "scale": "fp32"}
out["fused gelu"] = float_ops(ptx(gpu._bias_act_dropout_kernel, sig, {
    "ACTIVATION": 2, "HAS_BIAS": True, "HAS_RESIDUAL": True, "WIDTH": 16, "SEED_IN_TENSOR": True, "BLOCK": gpu.BLOCK}))
sig = {"grad_ptr": "*bf16", "x_ptr": "*bf16", "bias_ptr": "*bf16", "grad_x_ptr": "*bf16", "seed": "*i64",
       "n": "i32", "features": "i32", "thr": "i32", "scale": "fp32"}
out["fused gelu backward"] = float_ops(ptx(gpu._bias_act_dropout_backward_kernel, sig, {
    "ACTIVATION": 2, "HAS_BIAS": True, "WIDTH": 16, "SEED_IN_TENSOR": True, "BLOCK": gpu.BLOCK}))
sig = {"x_ptr": "*bf16", "bias_ptr": "*bf16", "residual_ptr": "*bf16", "out_ptr": "*bf16", "seed_ptr": "*i64",
       "params_ptr": "*fp32", "n": "i32", "features": "i32"}
out["fused gelu rate tensor"] = float_ops(ptx(gpu._bias_act_dropout_rate_kernel, sig, {
    "ACTIVATION": 2, "HAS_BIAS": True, "HAS_RESIDUAL": True, "BLOCK": gpu.BLOCK}))
print(json.dumps(out))
"""


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend(), reason="this Triton has no NVIDIA backend to compile with")
def test_every_kernel_compiles_for_sm90_and_rounds_as_the_reference():
    """The interpreter runs the kernels as Python; this compiles each one to PTX for an H100
    (sm_90, no GPU needed), which rejects what only the compiler checks. The masked ops hold no
    fused multiply-add (the reference rounds the product and the sum apart) and divide with IEEE
    rounding (div.rn, not the approximate division)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", kernels.ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(gpu.__file__).parents[2]), env.get("PYTHONPATH")]))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default a user gets: contraction on, unless prevented
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ops_by_kernel = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(ops_by_kernel) == 17, sorted(ops_by_kernel)
    for name, float_ops in ops_by_kernel.items():
        if name.startswith(("masked", "from_bits")):
            assert not any(op.startswith("fma") for op in float_ops), (name, float_ops)
            assert not any(op.startswith("div") and op != "div.rn.f32" for op in float_ops), (name, float_ops)
        if name.startswith("masked") and " kind 0 " in name:
            assert "div.rn.f32" in float_ops, name
        if name.startswith("masked") and " kind 1 " in name:
            assert {"mul.f32", "add.f32"} <= set(float_ops) or {"mul.rn.f32", "add.rn.f32"} <= set(float_ops), name
    assert ops_by_kernel["keep_mask"] == ops_by_kernel["keep_mask rate tensor"] == []  # integers only
