"""Monte Carlo dropout: only dropout switches on, modes are restored, the uncertainty split holds,
every kind of dropout module samples, and batched sampling equals sequential sampling exactly."""

import math

import pytest
import torch
from torch import nn

import dropkit
from dropkit import mc
from dropkit import nn as dnn
from dropkit.concrete import ConcreteDropout
from dropkit.lab.models import lstm
from dropkit.structured import StructuredLinearStack

BIG = 10**12  # a memory budget that holds every pass in one forward


def _net(p: float) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), dnn.Dropout(p), nn.Linear(32, 3))


class _SeqFirstEncoder(nn.Module):
    """Batch-first outside, a sequence-first transformer inside (its dropouts see (S, N, E))."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.transpose(0, 1)).transpose(0, 1)


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "dropkit": (_net(0.5), (6,)),
        "torch": (nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)), (6,)),
        "channel": (nn.Sequential(nn.Conv2d(1, 4, 3), dnn.Dropout2d(0.3), nn.Flatten(), nn.Linear(4 * 36, 3)),
                    (1, 8, 8)),
        "structured": (StructuredLinearStack([6, 32, 32, 3], p=0.5, groups=2, seed=5), (6,)),
        "concrete": (nn.Sequential(nn.Linear(6, 32), nn.ReLU(),
                                   ConcreteDropout(32, nn.Linear(32, 3), init_p=0.3, weight_regularizer=1e-6,
                                                   dropout_regularizer=1e-5)), (6,)),
        "transformer": (nn.Sequential(nn.Linear(6, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2,
                                                                                  batch_first=True)), (5, 6)),
        "transformer_seq_first": (_SeqFirstEncoder(), (5, 8)),
        "lstm_locked_weight": (lstm(p=0.3, p_input=0.1, p_weight=0.3, hidden=8, layers=2), (28, 28)),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_batched_sampling_equals_sequential_and_passes_differ(name):
    model, shape = _models()[name]
    model.eval()
    x = torch.randn(6, *shape)
    sequential, seq_kept = _kept_patterns(model, lambda: mc.mc_samples(model, x, 5, seed=11, memory_budget=0), 6)
    batched, batch_kept = _kept_patterns(model, lambda: mc.mc_samples(model, x, 5, seed=11, memory_budget=BIG), 6)
    assert batched.shape == (5, *model(x).shape)
    # the same masks, bit for bit; the layers between them may round differently at another batch
    # size (BLAS), but a single differing mask would move the outputs by far more than 1e-5
    assert seq_kept.keys() == batch_kept.keys()
    for name in seq_kept:
        assert torch.equal(seq_kept[name], batch_kept[name]), name
    torch.testing.assert_close(sequential, batched, rtol=0, atol=1e-5)
    assert torch.equal(mc.mc_samples(model, x, samples=5, seed=11), batched)  # the default budget
    assert all(not torch.equal(batched[0], batched[t]) for t in range(1, 5))  # dropout really is on
    assert not model.training and all(not m.training for m in model.modules())


def _kept_patterns(model: nn.Module, run, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``run()`` and, per torch or dropkit leaf dropout module, which outputs were non-zero over
    all its calls, pass after pass (``batch`` rows a pass), batched or not."""
    seen: dict[str, list[torch.Tensor]] = {}
    leaves = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Dropout, nn.Dropout2d, dnn.Dropout,
                                                                        dnn.Dropout2d, dnn.LockedDropout))]
    rows = {}

    def hook(name, dim):
        def record(_module, _inputs, out):
            seen.setdefault(name, []).extend(part != 0 for part in out.split(batch, dim))
        return record

    handles = [m.register_forward_hook(hook(n, mc._preferred_dim(n, m, model))) for n, m in leaves]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    for name, outs in seen.items():
        rows[name] = torch.cat([o.reshape(-1) for o in outs])
    return result, rows


def test_batched_sampling_is_exact_without_matrix_products():
    model = nn.Sequential(dnn.Dropout(0.3), nn.Tanh(), nn.Dropout(0.2), dnn.GaussianDropout(0.4), dnn.Dropout(0.5))
    x = torch.randn(7, 33)
    sequential = mc.mc_samples(model, x, samples=9, seed=4, memory_budget=0)
    assert torch.equal(sequential, mc.mc_samples(model, x, samples=9, seed=4, memory_budget=BIG))


def test_element_wise_layers_draw_every_pass_of_a_forward_in_one_kernel_call(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 16), dnn.ReLUDropout(0.5), nn.Linear(16, 16), dnn.Dropout(0.25))
    x = torch.randn(8, 16)  # 128 elements a pass: whole Philox counters at every draw width
    calls = []
    masked = mc.kernels.masked
    monkeypatch.setattr(mc.kernels, "masked", lambda part, *a, **k: calls.append(part.shape[0]) or masked(part, *a, **k))
    batched = mc.mc_samples(model, x, samples=6, seed=3, memory_budget=BIG)
    assert calls == [8, 8, 40, 40]  # the measured first pass, then passes 1-5 in one forward: one call a layer
    assert torch.equal(batched, mc.mc_samples(model, x, samples=6, seed=3, memory_budget=0))


