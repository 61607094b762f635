"""LoRA dropout that keeps no dropped copy of the input: exactness against the dense composition,
what backward keeps, and converting PEFT models."""

import copy
import filecmp
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit import functional as DF
from dropkit import nn as dnn
from dropkit.lora import DropoutLinear, LoRADropout, convert_peft_lora, dropout_linear, lora_dropout


def _saved_storages(fn, exclude=()) -> dict[int, int]:
    """data_ptr -> bytes of the distinct storages autograd keeps while ``fn()`` runs, without ``exclude``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 16, dtype=torch.float64, generator=g)
    a = torch.randn(4, 16, dtype=torch.float64, generator=g)
    b = torch.randn(12, 4, dtype=torch.float64, generator=g)
    bias = torch.randn(12, dtype=torch.float64, generator=g)
    return x, a, b, bias


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_outputs_and_gradients_match_the_dense_composition(p, with_bias):
    results = []
    for fused in (False, True):
        x, a, b, bias = (t.requires_grad_() for t in _tensors())
        bias_arg = bias if with_bias else None
        if fused:
            y = lora_dropout(x, a, b, p, 2.5, training=True, lora_b_bias=bias_arg, seed=21)
        else:
            y = F.linear(F.linear(DF.dropout(x, p, training=True, seed=21), a), b, bias_arg) * 2.5
        y.backward(torch.sin(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))
        results.append([y.detach(), x.grad, a.grad, b.grad, bias.grad])
    for dense, fused in zip(*results):
        if dense is None:
            assert fused is None
        else:
            torch.testing.assert_close(fused, dense, rtol=1e-12, atol=1e-12)
    assert results[0][1].eq(0).any()  # some inputs were dropped: their gradient is zero


def test_backward_keeps_x_and_a_seed_like_lora_without_dropout():
    x, a, b, _ = _tensors()
    x.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    kept = {}
    for p in (0.0, 0.3):
        kept[p] = _saved_storages(lambda: lora_dropout(x, a, b, p, 2.0, training=True), exclude=(a, b))
    seed_bytes = 8
    assert x.untyped_storage().data_ptr() in kept[0.3]
    assert sum(kept[0.3].values()) == sum(kept[0.0].values()) + seed_bytes
    dense = _saved_storages(lambda: F.linear(F.linear(DF.dropout(x, 0.3, training=True), a), b) * 2.0,
                            exclude=(a, b))
    # the composition keeps a dropped copy of x in place of x itself: one more activation-sized tensor
    # wherever x is kept anyway (by other layers, or by LoRA without dropout)
    x_ptr, x_bytes = x.untyped_storage().data_ptr(), x.numel() * x.element_size()
    assert x_ptr not in dense and x_bytes in dense.values()


def test_eval_zero_and_full_rates():
    x, a, b, _ = _tensors()
    torch.testing.assert_close(lora_dropout(x, a, b, 0.5, 2.0, training=False), F.linear(F.linear(x, a), b) * 2.0)
    torch.testing.assert_close(dropout_linear(x, a, 0.0, training=True), F.linear(x, a))
    assert not dropout_linear(x, a, 1.0, training=True).any()


def test_bad_arguments_name_what_they_accept():
    x, a, b, _ = _tensors()
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 2"):
        dropout_linear(x, a, 2.0, training=True)
    with pytest.raises(ValueError, match="weight must be a"):
        dropout_linear(x, b, 0.1, training=True)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        dropout_linear(x.long(), a, 0.1, training=True)
    with pytest.raises(TypeError, match="scaling must be a finite float"):
        lora_dropout(x, a, b, 0.1, True, training=True)
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        LoRADropout(16, 16, r=0)


def test_modules():
    layer = DropoutLinear(16, 4, bias=True, p=0.2, seed=5)
    assert list(layer.state_dict()) == ["weight", "bias", "generator_state"]  # seeded: its generator too
    assert repr(layer) == "DropoutLinear(in_features=16, out_features=4, bias=True, p=0.2, seed=5)"
    x = torch.randn(2, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    path = LoRADropout(16, 12, r=4, p=0.1, alpha=8)
    assert path.scaling == 2.0 and not path(x).any()  # B starts at zero
    assert list(path.state_dict()) == ["lora_A.weight", "lora_B.weight"]


# --- PEFT ------------------------------------------------------------------------------------------

def _peft_model(lora_dropout_rate: float):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout_rate,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    model = peft.get_peft_model(base, lora)
    for name, param in model.named_parameters():  # B is zero at init: give the adapters some value
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def _step(model, tokens):
    """Loss, and the gradients of the trainable parameters."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad}


