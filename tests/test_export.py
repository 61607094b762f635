"""MC export: dropout kept on with the seed a graph input; the masks are dropkit's, bit for bit."""

import numpy as np
import pytest
import torch
from torch import nn

from dropkit import export
from dropkit import functional as DF
from dropkit import nn as dnn
from dropkit.kernels import reference


@pytest.mark.parametrize("p", [0.5, 0.1, 0.3, 0.75])
@pytest.mark.parametrize("shape", [(7,), (3, 50), (2, 3, 4, 5)])
def test_keep_mask_is_the_reference_mask(p, shape):
    for seed in (0, 1, 2**62 + 12345):
        assert torch.equal(export.keep_mask(torch.tensor(seed), p, shape), reference.keep_mask(seed, p, shape))


def test_module_seeds_are_distinct_and_repeat():
    seeds = [export.module_seed(5, i) for i in range(50)]
    assert len(set(seeds)) == 50 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [export.module_seed(5, i) for i in range(50)]
    assert export.module_seed(6, 0) != seeds[0]
    with pytest.raises(ValueError, match="seed must be"):
        export.module_seed(-1, 0)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), dnn.Dropout(0.5), nn.Linear(32, 16), dnn.ReLUDropout(0.3),
                         nn.Dropout(0.1), nn.Linear(16, 3))


def test_exported_module_equals_dropkit_eager_ops_with_the_module_seeds():
    model, x = _net(), torch.randn(5, 6)
    wrapped = export.mc_export_module(model)
    for seed in (0, 7, 2**60):
        h = DF.dropout(model[1](model[0](x)), 0.5, training=True, seed=export.module_seed(seed, 0))
        h = DF.relu_dropout(model[3](h), 0.3, training=True, seed=export.module_seed(seed, 1))
        h = model[6](DF.dropout(h, 0.1, training=True, seed=export.module_seed(seed, 2)))
        assert torch.equal(wrapped(x, torch.tensor(seed)), h)
    assert not torch.equal(wrapped(x, torch.tensor(0)), wrapped(x, torch.tensor(1)))
    assert model.training and isinstance(model[2], dnn.Dropout)  # the original is left alone


def test_channel_and_shared_masks():
    x = torch.randn(2, 4, 3, 3)
    wrapped = export.mc_export_module(nn.Sequential(nn.Dropout2d(0.5)))
    out = wrapped(x, torch.tensor(3))
    kept = (out != 0).flatten(2)
    assert (kept.all(2) | ~kept.any(2)).all()  # whole channels kept or dropped
    seed = export.module_seed(3, 0)
    assert torch.equal(out, DF.dropout2d(x, 0.5, training=True, seed=seed))
    locked = export.mc_export_module(nn.Sequential(dnn.Dropout(0.4, mask_shape=(None, 1, None))))
    y = torch.randn(3, 6, 5)
    assert torch.equal(locked(y, torch.tensor(2)),
                       DF.dropout(y, 0.4, training=True, mask_shape=(None, 1, None), seed=export.module_seed(2, 0)))


def test_transformer_layer_keeps_dropout_with_the_fast_path_off():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True)
    layer.self_attn.dropout = 0.0  # attention dropout is functional: not convertible
    wrapped = export.mc_export_module(layer)
    x = torch.randn(3, 4, 8)
    with torch.no_grad(), export.mc_fast_path_off():
        assert not torch.equal(wrapped(x, torch.tensor(0)), wrapped(x, torch.tensor(1)))
    assert torch.backends.mha.get_fastpath_enabled()


def test_refusals():
    with pytest.raises(ValueError, match="no dropout module"):
        export.mc_export_module(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"1 \(AlphaDropout\) cannot be exported"):
        export.mc_export_module(nn.Sequential(nn.Linear(2, 2), nn.AlphaDropout(0.2)))
    with pytest.raises(ValueError, match="self_attn"):
        export.mc_export_module(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2))


@pytest.mark.slow
def test_onnxruntime_matches_eager_for_each_seed(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    # dropout only (a mask, a division): the runtime's outputs must equal eager's bit for bit
    model = nn.Sequential(dnn.Dropout(0.5), nn.Dropout2d(0.25))
    x = torch.randn(4, 3, 5, 5)
    path = export.export_onnx(model, x, tmp_path / "mc.onnx", optimize=False)
    runtime = ort.InferenceSession(str(path))
    wrapped = export.mc_export_module(model)
    outputs = []
    for seed in (0, 1, 2**62 + 9):
        got = runtime.run(None, {"x": x.numpy(), "seed": np.array(seed, dtype=np.int64)})[0]
        np.testing.assert_array_equal(got, wrapped(x, torch.tensor(seed)).numpy())
        outputs.append(got)
    assert not np.array_equal(outputs[0], outputs[1])
    again = runtime.run(None, {"x": x.numpy(), "seed": np.array(1, dtype=np.int64)})[0]
    np.testing.assert_array_equal(again, outputs[1])