def test_one_call_passes_read_consecutive_counters_of_the_layer_stream():
    # pass t of a dropkit Dropout reads the layer's stream from counter t * (counters a pass)
    ones = torch.ones(3, 40)
    samples = mc.mc_samples(nn.Sequential(dnn.Dropout(0.5)), ones, samples=4, seed=9, memory_budget=BIG)
    layer_seed = dropkit.rng.derive_seed(9, mc._LAYER_STREAM, 0, 0)
    width = dropkit.rng.keep_threshold(0.5)[0]
    counters = -(-ones.numel() * width // dropkit.rng.BITS_PER_COUNTER)
    for t in range(4):
        expected = mc.kernels.masked(ones, layer_seed, 0.5, "dropout", offset=t * counters)[0]
        assert torch.equal(samples[t], expected)


def test_chunked_budget_gives_the_same_samples():
    model = nn.Sequential(nn.Tanh(), dnn.Dropout(0.5), nn.Dropout(0.3))
    x = torch.randn(10, 6)
    rows = []
    model.register_forward_pre_hook(lambda _m, inputs: rows.append(inputs[0].shape[0]))
    # one pass's module outputs: three layers and the Sequential, 10 x 6 floats each
    per_pass = 4 * x.numel() * 4
    chunked = mc.mc_samples(model, x, samples=7, seed=0, memory_budget=2 * per_pass + 1)
    assert rows == [10, 20, 20, 20]  # the measured first pass, then two passes per forward
    assert torch.equal(chunked, mc.mc_samples(model, x, samples=7, seed=0, memory_budget=0))
    assert torch.equal(chunked[:3], mc.mc_samples(model, x, samples=3, seed=0, memory_budget=BIG))



def test_pass_bytes_are_measured_once_per_model_and_input_shape():
    model = nn.Sequential(nn.Tanh(), dnn.Dropout(0.5), nn.Dropout(0.3))
    rows = []
    model.register_forward_pre_hook(lambda _m, inputs: rows.append(inputs[0].shape[0]))
    per_pass = 4 * 10 * 6 * 4  # as above
    x = torch.randn(10, 6)
    first = mc.mc_samples(model, x, samples=5, seed=2, memory_budget=2 * per_pass + 1)
    again = mc.mc_samples(model, x, samples=5, seed=2, memory_budget=2 * per_pass + 1)
    mc.mc_samples(model, torch.randn(3, 6), samples=5, seed=2, memory_budget=2 * per_pass + 1)
    assert rows[:6] == [10, 20, 20] + [20, 20, 10]  # no lone first pass for a shape seen before
    assert rows[6] == 3 and sum(rows[7:]) == 12  # a new shape is measured again
    assert torch.equal(first, again)
    assert list(mc._PASS_BYTES[model]) == [((10, 6), torch.float32, torch.device("cpu")),
                                           ((3, 6), torch.float32, torch.device("cpu"))]

def test_transformer_fast_path_is_off_while_sampling_and_restored():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True).eval()
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        with mc.dropout_active(layer):
            assert not torch.backends.mha.get_fastpath_enabled()
            a, b = layer(x), layer(x)
    assert not torch.equal(a, b)  # the fused path would skip dropout and give a == b
    assert torch.backends.mha.get_fastpath_enabled()
    samples = mc.mc_samples(layer, x, samples=4, seed=0)
    assert len({tuple(s.flatten()[:8].tolist()) for s in samples}) == 4
    mc_out = mc.mc_classify(nn.Sequential(layer, nn.Flatten(), nn.Linear(40, 3)), x, samples=10, seed=0)
    assert (mc_out.epistemic > 0).all()


def test_fast_path_and_modes_restored_after_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    with pytest.raises(ValueError, match="one tensor"):
        mc.mc_samples(nn.Sequential(model, _Pair()), torch.randn(2, 3), samples=2)
    assert torch.backends.mha.get_fastpath_enabled()
    assert all(m.training for m in model.modules())
    assert "forward" not in model[1].__dict__


class _Pair(nn.Module):
    def forward(self, x):
        return x, x


