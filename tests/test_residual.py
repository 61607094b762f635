"""DropPath that runs the residual branch on kept samples only: exactness against the dense
composition, modes, torch.compile recompilation, and rewiring timm / torchvision blocks."""

import copy

import pytest
import torch
from torch import nn

import dropkit
from dropkit import functional as DF
from dropkit import nn as dnn
from dropkit import residual
from dropkit.residual import DropPathResidual, bucket_size, drop_path_residual, rewire_residual_blocks


def _branch(dim: int = 8) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)).double()


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _dense_and_sparse(branch, x, p, seed, **kwargs):
    """Output and gradients (input, branch weights) of the dense composition and of drop_path_residual."""
    results = []
    for fn in (lambda t: t + DF.drop_path(branch(t), p, training=True, seed=seed, **kwargs),
               lambda t: drop_path_residual(t, branch, p, training=True, seed=seed, **kwargs)):
        branch.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        y = fn(xi)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
        results.append((y.detach(), xi.grad, _grads(branch)))
    return results


@pytest.mark.parametrize("p", [0.1, 0.4, 0.8])
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_outputs_and_gradients_match_the_dense_composition(p, scale_by_keep):
    branch = _branch()
    x = torch.randn(32, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (y0, gx0, gw0), (y1, gx1, gw1) = _dense_and_sparse(branch, x, p, seed=11, scale_by_keep=scale_by_keep)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-13)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-13)
    assert gw0.keys() == gw1.keys()
    for name in gw0:
        torch.testing.assert_close(gw1[name], gw0[name], rtol=1e-12, atol=1e-12)


def test_convolutional_branch_matches_the_dense_composition():
    torch.manual_seed(3)
    branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1)).double()
    x = torch.randn(16, 4, 6, 6, dtype=torch.float64)
    (y0, gx0, gw0), (y1, gx1, gw1) = _dense_and_sparse(branch, x, 0.5, seed=4)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-13)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-13)
    for name in gw0:
        torch.testing.assert_close(gw1[name], gw0[name], rtol=1e-12, atol=1e-12)


