"""The compiled kernels against the plain-torch reference, and the custom ops around them.

Correctness only (timings live in dropkit.lab.bench): the same (seed, offset) gives the same mask,
outputs and gradients bit for bit in both saved modes; drop fractions fall within binomial bounds;
odd sizes, non-contiguous inputs, thread counts, dtypes, torch.compile and checkpointing.
"""

from __future__ import annotations

import json
import math
import re
import threading

import numba
import pytest
import torch

from dropkit import functional as DF
from dropkit import kernels, ops, rng
from dropkit.lab.cli import main
from dropkit.kernels import reference

SIZES = [0, 1, 2, 7, 8, 9, 2**11 - 1, 2**11, 2**11 + 1, 2**13 + 1, 2**15 - 1]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BIG_SEED = 0x7ACE_D00D_1234_5678  # both key words non-zero


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor, so that -0.0 != 0.0 and NaN payloads count."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(bits_of(actual.contiguous()), bits_of(expected.contiguous()))


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> float:
    """Half-width of a 5-sigma band for a Binomial(n, p) count (false alarm ~ 6e-7 per check)."""
    return sigmas * math.sqrt(n * p * (1 - p))


def sample(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --- kernels == reference, bit for bit ----------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 5, 2**32 - 3])  # the last one carries into the counter's high word
@pytest.mark.parametrize("seed", [0, BIG_SEED])
def test_keep_mask_kernel_reproduces_the_uniform_stream_at_every_width(seed, offset):
    for n in SIZES:
        for p in (0.0, 0.1, 0.5, 0.25, 0.125, 1 / 256, 0.999, 1.0):  # widths 1, 16, 1, 2, 4, 8, 16, 1
            expected = reference.keep_mask(seed, p, (n,), offset)
            assert torch.equal(kernels.keep_mask(seed, p, (n,), offset), expected), (n, p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", reference.KINDS)
def test_masked_kernels_equal_reference_in_both_modes(dtype, kind):
    for n in SIZES:
        x = sample(n, dtype, seed=n)
        for p in (0.1, 0.5, 0.77, 0.25, 0.125, 1 / 256):  # every draw width
            keep = reference.keep_mask(BIG_SEED, p, (n,))
            expected = reference.masked(x, keep, kind, p)
            out, bits = kernels.masked(x, BIG_SEED, p, kind, save_bits=True)
            assert_bitwise_equal(out, expected)
            assert torch.equal(bits, reference.pack_bits(keep)), (n, p)
            assert torch.equal(reference.unpack_bits(bits, (n,)), keep)
            assert_bitwise_equal(kernels.masked_from_bits(x, bits, p, kind), expected)
            out_seed_only, no_bits = kernels.masked(x, BIG_SEED, p, kind)
            assert no_bits is None
            assert_bitwise_equal(out_seed_only, expected)


def test_kernel_offset_selects_the_same_stream_further_on():
    x = sample(4096, torch.float32)
    out, _ = kernels.masked(x, 9, 0.5, "dropout", offset=2**32 - 7)
    assert_bitwise_equal(out, reference.masked_from_seed(x, 9, 0.5, "dropout", offset=2**32 - 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_special_values_follow_the_reference(dtype):
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 3e38, -1e-40] * 300).to(dtype)
    for kind in reference.KINDS:
        out, _ = kernels.masked(x, 3, 0.5, kind)
        expected = reference.masked(x, reference.keep_mask(3, 0.5, tuple(x.shape)), kind, 0.5)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        numbers = ~expected.isnan()  # torch itself writes NaN as 0x7FC0 or 0xFFFF depending on the path
        assert torch.equal(torch.signbit(out[numbers]), torch.signbit(expected[numbers]))


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Distance from |t| to the next representable value of its dtype (float64 result)."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_kernel_within_rounding_of_reference(dtype):
    """The kernel's Box-Muller uses the C library's float64 log/cos/sqrt and the reference torch's:
    a few float64 ulps apart. So a result may differ by one ulp of the output dtype where that
    tiny difference crosses a rounding boundary, and (for float64 output) by the float64 error of
    z itself: |x| * sigma * |dz| with |dz| <= 8 * 2**-52 * (1 + |z|) (|z| < 7 from 32-bit uniforms)."""
    p = 0.3
    sigma = math.sqrt(p / (1 - p))
    for n in (1, 2, 3, 2049, 2**15 + 1):
        x = sample(n, dtype, seed=n)
        out = kernels.gaussian(x, BIG_SEED, p)
        expected = reference.gaussian(x, BIG_SEED, p)
        z = rng.normal(BIG_SEED, 0, n)
        tolerance = ulp(expected) + x.double().abs() * sigma * 8 * 2.0**-52 * (1 + z.abs())
        assert bool(((out.double() - expected.double()).abs() <= tolerance).all()), n
    x = sample(2**15, torch.float32)
    # float32 agrees exactly almost everywhere: a rounding boundary is crossed ~1e-8 of the time
    assert int((kernels.gaussian(x, 5, p) != reference.gaussian(x, 5, p)).sum()) <= 2


# --- statistics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.25, 0.125])  # draw widths 16, 1, 16, 2, 4
@pytest.mark.parametrize("seed", [1, 2, BIG_SEED])
def test_drop_fraction_within_binomial_bounds_in_every_lane(p, seed):
    n = 2**20
    keep = kernels.keep_mask(seed, p, (n,))
    q = rng.threshold(p) / rng.THRESHOLD_SCALE
    assert abs(int((~keep).sum()) - n * q) <= binomial_bound(n, q)
    # each of the elements served by one Philox call (its lanes: 8 of 16 bits, ..., 128 of 1 bit)
    # drops at the same rate
    lanes = rng.BITS_PER_COUNTER // rng.keep_threshold(p)[0]
    for lane in range(lanes):
        dropped = int((~keep[lane::lanes]).sum())
        assert abs(dropped - n / lanes * q) <= binomial_bound(n // lanes, q)
    # neighbours are independent: both dropped with probability q**2
    both = int((~keep[:-1] & ~keep[1:]).sum())
    assert abs(both - (n - 1) * q * q) <= binomial_bound(n - 1, q * q) * 2  # x2: overlapping pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eight_bit_rates_match_the_reference_and_drop_at_the_rounded_rate(dtype):
    previous = rng.set_rate_bits(8)
    try:
        x = torch.randn(2**16 + 3).to(dtype)
        out, bits = kernels.masked(x, BIG_SEED, 0.1, "dropout", save_bits=True)
        keep = reference.keep_mask(BIG_SEED, 0.1, tuple(x.shape))
        assert torch.equal(out, reference.masked(x, keep, "dropout", 0.1))
        assert torch.equal(bits, reference.pack_bits(keep))
        n, q = 2**20, 26 / 256
        dropped = int((~kernels.keep_mask(3, 0.1, (n,))).sum())
        assert abs(dropped - n * q) <= binomial_bound(n, q)  # 0.1016: 5 sigma is 0.0015, so 0.1 would fail
    finally:
        rng.set_rate_bits(previous)


def test_bit_mask_popcount_matches_the_drop_count():
    n = 10_001
    out, bits = kernels.masked(torch.ones(n), 4, 0.3, "dropout", save_bits=True)
    popcount = sum(bin(b).count("1") for b in bits.tolist())
    assert popcount == int((out != 0).sum())


# --- layouts, threads ------------------------------------------------------------------------------

def test_non_contiguous_inputs_use_the_logical_order():
    base = sample(6 * 35 * 9, torch.float32).reshape(6, 35, 9)
    for view in (base.transpose(0, 2), base[:, ::2], base.expand(2, 6, 35, 9)[1]):
        for kind in reference.KINDS:
            out, bits = kernels.masked(view, 8, 0.4, kind, save_bits=True)
            assert out.is_contiguous()
            assert_bitwise_equal(out, kernels.masked(view.contiguous(), 8, 0.4, kind)[0])
            assert_bitwise_equal(kernels.masked_from_bits(view, bits, 0.4, kind), out)
        assert_bitwise_equal(kernels.gaussian(view, 8, 0.4), kernels.gaussian(view.contiguous(), 8, 0.4))


def test_one_and_two_threads_give_identical_results(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_ELEMENTS_PER_THREAD", 1)  # split even this small input
    x = sample(2**16 + 3, torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, bits = kernels.masked(x, 12, 0.5, "alpha", save_bits=True)
            results.append((out, bits, kernels.gaussian(x, 12, 0.5), kernels.keep_mask(12, 0.5, (999, 7))))
            assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)
    first, second = results
    for one, two in zip(first[:3:2], second[:3:2]):
        assert_bitwise_equal(one, two)
    assert torch.equal(first[1], second[1]) and torch.equal(first[3], second[3])


def test_numba_team_size_is_set_only_when_it_changes(monkeypatch):
    calls = []
    monkeypatch.setattr(numba, "set_num_threads", calls.append)
    monkeypatch.setattr(kernels, "_numba_threads", threading.local())  # a fresh per-thread record
    for count in (2, 2, 1, 1, 2):
        kernels._set_numba_threads(count)
    assert calls == [2, 1, 2]


def test_the_layer_sized_activations_of_the_step_benchmark_use_both_threads(monkeypatch):
    counts = []
    monkeypatch.setattr(kernels, "_set_numba_threads", counts.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    kernels.masked(torch.ones(256, 1024), 1, 0.5, "relu_dropout")
    kernels.masked(torch.ones(2**17 - 1), 1, 0.5, "dropout")
    assert counts == [min(2, numba.config.NUMBA_NUM_THREADS), 1]


# --- the custom ops: autograd, saved state, compile, checkpoint -------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("saved", ops.SAVED_MODES)
@pytest.mark.parametrize("op, kind", [(ops.dropout, "dropout"), (ops.alpha_dropout, "alpha")])
def test_op_outputs_and_gradients_equal_reference(op, kind, saved, dtype):
    p, seed = 0.35, torch.tensor(BIG_SEED)
    x = sample(3 * 1001, dtype).reshape(3, 1001).requires_grad_()
    grad = sample(3 * 1001, dtype, seed=1).reshape(3, 1001)
    y = op(x, p, seed, tuple(x.shape), saved=saved)
    y.backward(grad)
    keep = reference.keep_mask(BIG_SEED, p, tuple(x.shape))
    assert_bitwise_equal(y, reference.masked(x.detach(), keep, kind, p))
    grad_kind = "dropout" if kind == "dropout" else "alpha_grad"
    assert_bitwise_equal(x.grad, reference.masked(grad, keep, grad_kind, p))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_dropout_grad_kernel_equals_reference(dtype):
    """Also with the rate as a 0-dim tensor, as a compiled graph passes it."""
    rate = torch.tensor(0.35, dtype=torch.float64)
    for n in SIZES:
        out = kernels.masked(sample(n, dtype, seed=n), BIG_SEED, 0.35, "relu_dropout")[0]
        grad = sample(n, dtype, seed=n + 1)
        expected = reference.relu_dropout_grad(grad, out, 0.35)
        assert_bitwise_equal(kernels.relu_dropout_grad(grad, out, 0.35), expected)
        assert_bitwise_equal(kernels.relu_dropout_grad(grad, out, rate), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_relu_dropout_equals_relu_then_dropout_with_the_same_mask(dtype):
    """Fused or not, the same values and gradients: out = kept ? relu(x) / (1-p) : 0, and the
    gradient is the dropout of the gradient, cut where the input was not positive."""
    p, seed = 0.35, torch.tensor(BIG_SEED)
    x = sample(3 * 1001, dtype).reshape(3, 1001)
    x[0, :10] = 0.0  # ReLU's kink: zero input, zero gradient, in both
    x.requires_grad_()
    grad = sample(3 * 1001, dtype, seed=1).reshape(3, 1001)
    y = ops.relu_dropout(x, p, seed)
    y.backward(grad)
    fused_grad = x.grad
    x.grad = None
    y_pair = ops.dropout(torch.relu(x), p, seed, tuple(x.shape))
    y_pair.backward(grad)
    assert_bitwise_equal(y, y_pair)
    assert_bitwise_equal(fused_grad, x.grad)


def test_relu_dropout_eager_path_equals_the_custom_ops_and_supports_double_backward():
    p, seed = 0.35, torch.tensor(BIG_SEED)
    x = sample(4099, torch.float64).requires_grad_()
    grad = sample(4099, torch.float64, seed=1).requires_grad_()
    y = ops.relu_dropout(x, p, seed)
    assert_bitwise_equal(y, ops._relu_dropout(x.detach(), seed, p))
    (gx,) = torch.autograd.grad(y, x, grad, create_graph=True)
    assert_bitwise_equal(gx, kernels.relu_dropout_grad(grad.detach(), y.detach(), p))
    (ggrad,) = torch.autograd.grad(gx.sum(), grad)  # linear in grad: the same cut mask again
    assert_bitwise_equal(ggrad, kernels.relu_dropout_grad(torch.ones(4099, dtype=torch.float64), y.detach(), p))
    assert torch.autograd.gradgradcheck(lambda t: ops._relu_dropout(t, seed, p), (x.detach()[:50].requires_grad_(),))


def test_relu_dropout_keeps_only_its_output_which_the_next_layer_keeps_too():
    torch.manual_seed(0)
    linear_in, linear_out = torch.nn.Linear(64, 512), torch.nn.Linear(512, 8)
    x = torch.randn(32, 64)
    activation = 32 * 512 * 4
    pair = saved_storage_bytes(lambda: linear_out(ops.dropout(torch.relu(linear_in(x)), 0.5, torch.tensor(1),
                                                              (32, 512))))
    fused = saved_storage_bytes(lambda: linear_out(ops.relu_dropout(linear_in(x), 0.5, torch.tensor(1))))
    assert pair - fused == activation  # ReLU's saved output is gone; dropout kept nothing either way
    assert saved_storage_bytes(lambda: ops._relu_dropout(x.requires_grad_(), torch.tensor(1), 0.5)) == 32 * 64 * 4


def test_gaussian_op_gradient_is_the_same_noise():
    x = sample(5000, torch.float32).requires_grad_()
    y = ops.gaussian_dropout(x, 0.25, torch.tensor(7), (5000,))
    y.backward(torch.ones_like(y))
    assert_bitwise_equal(x.grad, kernels.gaussian(torch.ones(5000), 7, 0.25))
    with pytest.raises(ValueError, match="saved='seed'"):
        ops.gaussian_dropout(x, 0.25, torch.tensor(7), (5000,), saved="bits")


def saved_storage_bytes(fn) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_backward_keeps_only_the_seed_or_one_bit_per_element():
    n = 10_000
    x = torch.randn(n, requires_grad=True)
    seed = torch.tensor(3)
    assert saved_storage_bytes(lambda: ops.dropout(x, 0.5, seed, (n,))) == 0  # the seed is a Python int
    assert saved_storage_bytes(lambda: ops.dropout(x, 0.5, seed, (n,), saved="bits")) == n // 8
    assert saved_storage_bytes(lambda: ops.alpha_dropout(x, 0.5, seed, (n,), saved="bits")) == n // 8
    with pytest.raises(ValueError, match="saved must be one of"):
        ops.dropout(x, 0.5, seed, (n,), saved="mask")


def test_custom_ops_keep_only_the_8_byte_seed_or_one_bit_per_element():
    """What a compiled graph keeps: the custom ops run there instead of the eager Function."""
    n = 10_000
    x = torch.randn(n, requires_grad=True)
    seed = torch.tensor(3)
    assert saved_storage_bytes(lambda: ops._masked(x, seed, 0.5, "dropout")) == 8
    assert saved_storage_bytes(lambda: ops._masked_save_bits(x, seed, 0.5, "dropout")) == n // 8


@pytest.mark.parametrize("saved", ops.SAVED_MODES)
def test_eager_path_equals_the_custom_ops_and_supports_double_backward(saved):
    p, seed = 0.35, torch.tensor(BIG_SEED)
    x = sample(4099, torch.float64).requires_grad_()
    grad = sample(4099, torch.float64, seed=1).requires_grad_()
    y = ops.dropout(x, p, seed, (4099,), saved=saved)
    custom = ops._masked(x.detach(), seed, p, "dropout")
    assert_bitwise_equal(y, custom)
    (gx,) = torch.autograd.grad(y, x, grad, create_graph=True)
    assert_bitwise_equal(gx, ops._masked(grad.detach(), seed, p, "dropout"))
    (ggrad,) = torch.autograd.grad(gx.sum(), grad)  # d(grad * mask / (1-p)) / d grad = the mask again
    assert_bitwise_equal(ggrad, ops._masked(torch.ones(4099, dtype=torch.float64), seed, p, "dropout"))


class _Net(torch.nn.Module):
    def __init__(self, saved: str = "seed") -> None:
        super().__init__()
        self.inp = torch.nn.Linear(12, 32)
        self.out = torch.nn.Linear(32, 1)
        self.saved = saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = ops.dropout(h, 0.5, rng.draw_seed(), tuple(h.shape), saved=self.saved)
        h = DF.relu_dropout(h - 0.1, 0.25, training=True)
        h = DF.alpha_dropout(h, 0.2, training=True) + DF.gaussian_dropout(h, 0.1, training=True)
        h = DF.dropout1d(h.reshape(4, 8, 4), 0.3, training=True).reshape(4, 32)
        return self.out(h).sum()


@pytest.mark.parametrize("saved", ops.SAVED_MODES)
def test_torch_compile_fullgraph_has_no_graph_breaks_and_matches_eager(saved):
    torch.manual_seed(0)
    net = _Net(saved)
    x = torch.randn(4, 12)
    assert torch._dynamo.explain(net)(x).graph_break_count == 0

    def grads(model) -> list[torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(5)
        model(x).backward()
        return [p.grad.clone() for p in net.parameters()]

    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    for eager, traced in zip(grads(net), grads(compiled)):
        assert torch.equal(eager, traced)


@pytest.mark.parametrize("saved", ops.SAVED_MODES)
def test_checkpoint_recomputation_reproduces_mask_and_gradients(saved):
    torch.manual_seed(0)
    net = _Net(saved)
    x = torch.randn(4, 12)

    def grads(use_checkpoint: bool) -> list[torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(1)
        out = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False) if use_checkpoint else net(x)
        out.backward()
        return [p.grad.clone() for p in net.parameters()]

    for plain, recomputed in zip(grads(False), grads(True)):
        assert torch.equal(plain, recomputed)


def test_a_parallel_kernel_leaves_torchs_thread_count_alone():
    """numba's OpenMP pool shares the runtime with torch; starting it must not undo set_num_threads."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        DF.dropout(torch.randn(1 << 21), 0.5, training=True, seed=0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bench_kernels_command_prints_json_at_the_rate_resolution_asked(capsys):
    try:
        assert main(["bench", "kernels", "--sizes", "10", "--dtypes", "float32", "--p", "0.1", "--repeats", "1",
                     "--rate-bits", "8"]) == 0
    finally:
        rng.set_rate_bits(16)
    result = json.loads(capsys.readouterr().out)
    assert result["environment"]["rate_bits"] == 8
    assert result["environment"]["llvm_cpu"]  # e.g. znver5: "model name" may name only the vendor
    assert [(case["dtype"], case["numel"], case["p"]) for case in result["cases"]] == [("float32", 1024, 0.1)]
    case = result["cases"][0]
    assert "copy" in case["ms"]
    assert set(case["fwd_over_copy"]) == set(case["fwd_bwd_over_copy"]) == {"torch", "dropkit_seed", "dropkit_bits"}


@pytest.mark.parametrize(("argv", "message"), [
    (["kernels", "--p", "0"], r"argument --p: must be in \(0, 1\), got 0"),
    (["step", "--p", "1"], r"argument --p: must be in \(0, 1\), got 1"),
    (["step", "--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
])
def test_bench_commands_name_a_bad_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
