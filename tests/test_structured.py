"""dropkit.structured: kept-slice training equals dense dropout with the same masks; kept sets are exact and uniform.

Tolerances. The structured path and the dense reference compute the same sums of the same
products, but over different index sets (kept units only, against all units with exact zeros for
the dropped ones) and in different BLAS blockings, so they differ only by rounding. The gradient
comparisons run in float64, where each sum of n terms is off by at most about n * 2**-53 of the sum
of magnitudes (n <= 64 here, so ~1e-14 relative); ``rtol=atol=1e-10`` leaves a margin of 10**4
over that and still fails on any real mismatch (a wrong mask or scale changes values by O(1)).
Pure copies (gathers, eval outputs through identical ops) are compared bit for bit.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import dropkit
from dropkit import nn as dnn
from dropkit import structured as S
from dropkit.lab.cli import main

TOL = {"rtol": 1e-10, "atol": 1e-10}


def dense_reference(x, layers, kept, activation, groups):
    """The same network as ordinary dense inverted dropout, with each group's mask from ``kept``."""
    group_of = torch.arange(x.shape[0]) // (x.shape[0] // groups)
    h = x
    for i, layer in enumerate(layers):
        if kept[i] is not None:
            h = h * kept[i].mask()[group_of] * kept[i].scale
        h = layer(h)
        if i + 1 < len(layers):
            h = activation(h)
    return h