class _Rows(nn.Module):
    """A branch that records how many rows it was called on."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return 2 * x


def test_branch_runs_on_the_kept_rows_only_and_dropped_rows_are_the_residual():
    branch = _Rows()
    x = torch.randn(64, 3)
    y = drop_path_residual(x, branch, 0.5, training=True, seed=7)
    keep = DF.drop_path(torch.ones(64, 1), 0.5, training=True, seed=7)[:, 0] > 0
    assert branch.calls == [int(keep.sum())]
    assert 0 < int(keep.sum()) < 64
    torch.testing.assert_close(y[~keep], x[~keep], rtol=0, atol=0)
    torch.testing.assert_close(y[keep], x[keep] + 2 * x[keep] / 0.5)


def test_eval_and_zero_rate_are_the_plain_residual_and_p1_skips_the_branch():
    branch = _Rows()
    x = torch.randn(8, 3)
    torch.testing.assert_close(drop_path_residual(x, branch, 0.5, training=False), 3 * x)
    torch.testing.assert_close(drop_path_residual(x, branch, 0.0, training=True), 3 * x)
    assert branch.calls == [8, 8]
    y = drop_path_residual(x, branch, 1.0, training=True)
    assert branch.calls == [8, 8] and torch.equal(y, x) and y is not x


def test_module_modes_state_dict_and_repr():
    block = DropPathResidual(nn.Linear(4, 4), 0.25, seed=3)
    assert list(block.state_dict()) == ["generator_state", "branch.weight", "branch.bias"]  # seeded: its generator too
    assert repr(block).startswith("DropPathResidual(\n  p=0.25, seed=3")
    x = torch.randn(6, 4)
    block.eval()
    torch.testing.assert_close(block(x), x + block.branch(x))
    block.train()
    first, second = block(x), block(x)
    assert not torch.equal(first, second)  # successive calls draw fresh masks from the layer's generator
    assert isinstance(dropkit.nn.DropPathResidual(nn.Identity()), DropPathResidual)


def test_bad_arguments_name_what_they_accept():
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
        DropPathResidual(nn.Identity(), 1.5)
    with pytest.raises(TypeError, match="p must be a float"):
        drop_path_residual(torch.ones(2, 2), nn.Identity(), "0.1", training=True)
    with pytest.raises(TypeError, match="branch must be an nn.Module"):
        DropPathResidual(lambda t: t)
    with pytest.raises(TypeError, match="branch must be callable"):
        drop_path_residual(torch.ones(2, 2), 3, 0.1, training=True)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        drop_path_residual(torch.ones(2, 2, dtype=torch.long), nn.Identity(), 0.1, training=True)
    with pytest.raises(ValueError, match="buckets must be a positive int, got True"):
        DropPathResidual(nn.Identity(), buckets=True)
    with pytest.raises(TypeError, match="training"):
        drop_path_residual(torch.ones(2, 2), nn.Identity(), 0.1)


def test_bucket_sizes():
    assert [bucket_size(k, 16, 4) for k in range(17)] == [0] + [4] * 4 + [8] * 4 + [12] * 4 + [16] * 4
    assert bucket_size(7, 10, 3) == 8 and bucket_size(9, 10, 3) == 10
    assert {bucket_size(k, 64, 8) for k in range(1, 65)} == {8, 16, 24, 32, 40, 48, 56, 64}


# --- torch.compile ---------------------------------------------------------------------------------

def _compiled_steps(buckets: int, steps: int, batch: int = 16) -> tuple[int, set[int]]:
    """Frames dynamo compiled over ``steps`` training steps of a compiled (dynamic=False) two-block
    model, and the distinct kept counts drawn."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(*(DropPathResidual(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)), 0.5, buckets=buckets)
                            for _ in range(2)))
    compiled = torch.compile(model, backend="eager", dynamic=False)
    counts = set()
    generator = torch.Generator().manual_seed(5)
    for step in range(steps):
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        torch.manual_seed(seed)
        compiled(torch.randn(batch, 3, 8)).sum().backward()
        torch.manual_seed(seed)  # the kept counts the compiled model just drew
        for _ in range(2):
            counts.add(int(DF.drop_path(torch.ones(batch, 1), 0.5, training=True)[:, 0].gt(0).sum()))
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"]), counts


@pytest.mark.slow
def test_compiled_model_does_not_recompile_for_every_kept_count():
    padded_graphs, counts = _compiled_steps(buckets=2, steps=12)
    assert len(counts) >= 5  # the kept count did vary
    # two bucket sizes (8 and 16 rows) for the branch, plus the graphs around each block's mask draw
    assert padded_graphs <= 5
    # one bucket per kept count (no padding) compiles a graph per count, until dynamo's recompile limit
    exact_graphs, _ = _compiled_steps(buckets=16, steps=12)
    assert padded_graphs < exact_graphs


def test_compiled_outputs_and_gradients_match_the_dense_composition():
    branch = _branch()
    x = torch.randn(16, 3, 8, dtype=torch.float64)

    def sparse(t):
        return drop_path_residual(t, branch, 0.4, training=True, seed=9, buckets=4)

    torch._dynamo.reset()
    compiled = torch.compile(sparse, backend="aot_eager", dynamic=False)
    results = []
    for fn in (lambda t: t + DF.drop_path(branch(t), 0.4, training=True, seed=9), compiled):
        branch.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))
        results.append((y.detach(), xi.grad, _grads(branch)))
    (y0, gx0, gw0), (y1, gx1, gw1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-13)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-13)
    for name in gw0:
        torch.testing.assert_close(gw1[name], gw0[name], rtol=1e-12, atol=1e-12)


# --- rewiring library blocks ---------------------------------------------------------------------

def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                             drop_path_rate=0.5, init_values=0.5), (6, 3, 16, 16), 3


