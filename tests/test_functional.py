"""Semantics of the dropout family (dropkit.functional): each rule of the documented behaviour, one test or more."""

from __future__ import annotations

import math

import pytest
import torch

import dropkit
from dropkit import functional as DF
from dropkit import rng

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MASK_OPS = [DF.dropout, DF.alpha_dropout, DF.gaussian_dropout]


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> float:
    """Half-width of a 5-sigma band for a Binomial(n, p) count (false alarm ~ 6e-7 per check)."""
    return sigmas * math.sqrt(n * p * (1 - p))


def quantised(p: float) -> float:
    return rng.threshold(p) / rng.THRESHOLD_SCALE


# --- the trivial cases -------------------------------------------------------------------------

@pytest.mark.parametrize("op", MASK_OPS)
def test_eval_and_p0_return_the_input_itself(op):
    x = torch.randn(5, 7)
    assert op(x, 0.5, training=False) is x
    assert op(x, 0.0, training=True) is x


def test_training_is_a_required_keyword():
    with pytest.raises(TypeError):
        DF.dropout(torch.ones(3), 0.5)  # forgetting training must not leave dropout silently on


def _drop_block_1(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return DF.drop_block2d(x, p, 1, training=training)


@pytest.mark.parametrize("op", MASK_OPS + [DF.dropout2d, DF.locked_dropout, DF.drop_path, _drop_block_1])
def test_p1_gives_zeros_and_zero_gradients_even_for_inf(op):
    x = torch.tensor([[[[1.0, float("inf")], [-float("inf"), 3.0]]]], requires_grad=True)
    y = op(x, 1.0, training=True)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("op", MASK_OPS + [DF.relu_dropout, DF.dropout2d, DF.locked_dropout, DF.drop_path,
                                _drop_block_1])
def test_empty_input_gives_a_new_empty_output_with_a_gradient_path(op):
    x = torch.ones(0, 2, 3, 3, requires_grad=True)
    y = op(x, 0.5, training=True)
    assert y.shape == x.shape and y is not x
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# --- statistics and exact values ----------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fraction_dropped_matches_p_within_binomial_bounds(p, seed):
    n = 200_000
    y = DF.dropout(torch.ones(n), p, training=True, seed=seed)
    dropped = int((y == 0).sum())
    assert abs(dropped - n * quantised(p)) <= binomial_bound(n, quantised(p))


def test_threshold_quantisation_is_within_half_a_step():
    for p in [1e-6, 0.1, 1 / 3, 0.5, 0.999]:
        assert abs(quantised(p) - p) <= 0.5 / rng.THRESHOLD_SCALE
    assert rng.threshold(0.0) == 0 and rng.threshold(1.0) == rng.THRESHOLD_SCALE


def test_keras_style_ones_keep_mean_one_and_max_two():
    y = DF.dropout(torch.ones(20, 500), 0.5, training=True, seed=7)
    assert float(y.max()) == 2.0
    # mean of 10,000 scaled Bernoulli(0.5) draws: sd = 1/sqrt(10000) = 0.01
    assert abs(float(y.mean()) - 1.0) <= 0.05


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_kept_values_are_exactly_x_over_keep_in_dtype(dtype, p):
    x = torch.randn(4096, dtype=torch.float64).to(dtype)
    x[x == 0] = 1.0
    y = DF.dropout(x, p, training=True, seed=3)
    assert y.dtype == dtype
    kept = y != 0
    assert torch.equal(y[kept], (x / (1 - p))[kept])
    assert 0 < int(kept.sum()) < x.numel()


@pytest.mark.parametrize("rate_bits", [16, 8])  # 8: the backward regenerates 8-bit draws
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gradient_is_grad_times_same_mask_over_keep(dtype, rate_bits):
    previous = rng.set_rate_bits(rate_bits)
    try:
        p = 0.3
        x = (torch.rand(64, 33, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
        y = DF.dropout(x, p, training=True, seed=11)
        g = torch.randn_like(y)
        y.backward(g)
    finally:
        rng.set_rate_bits(previous)
    mask = y.detach() != 0
    assert torch.equal(x.grad, torch.where(mask, g / (1 - p), 0.0).to(dtype))


@pytest.mark.parametrize("op", [DF.alpha_dropout, DF.gaussian_dropout])
def test_alpha_and_gaussian_gradients(op):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t, 0.3, training=True, seed=5), (x,))


def test_alpha_dropout_keeps_zero_mean_unit_variance():
    n = 400_000
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = DF.alpha_dropout(x, 0.2, training=True, seed=1)
    # for a statistic with variance ~1 over n draws the standard error is ~1/sqrt(n); take 6 se
    assert abs(float(y.mean())) <= 6 / math.sqrt(n)
    assert abs(float(y.var()) - 1.0) <= 6 * math.sqrt(2.0 / n) * 2  # var of sample var ~2/n (x2: mixture)


def test_gaussian_dropout_noise_has_mean_one_and_variance_p_over_keep():
    n, p = 400_000, 0.4
    y = DF.gaussian_dropout(torch.ones(n, dtype=torch.float64), p, training=True, seed=2)
    var = p / (1 - p)
    assert abs(float(y.mean()) - 1.0) <= 6 * math.sqrt(var / n)
    assert abs(float(y.var()) - var) <= 6 * var * math.sqrt(2.0 / n)


# --- masks shared along dimensions ------------------------------------------------------------------

def test_channel_dropout_shares_mask_over_spatial_dims():
    x = torch.ones(8, 16, 5, 6)
    y = DF.dropout2d(x, 0.5, training=True, seed=0)
    per_map = y.reshape(8, 16, -1)
    assert torch.equal(per_map.amin(-1), per_map.amax(-1))  # each map all-zero or all-2
    assert 0 < int((per_map[..., 0] == 0).sum()) < 8 * 16
    for op, shape in [(DF.dropout1d, (4, 6, 9)), (DF.dropout3d, (2, 5, 3, 4, 4)), (DF.dropout2d, (6, 5, 4))]:
        y = op(torch.ones(shape), 0.5, training=True, seed=1)
        channels = 1 if len(shape) == {DF.dropout1d: 2, DF.dropout2d: 3, DF.dropout3d: 4}[op] else 2
        flat = y.reshape(*shape[:channels], -1)
        assert torch.equal(flat.amin(-1), flat.amax(-1))


@pytest.mark.parametrize("batch_first", [False, True])
def test_locked_dropout_shares_mask_over_time(batch_first):
    x = torch.ones(7, 5, 12)
    y = DF.locked_dropout(x, 0.5, training=True, batch_first=batch_first, seed=3)
    time_dim = 1 if batch_first else 0
    assert torch.equal(y.amin(time_dim), y.amax(time_dim))
    assert 0 < int((y.select(time_dim, 0) == 0).sum()) < y.select(time_dim, 0).numel()


def test_drop_path_drops_whole_samples():
    y = DF.drop_path(torch.ones(64, 3, 4), 0.5, training=True, seed=4)
    flat = y.reshape(64, -1)
    assert torch.equal(flat.amin(1), flat.amax(1))
    assert set(flat[:, 0].tolist()) == {0.0, 2.0}
    unscaled = DF.drop_path(torch.ones(64, 3, 4), 0.5, training=True, seed=4, scale_by_keep=False)
    assert torch.equal(unscaled, y / 2)


def test_mask_shape_none_and_one_entries():
    y = DF.dropout(torch.ones(6, 10, 4), 0.5, training=True, mask_shape=(None, 1, None), seed=0)
    assert torch.equal(y.amin(1), y.amax(1))


def test_drop_block_drops_whole_squares_and_rescales():
    bs = 3
    x = torch.ones(2, 3, 12, 12)
    y = DF.drop_block2d(x, 0.2, bs, training=True, seed=9)
    dropped = (y == 0).float()
    assert 0 < int(dropped.sum()) < x.numel()
    # every dropped pixel lies in some fully dropped bs x bs square
    corners = (torch.nn.functional.avg_pool2d(dropped, bs, stride=1) == 1).float()
    padded = torch.nn.functional.pad(corners, (bs - 1,) * 4)
    full = torch.nn.functional.max_pool2d(padded, bs, stride=1)
    assert torch.equal(full * dropped, dropped)
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, x.numel() / kept.numel()))