def test_convert_peft_model_keeps_weights_keys_and_saved_adapter(tmp_path: Path):
    model = _peft_model(0.1)
    before_keys = list(model.state_dict())
    params = dict(model.named_parameters())
    model.save_pretrained(tmp_path / "before")
    assert dropkit.convert(model) == 10  # 5 target modules x 2 layers, nothing else
    assert list(model.state_dict()) == before_keys
    assert all(params[k] is v for k, v in model.named_parameters())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_A["default"], DropoutLinear) and layer.lora_A["default"].p == 0.1
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    model.save_pretrained(tmp_path / "after")
    names = sorted(p.name for p in (tmp_path / "before").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "after").iterdir()) and "adapter_config.json" in names
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "before", tmp_path / "after", names, shallow=False)
    assert match == names, (mismatch, errors)
    assert convert_peft_lora(model) == 0  # nothing left to convert


def test_converted_peft_model_matches_dense_dropout_for_the_same_masks():
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    dense = _peft_model(0.1)
    converted = copy.deepcopy(dense)
    convert_peft_lora(converted)
    for layer in dense.modules():  # PEFT's torch dropout -> dropkit's, so both draw the same masks
        if hasattr(layer, "lora_dropout"):
            for name, drop in list(layer.lora_dropout.items()):
                layer.lora_dropout[name] = dnn.Dropout(drop.p)
    results = []
    for model in (dense, converted):
        model.train()
        torch.manual_seed(7)
        results.append(_step(model, tokens))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert g0.keys() == g1.keys() and len(g0) == 20
    for key in g0:
        torch.testing.assert_close(g1[key], g0[key], rtol=1e-4, atol=1e-6, msg=key)
    converted.eval(), dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=tokens).logits, dense(input_ids=tokens).logits,
                                   rtol=0, atol=0)


def test_converted_peft_model_keeps_what_lora_without_dropout_keeps():
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    saved = {}
    for label, rate, convert in (("none", 0.0, False), ("peft", 0.1, False), ("dropkit", 0.1, True)):
        model = _peft_model(rate).train()
        if convert:
            convert_peft_lora(model)
        saved[label] = sum(_saved_storages(lambda: model(input_ids=tokens, labels=tokens).loss,
                                           exclude=list(model.parameters())).values())
    layers = 10
    assert saved["dropkit"] == saved["none"] + 8 * layers  # one 8-byte seed per adapter
    activation = 2 * 12 * 32 * 4  # one LoRA layer's input (float32); down_proj's is larger
    assert saved["peft"] - saved["dropkit"] >= layers * activation


def test_compiled_lora_dropout_matches_the_eager_composition():
    x, a, b, _ = (t.float().requires_grad_() for t in _tensors())
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, a, b: lora_dropout(x, a, b, 0.3, 2.0, training=True, seed=3),
                             backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, lambda x, a, b: F.linear(F.linear(DF.dropout(x, 0.3, training=True, seed=3), a), b) * 2.0):
        for t in (x, a, b):
            t.grad = None
        y = fn(x, a, b)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))
        results.append([y.detach(), x.grad, a.grad, b.grad])
    for compiled_value, eager_value in zip(*results):
        torch.testing.assert_close(compiled_value, eager_value, rtol=1e-6, atol=1e-6)