def test_seeded_repeatable_and_global_generator():
    model, x = _net(0.5), torch.randn(8, 6)
    assert torch.equal(mc.mc_samples(model, x, 4, seed=1), mc.mc_samples(model, x, 4, seed=1))
    assert not torch.equal(mc.mc_samples(model, x, 4, seed=1), mc.mc_samples(model, x, 4, seed=2))
    dropkit.manual_seed(7)
    first = mc.mc_samples(model, x, 4)
    dropkit.manual_seed(7)
    assert torch.equal(first, mc.mc_samples(model, x, 4))
    state = torch.get_rng_state()
    mc.mc_samples(model, x, 4, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # a seeded call leaves torch's generator alone


def test_layer_generators_are_restored():
    layer = dnn.Dropout(0.5, seed=3)
    generator = layer.generator
    mc.mc_samples(nn.Sequential(nn.Linear(2, 4), layer), torch.randn(3, 2), 2, seed=0)
    assert layer.generator is generator and "forward" not in layer.__dict__


def test_passes_are_independent_masks():
    # dropout of ones: each pass drops about p of the units, and two passes agree on about half
    ones = torch.ones(50, 40)
    samples = mc.mc_samples(nn.Sequential(dnn.Dropout(0.5)), ones, samples=6, seed=0, memory_budget=BIG)
    kept = samples != 0
    n = ones.numel()
    bound = 5 * math.sqrt(n * 0.25)  # 5 standard deviations of a Binomial(n, 1/2)
    for t in range(6):
        assert abs(int(kept[t].sum()) - n / 2) < bound
        for u in range(t):
            assert abs(int((kept[t] == kept[u]).sum()) - n / 2) < bound


def test_only_dropout_is_switched_on_and_modes_are_restored():
    net = _net(0.5)
    net.train()
    seen = {}

    def record(module, *_):
        seen[type(module).__name__] = module.training

    for module in net:
        module.register_forward_hook(record)
    mc.mc_samples(net, torch.randn(4, 6), samples=2)
    assert seen["Dropout"] is True and seen["BatchNorm1d"] is False
    assert all(m.training for m in net.modules())


def test_wrapped_layer_of_concrete_dropout_stays_in_eval():
    inner = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model = nn.Sequential(ConcreteDropout(4, inner, weight_regularizer=1e-6, dropout_regularizer=1e-5))
    seen = []
    inner[1].register_forward_hook(lambda m, *_: seen.append(m.training))
    mc.mc_samples(model, torch.randn(3, 4), samples=2)
    assert seen == [False, False]


def test_passes_differ_with_dropout_and_agree_without():
    x = torch.randn(8, 6)
    stochastic = mc.mc_samples(_net(0.5), x, samples=5)
    assert not torch.equal(stochastic[0], stochastic[1])
    deterministic = mc.mc_samples(_net(0.0), x, samples=5)
    assert torch.equal(deterministic[0], deterministic[4])


def test_uncertainty_split_sums_and_is_zero_without_noise():
    x = torch.randn(16, 6)
    out = mc.mc_classify(_net(0.5), x, samples=40, seed=1)
    assert torch.allclose(out.probs.sum(-1), torch.ones(16))
    assert torch.allclose(out.aleatoric + out.epistemic, out.total, atol=1e-6)
    assert (out.epistemic > 0).all()
    calm = mc.mc_classify(_net(0.0), x, samples=5)
    assert torch.allclose(calm.epistemic, torch.zeros(16), atol=1e-6)


def test_uncertainty_from_probs_hand_case():
    # two passes, one input: [1, 0] and [0, 1] -> mean [.5, .5], total log 2, aleatoric 0
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    out = mc.uncertainty_from_probs(probs)
    assert torch.allclose(out.total, torch.tensor([math.log(2)]))
    assert torch.allclose(out.aleatoric, torch.zeros(1)) and torch.allclose(out.epistemic, out.total)


def test_regression_mean_and_variance():
    net = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 1))
    mean, var = mc.mc_regress(net, torch.randn(10, 3), samples=30)
    assert mean.shape == var.shape == (10, 1) and (var > 0).all()


def test_rnn_between_layer_dropout_warns():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, num_layers=2, dropout=0.3, batch_first=True)
            self.drop = nn.Dropout(0.2)

        def forward(self, x):
            return self.drop(self.rnn(x)[0])

    with pytest.warns(UserWarning, match="between-layer dropout"):
        mc.mc_samples(Tagger(), torch.randn(2, 5, 3), samples=2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        mc.mc_samples(_net(0.5), torch.randn(2, 6), samples=0)
    with pytest.raises(TypeError, match="samples must be an int >= 1"):
        mc.mc_samples(_net(0.5), torch.randn(2, 6), samples=True)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        mc.mc_samples(lambda x: x, torch.randn(2, 6), samples=2)
    with pytest.raises(ValueError, match="memory_budget must be an int >= 0"):
        mc.mc_samples(_net(0.5), torch.randn(2, 6), samples=2, memory_budget=-1)
    with pytest.raises(ValueError, match="seed must be an int"):
        mc.mc_samples(_net(0.5), torch.randn(2, 6), samples=2, seed=-1)
    with pytest.raises(ValueError, match="no dropout module"):
        mc.mc_samples(nn.Linear(2, 2), torch.randn(2, 2))
    with pytest.raises(ValueError, match="no dropout module"):
        mc.mc_samples(nn.MultiheadAttention(4, 1, dropout=0.0), torch.randn(2, 4))
    with pytest.raises(ValueError, match="probs must be"):
        mc.uncertainty_from_probs(torch.rand(3, 4))