# --- seeds --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", MASK_OPS)
def test_same_seed_same_mask_and_successive_calls_differ(op):
    x = torch.randn(1000)
    assert torch.equal(op(x, 0.5, training=True, seed=42), op(x, 0.5, training=True, seed=42))
    assert not torch.equal(op(x, 0.5, training=True), op(x, 0.5, training=True))


def test_manual_seed_makes_a_run_repeatable():
    def run():
        dropkit.manual_seed(123)
        net = torch.nn.Sequential(torch.nn.Linear(10, 20), dropkit.nn.Dropout(0.5), torch.nn.Linear(20, 1))
        return [net(torch.ones(4, 10)) for _ in range(3)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])


def test_generator_argument_drives_the_mask():
    x = torch.ones(500)
    a = DF.dropout(x, 0.5, training=True, generator=torch.Generator().manual_seed(1))
    b = DF.dropout(x, 0.5, training=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="seed or generator"):
        DF.dropout(x, 0.5, training=True, seed=1, generator=torch.Generator())


def test_derived_seeds_differ_per_stream_and_repeat():
    assert rng.derive_seed(0, 1) == rng.derive_seed(0, 1)
    assert len({rng.derive_seed(0, r) for r in range(8)}) == 8
    assert all(0 <= rng.derive_seed(5, r) <= rng.SEED_BOUND for r in range(8))