def grads(module, x):
    return [p.grad.clone() for p in module.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize(
    ("block_size", "p", "p_input", "groups", "activation"),
    [
        (1, [0.5, 0.5], 0.0, 4, nn.ReLU()),
        (1, [0.3, 0.6], 0.2, 2, nn.Tanh()),
        (4, [0.5, 0.25], 0.2, 8, nn.GELU()),
        (1, [0.5, 0.0], 0.0, 1, nn.ReLU()),  # a hidden layer without dropout
        (2, [0.0, 0.5], 0.0, 16, nn.ReLU()),  # one group per example
    ],
)
def test_outputs_and_gradients_equal_dense_model_with_same_masks(block_size, p, p_input, groups, activation):
    torch.manual_seed(0)
    net = S.StructuredLinearStack([24, 16, 12, 5], p, p_input=p_input, activation=activation,
                                  groups=groups, block_size=block_size).double()
    x = torch.randn(16, 24, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(16, 5, dtype=torch.float64)
    kept = net.sample(groups)
    out = S.structured_linear_stack(x, net.layers, kept, net.activation, groups)
    (out * upstream).sum().backward()
    got = grads(net, x)
    net.zero_grad()
    x.grad = None
    ref = dense_reference(x, net.layers, kept, net.activation, groups)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(got, grads(net, x)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("weight_grad", S.WEIGHT_GRADS)
@pytest.mark.parametrize("p_input", [0.0, 0.3])
def test_weight_gradients_equal_dense_and_rows_no_group_kept_are_zero(weight_grad, p_input):
    torch.manual_seed(1)
    net = S.StructuredLinearStack([10, 32, 32, 3], 0.75, p_input=p_input, groups=2).double()
    x = torch.randn(8, 10, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(8, 3, dtype=torch.float64)
    kept = net.sample(2)
    (S.structured_linear_stack(x, net.layers, kept, net.activation, 2, weight_grad) * upstream).sum().backward()
    got = grads(net, x)
    net.zero_grad()
    x.grad = None
    (dense_reference(x, net.layers, kept, net.activation, 2) * upstream).sum().backward()
    for a, b in zip(got, grads(net, x)):
        torch.testing.assert_close(a, b, **TOL)
    never_kept = ~kept[1].mask().any(0)
    assert never_kept.any()
    assert torch.equal(got[0][never_kept], torch.zeros_like(got[0][never_kept]))  # layer 0 weight rows
    assert torch.equal(got[2][:, never_kept], torch.zeros_like(got[2][:, never_kept]))  # layer 1 weight cols


def test_dense_weight_gradient_is_chosen_only_for_small_groups():
    # p = 0.5 on a 1024 x 1024 layer: the dense product pays below 80 / 3 = 26.7 examples per group
    assert S.dense_weight_grad_pays(256, 16, 512, 512, 1024, 1024)  # 16 per group
    assert not S.dense_weight_grad_pays(256, 8, 512, 512, 1024, 1024)  # 32 per group
    assert not S.dense_weight_grad_pays(256, 1, 512, 512, 1024, 1024)  # one mask per batch
    # p = 0.3 (717 of 1024 kept): below 80 / 1.04 = 77 examples per group
    assert S.dense_weight_grad_pays(256, 4, 717, 717, 1024, 1024)  # 64 per group
    assert not S.dense_weight_grad_pays(256, 2, 717, 717, 1024, 1024)  # 128 per group
    net = S.StructuredLinearStack([6, 8, 4], 0.5, groups=2, weight_grad="dense")
    assert "weight_grad='dense'" in repr(net)
    with pytest.raises(ValueError, match="weight_grad must be one of auto, grouped, dense"):
        S.StructuredLinearStack([6, 8, 4], 0.5, weight_grad="sparse")


@pytest.mark.parametrize("weight_grad", ["grouped", "dense"])
def test_workspace_buffers_are_reused_only_once_free(weight_grad):
    torch.manual_seed(2)
    net = S.StructuredLinearStack([10, 32, 32, 3], 0.5, p_input=0.2, groups=2).double()
    ws = S.Workspace()
    xs = [torch.randn(8, 10, dtype=torch.float64) for _ in range(3)]
    kept = [net.sample(2) for _ in xs]

    def loss(i, workspace):
        return S.structured_linear_stack(xs[i], net.layers, kept[i], net.activation, 2, weight_grad, workspace).sum()

    def reference_grads(indices):
        net.zero_grad()
        sum(loss(i, None) for i in indices).backward()
        return [p.grad.clone() for p in net.parameters()]

    # two forwards before one backward: the second must not overwrite the first's saved slices
    want = reference_grads([0, 1])
    net.zero_grad()
    (loss(0, ws) + loss(1, ws)).backward()
    for a, b in zip([p.grad for p in net.parameters()], want):
        torch.testing.assert_close(a, b, **TOL)
    # one step after another: the same memory again, the same gradients as fresh buffers
    net.zero_grad()
    loss(2, ws).backward()
    pointers = {key: held[0].data_ptr() for key, held in ws._buffers.items()}
    net.zero_grad()
    loss(2, ws).backward()
    assert {key: held[0].data_ptr() for key, held in ws._buffers.items()} == pointers
    for a, b in zip([p.grad for p in net.parameters()], reference_grads([2])):
        torch.testing.assert_close(a, b, **TOL)
    # a retained graph keeps its slices: a new forward in between gets other buffers
    want = [2 * a + b for a, b in zip(reference_grads([0]), reference_grads([1]))]
    net.zero_grad()
    first = loss(0, ws)
    first.backward(retain_graph=True)
    loss(1, ws).backward()
    first.backward()
    for a, b in zip([p.grad for p in net.parameters()], want):
        torch.testing.assert_close(a, b, **TOL)


def test_eval_mode_lets_go_of_the_workspace():
    net = S.StructuredLinearStack([6, 8, 4], 0.5, groups=2)
    net(torch.randn(4, 6)).sum().backward()
    assert net.workspace._buffers
    net.eval()
    assert not net.workspace._buffers


@pytest.mark.parametrize("batch", [10, 3])
def test_batch_not_divisible_by_groups_is_padded_without_changing_gradients(batch):
    net = S.StructuredLinearStack([6, 8, 4], 0.5, groups=4, seed=7).double()
    twin = S.StructuredLinearStack([6, 8, 4], 0.5, groups=4, seed=7).double()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(batch, 6, dtype=torch.float64)
    upstream = torch.randn(batch, 4, dtype=torch.float64)
    out = net(x)
    assert out.shape == (batch, 4)
    (out * upstream).sum().backward()
    groups = min(4, batch)
    padded = math.ceil(batch / groups) * groups
    kept = twin.sample(groups)  # the draw net made: same seed, fresh generator
    xp = torch.cat([x, x.new_zeros(padded - batch, 6)])
    ref = dense_reference(xp, twin.layers, kept, twin.activation, groups)[:batch]
    torch.testing.assert_close(out, ref, **TOL)
    (ref * upstream).sum().backward()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("run", [1, 3])
def test_compiled_kernels_equal_plain_torch_ops(dtype, run):
    torch.manual_seed(2)
    weight = torch.randn(20, 30, dtype=dtype)
    rows = torch.stack([torch.randperm(20)[:7].sort().values for _ in range(3)])
    cols = torch.stack([torch.randperm(10)[:4].sort().values * run for _ in range(3)])
    assert torch.equal(S.gather_kept(weight, rows, cols, run), S.gather_torch(weight, rows, cols, run))
    slices = torch.randn(3, 7, 4 * run, dtype=dtype)
    got = S.scatter_kept(slices, rows, cols, run, 1.5, 20, 30)
    # same sums in the same order; a fused multiply-add in one of them may move the last bit
    torch.testing.assert_close(got, S.scatter_torch(slices, rows, cols, run, 1.5, 20, 30))


def test_eval_outputs_equal_the_standard_dropout_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(32, 32), nn.ReLU(), dnn.Dropout(0.5), nn.Linear(32, 10))
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    expected = model(x)
    net = dropkit.convert(model, structured=True)
    assert not net.training
    assert torch.equal(net(x), expected)


@pytest.mark.parametrize(("width", "p", "block_size"), [(1024, 0.5, 1), (1024, 0.3, 1), (100, 0.37, 1),
                                                        (96, 0.5, 8), (7, 0.9, 1)])
def test_kept_sets_have_exactly_the_requested_size(width, p, block_size):
    kept = S.sample_kept(8, width, p, block_size, generator=torch.Generator().manual_seed(0))
    n_blocks = width // block_size
    expected = max(1, round((1 - p) * n_blocks)) * block_size
    units = kept.units()
    assert units.shape == (8, expected) and kept.count == expected
    assert torch.equal(kept.mask().sum(1), torch.full((8,), expected))  # distinct units
    assert torch.all(units[:, 1:] > units[:, :-1]) and units.min() >= 0 and units.max() < width
    assert kept.scale == width / expected


def chi_square_upper(dof: int, z: float) -> float:
    """Upper quantile of chi-square(dof) at standard-normal z (Wilson-Hilferty, accurate for dof >~ 30)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


@pytest.mark.parametrize(("width", "p", "block_size"), [(256, 0.5, 1), (200, 0.3, 1), (256, 0.5, 4)])
def test_kept_units_are_uniform_over_units(width, p, block_size):
    # Each draw keeps k of n blocks, so block j's count over N draws has variance N q (1-q) with
    # q = k/n, and the counts' covariance is N q (1-q) n/(n-1) (I - 11^T/n): rescaled by that
    # factor, the usual statistic is chi-square with n - 1 degrees of freedom.
    n = width // block_size
    draws = 4000 // 8
    kept = [S.sample_kept(8, width, p, block_size, generator=torch.Generator().manual_seed(s)) for s in range(draws)]
    counts = torch.cat([k.blocks for k in kept]).flatten().bincount(minlength=n).double()
    total = draws * 8
    q = kept[0].blocks.shape[1] / n
    stat = ((counts - total * q) ** 2).sum() / (total * q * (1 - q) * n / (n - 1))
    assert stat < chi_square_upper(n - 1, z=4.0)  # false alarm ~3e-5
    assert stat > n / 4  # and not suspiciously flat (e.g. a fixed rotation of the units)


def test_groups_draw_independent_kept_sets():
    # Two independent k-subsets of n share a hypergeometric number of units: mean k^2/n,
    # variance k (k/n) ((n-k)/n) ((n-k)/(n-1)). Identical or complementary masks give k or 0.
    n, k, groups, draws = 512, 256, 8, 100
    overlaps = []
    for s in range(draws):
        mask = S.sample_kept(groups, n, 0.5, generator=torch.Generator().manual_seed(s)).mask().double()
        gram = mask @ mask.T
        overlaps.append(gram[torch.triu_indices(groups, groups, 1).unbind()])
    overlaps = torch.cat(overlaps)
    mean, var = k * k / n, k * (k / n) * ((n - k) / n) * ((n - k) / (n - 1))
    assert abs(overlaps.mean().item() - mean) < 5 * math.sqrt(var / overlaps.numel())
    assert abs(overlaps.var().item() / var - 1) < 0.15  # pairs are not correlated by a shared draw


def test_manual_seed_repeats_runs_and_own_seed_repeats_sequence():
    x = torch.randn(32, 20)

    def run():
        dropkit.manual_seed(5)
        net = S.StructuredLinearStack([20, 64, 64, 4], 0.5, groups=4)
        return net(x), net(x)

    (a1, a2), (b1, b2) = run(), run()
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
    one = S.StructuredLinearStack([20, 64, 4], 0.5, seed=11)
    two = S.StructuredLinearStack([20, 64, 4], 0.5, seed=11)
    two.load_state_dict(one.state_dict())
    torch.manual_seed(0)
    first = one(x)
    torch.manual_seed(1)  # the global generator does not matter with a seed
    assert torch.equal(first, two(x))


def test_convert_structured_shares_weights_and_reads_rates():
    model = nn.Sequential(nn.Flatten(), dnn.Dropout(0.2), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    net = dropkit.convert(model, structured=True)
    assert isinstance(net, S.StructuredLinearStack)
    assert net.p_input == 0.2 and net.p == [0.5, 0.0] and net.flatten
    assert [l for l in net.layers] == [model[2], model[5], model[7]]  # the same modules
    for (name, p), q in zip(model.named_parameters(), net.parameters()):
        assert p is q and torch.equal(q, before[name])
    assert isinstance(net(torch.randn(4, 1, 8, 8)), torch.Tensor)


def test_convert_structured_replaces_stacks_inside_a_model_in_place():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))

        def forward(self, x):
            return self.head(x)

    model = Net()
    weight = model.head[0].weight
    assert dropkit.convert(model, structured=True) is model
    assert isinstance(model.head, S.StructuredLinearStack) and model.head.layers[0].weight is weight


@pytest.mark.parametrize(("model", "message"), [
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)), "elementwise activation"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.Dropout(0.5)), "elementwise activation"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "must match"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), dnn.Dropout(0.5, mask_shape=(1, None)), nn.Linear(4, 2)), "shares"),
    (nn.Sequential(nn.Conv2d(1, 1, 3)), "expected nn.Linear"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "must end with nn.Linear"),
])
def test_convert_structured_rejects_what_it_cannot_keep_exact(model, message):
    with pytest.raises(ValueError, match=message):
        dropkit.convert(model, structured=True)


def test_settings_are_validated():
    with pytest.raises(ValueError, match=r"sizes needs at least \[in, out\], got \[4\]"):
        S.StructuredLinearStack([4], 0.5)
    with pytest.raises(ValueError, match="layer widths do not chain"):
        S.StructuredLinearStack.from_linears([nn.Linear(4, 8), nn.Linear(6, 2)], 0.5)
    with pytest.raises(ValueError, match="groups must be >= 1, got 0"):
        S.sample_kept(0, 8, 0.5)
    with pytest.raises(ValueError, match=r"only Flatten\(1, -1\) can lead"):
        S.from_sequential(nn.Sequential(nn.Flatten(0), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="block_size"):
        S.StructuredLinearStack([4, 10, 2], 0.5, block_size=3)
    with pytest.raises(ValueError, match="keeps no block"):
        S.StructuredLinearStack([4, 3, 2], 0.9)
    with pytest.raises(ValueError, match="groups"):
        S.StructuredLinearStack([4, 8, 2], 0.5, groups=0)
    with pytest.raises(ValueError, match="hidden drop rates"):
        S.StructuredLinearStack([4, 8, 8, 2], [0.5])
    with pytest.raises(ValueError, match="p must be"):
        S.StructuredLinearStack([4, 8, 2], 1.5)


def test_the_functional_stack_checks_its_kept_sets_and_batch():
    layers = [nn.Linear(4, 8), nn.Linear(8, 2)]
    kept = [None, S.sample_kept(2, 8, 0.5)]
    with pytest.raises(ValueError, match=r"need one kept entry per layer \(2\), got 1"):
        S.structured_linear_stack(torch.ones(4, 4), layers, kept[:1], nn.ReLU(), 2)
    with pytest.raises(ValueError, match="batch 5 is not divisible by groups=2"):
        S.structured_linear_stack(torch.ones(5, 4), layers, kept, nn.ReLU(), 2)


def test_optimizers_see_ordinary_parameters():
    torch.manual_seed(4)
    net = S.StructuredLinearStack([8, 16, 2], 0.5, groups=2)
    assert all(type(p) is nn.Parameter for p in net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.1)
    before = net.layers[0].weight.detach().clone()
    net(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert torch.all(net.layers[0].weight != before)  # weight decay reaches rows no group kept, too


def test_a_training_step_leaves_torchs_thread_count_alone():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        S.StructuredLinearStack([8, 16, 16, 2], 0.5, groups=2)(torch.randn(4, 8)).sum().backward()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_torch_compile_eval_and_training():
    torch.manual_seed(6)
    net = S.StructuredLinearStack([12, 16, 16, 3], 0.5, groups=2, seed=3)
    compiled = torch.compile(net)
    x = torch.randn(8, 12)
    net.eval()
    torch.testing.assert_close(compiled(x), net(x))
    net.train()
    twin = S.StructuredLinearStack([12, 16, 16, 3], 0.5, groups=2, seed=3)
    twin.load_state_dict(net.state_dict())
    compiled(x).sum().backward()
    twin(x).sum().backward()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("command", [["bench", "structured"], ["bench-structured"]])
def test_bench_structured_prints_one_row_per_comparison(capsys, command):
    assert main(command + ["--widths", "16", "--batches", "8", "--p", "0.3", "0.5", "--groups", "1", "2",
                           "--repeats", "1", "--warmup", "0", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["environment"]["llvm_cpu"] and result["threads"] == 1
    assert [(row["width"], row["batch"], row["p"]) for row in result["results"]] == [(16, 8, 0.3), (16, 8, 0.5)]
    for row in result["results"]:  # each rate is its own comparison, with its own no-dropout baseline
        assert row["none_ms"] > 0
        kinds = [(v["kind"], v["p"], v.get("groups")) for v in row["variants"]]
        p = row["p"]
        assert kinds == [("torch", p, None), ("dropkit", p, None), ("structured", p, 1), ("structured", p, 2)]
        for variant in row["variants"]:
            assert variant["vs_none"] == pytest.approx(variant["ms"] / row["none_ms"], rel=0.01, abs=1e-3)


@pytest.mark.parametrize(("option", "message"), [
    (["--p", "1.0"], r"argument --p: must be in \(0, 1\), got 1.0"),
    (["--groups", "0"], "argument --groups: must be an integer >= 1, got 0"),
    (["--widths", "0"], "argument --widths: must be an integer >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
])
def test_bench_structured_names_a_bad_option(capsys, option, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "structured", *option])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