def _timm_convnext():
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 2, 1, 1), dims=(8, 16, 16, 16), num_classes=5, drop_path_rate=0.5,
                    ls_init_value=0.5), (6, 3, 32, 32), 5


def _tv_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                           stochastic_depth_prob=0.5, num_classes=5), (6, 3, 32, 32), 4


def _tv_swin_v2():
    from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlockV2, PatchMergingV2

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                           stochastic_depth_prob=0.5, num_classes=5, block=SwinTransformerBlockV2,
                           downsample_layer=PatchMergingV2), (6, 3, 32, 32), 4


def _tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], stochastic_depth_prob=0.5,
                    layer_scale=0.5, num_classes=5), (6, 3, 32, 32), 4


MODELS = {"timm_vit": ("timm", _timm_vit), "timm_convnext": ("timm", _timm_convnext),
          "torchvision_swin": ("torchvision", _tv_swin), "torchvision_swin_v2": ("torchvision", _tv_swin_v2),
          "torchvision_convnext": ("torchvision", _tv_convnext)}


def _with_dropkit_drop_path(model: nn.Module) -> nn.Module:
    """The model with its drop-path modules replaced by dropkit's dense DropPath of the same rate, which
    draws its masks from torch's global generator as the rewired blocks do."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            rate = residual._rate(child)
            if rate is not None and not isinstance(child, nn.Identity):
                setattr(parent, name, dnn.DropPath(rate[0], scale_by_keep=rate[1]))
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rewired_models_keep_keys_eval_outputs_and_train_outputs_for_the_same_kept_set(name):
    library, make = MODELS[name]
    pytest.importorskip(library)
    torch.manual_seed(0)
    model, shape, blocks = make()
    model = model.double()
    rewired = copy.deepcopy(model)
    assert rewire_residual_blocks(rewired) == blocks
    assert rewire_residual_blocks(rewired) == 0
    assert list(rewired.state_dict()) == list(model.state_dict())
    x = torch.randn(shape, dtype=torch.float64)

    model.eval(), rewired.eval()
    with torch.no_grad():
        torch.testing.assert_close(rewired(x), model(x), rtol=0, atol=1e-12)

    dense = _with_dropkit_drop_path(model).train()
    rewired.train()
    outputs = []
    for net in (dense, rewired):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        y = net(x)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
        outputs.append((y.detach(), {k: v.grad for k, v in net.named_parameters()}))
    (y0, g0), (y1, g1) = outputs
    assert (y0 - model.eval()(x).detach()).abs().max() > 1e-3  # branches were dropped
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-12)
    assert g0.keys() == g1.keys()
    for key in g0:
        if g0[key] is None:
            assert g1[key] is None or not g1[key].any(), key
        else:
            grad = torch.zeros_like(g0[key]) if g1[key] is None else g1[key]
            torch.testing.assert_close(grad, g0[key], rtol=1e-9, atol=1e-11, msg=key)


def test_rewire_leaves_batch_mode_stochastic_depth_alone():
    pytest.importorskip("torchvision")
    from torchvision.ops import StochasticDepth

    model, _, blocks = _tv_convnext()
    first = next(m for m in model.modules() if hasattr(m, "stochastic_depth"))
    first.stochastic_depth = StochasticDepth(0.5, "batch")
    assert rewire_residual_blocks(model) == blocks - 1
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        rewire_residual_blocks("model")


def test_blocks_converted_to_dropkit_drop_path_are_rewired_too():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model, shape, blocks = _timm_vit()
    model = model.double()
    dropkit.convert(model)  # timm's DropPath -> dropkit's DropPath
    rewired = copy.deepcopy(model)
    assert rewire_residual_blocks(rewired) == blocks
    x = torch.randn(shape, dtype=torch.float64)
    outputs = []
    for net in (model.train(), rewired.train()):
        torch.manual_seed(5)
        outputs.append(net(x).detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-10, atol=1e-12)