# --- shapes, layouts, dtypes ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (1,), (), (2, 3, 4, 5)])
def test_every_shape(shape):
    x = torch.ones(shape, requires_grad=True)
    y = DF.dropout(x, 0.5, training=True, seed=0)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous_and_channels_last_use_the_logical_mask():
    base = torch.randn(4, 6, 5, 3)
    seed = 17
    expected = DF.dropout(base.contiguous(), 0.4, training=True, seed=seed)
    channels_last = base.to(memory_format=torch.channels_last)
    assert torch.equal(DF.dropout(channels_last, 0.4, training=True, seed=seed), expected)
    transposed = base.transpose(0, 3).contiguous().transpose(0, 3)
    assert not transposed.is_contiguous()
    assert torch.equal(DF.dropout(transposed, 0.4, training=True, seed=seed), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", MASK_OPS + [DF.dropout2d, DF.drop_path])
def test_every_float_dtype(op, dtype):
    x = torch.randn(4, 3, 6, 6).to(dtype).requires_grad_()
    y = op(x, 0.25, training=True, seed=0)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_p_is_named_with_its_range(p):
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\]"):
        DF.dropout(torch.ones(3), p, training=True)


def test_p_of_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="p must be a float"):
        DF.dropout(torch.ones(3), "0.5", training=True)


def test_non_floating_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        DF.dropout(torch.ones(3, dtype=torch.int64), 0.5, training=True)


def test_mask_shape_that_does_not_broadcast_is_rejected():
    with pytest.raises(ValueError, match=r"mask_shape\[1\] must be 1 or the input's size 4"):
        DF.dropout(torch.ones(2, 4), 0.5, training=True, mask_shape=(2, 3))
    with pytest.raises(ValueError, match="one entry per input dimension"):
        DF.dropout(torch.ones(2, 4), 0.5, training=True, mask_shape=(2,))


def test_block_larger_than_feature_map_is_clipped_to_it():
    x = torch.ones(64, 1, 5, 8)
    y = DF.drop_block2d(x, 0.3, 6, training=True, seed=3)
    # a 5x6 block fits at 3 places per row: every dropped pixel lies in one fully dropped 5x6 block
    dropped = (y == 0).float()
    assert 0 < int(dropped.sum()) < x.numel()
    corners = (torch.nn.functional.avg_pool2d(dropped, (5, 6), stride=1) == 1).float()
    full = torch.nn.functional.max_pool2d(torch.nn.functional.pad(corners, (5, 5, 4, 4)), (5, 6), stride=1)
    assert torch.equal(full * dropped, dropped)
    assert DF.drop_block2d(x, 0.3, 50, training=False) is x


def test_bad_seed_is_rejected():
    with pytest.raises(ValueError, match="seed must be an int"):
        DF.dropout(torch.ones(3), 0.5, training=True, seed=-1)


def test_non_tensor_input_is_rejected():
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        DF.dropout([1.0, 2.0], 0.5, training=True)


@pytest.mark.parametrize(("op", "x", "message"), [
    (DF.feature_alpha_dropout, torch.ones(4), r"feature_alpha_dropout expects .*at least 2 dims .*\[4\]"),
    (DF.locked_dropout, torch.ones(4), r"locked_dropout expects .*at least 2 dims .*\[4\]"),
    (DF.drop_path, torch.tensor(1.0), "drop_path expects an input with a batch dimension"),
    (_drop_block_1, torch.ones(1, 5, 5), r"drop_block2d expects a 4-D \(N, C, H, W\) input, got shape \[1, 5, 5\]"),
])
def test_ops_name_the_input_rank_they_need(op, x, message):
    with pytest.raises(ValueError, match=message):
        op(x, 0.5, training=True)


def test_channel_dropout_rejects_wrong_rank():
    with pytest.raises(ValueError, match="dropout2d expects"):
        DF.dropout2d(torch.ones(3, 4), 0.5, training=True)


# --- recomputation ---------------------------------------------------------------------------------

def test_checkpoint_recomputation_reproduces_the_mask():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), dropkit.nn.Dropout(0.5), torch.nn.Linear(64, 1))
    x = torch.randn(8, 16)

    def grads(use_checkpoint: bool):
        net.zero_grad()
        torch.manual_seed(1)
        out = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False) if use_checkpoint else net(x)
        out.sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    for plain, recomputed in zip(grads(False), grads(True)):
        assert torch.equal(plain, recomputed)
