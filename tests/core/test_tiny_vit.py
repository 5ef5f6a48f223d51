"""TinyViT (MobileSAM ``vit_t``) image encoder: checkpoint layout, shapes and parity with MobileSAM."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samcore.modeling.tiny_vit import ConvBN, TinyViT, TinyViTBlock

# Keys of ``image_encoder.*`` in mobile_sam.pt (prefix removed) with their shapes, as produced by
# MobileSAM's own TinyViT for the vit_t configuration.
MOBILE_SAM_KEYS = [
    ("patch_embed.seq.0.c.weight", (32, 3, 3, 3)),
    ("patch_embed.seq.0.bn.running_mean", (32,)),
    ("patch_embed.seq.0.bn.num_batches_tracked", ()),
    ("patch_embed.seq.2.c.weight", (64, 32, 3, 3)),
    ("layers.0.blocks.0.conv1.c.weight", (256, 64, 1, 1)),
    ("layers.0.blocks.0.conv2.c.weight", (256, 1, 3, 3)),
    ("layers.0.blocks.1.conv3.bn.weight", (64,)),
    ("layers.0.downsample.conv2.c.weight", (128, 1, 3, 3)),
    ("layers.1.blocks.0.attn.attention_biases", (4, 49)),
    ("layers.1.blocks.0.attn.qkv.weight", (384, 128)),
    ("layers.1.blocks.1.attn.proj.bias", (128,)),
    ("layers.1.downsample.conv1.c.weight", (160, 128, 1, 1)),
    ("layers.2.blocks.5.attn.attention_biases", (5, 196)),
    ("layers.2.blocks.0.local_conv.c.weight", (160, 1, 3, 3)),
    ("layers.2.blocks.3.mlp.norm.weight", (160,)),
    ("layers.2.downsample.conv2.c.weight", (320, 1, 3, 3)),
    ("layers.2.downsample.conv3.c.weight", (320, 320, 1, 1)),
    ("layers.3.blocks.1.mlp.fc1.weight", (1280, 320)),
    ("layers.3.blocks.1.mlp.fc2.weight", (320, 1280)),
    ("layers.3.blocks.1.attn.attention_biases", (10, 49)),
    ("norm_head.weight", (320,)),
    ("head.weight", (1000, 320)),
    ("head.bias", (1000,)),
    ("neck.0.weight", (256, 320, 1, 1)),
    ("neck.1.weight", (256,)),
    ("neck.2.weight", (256, 256, 3, 3)),
    ("neck.3.bias", (256,)),
]
MOBILE_SAM_NUM_KEYS = 302


def _randomised(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every float entry, scaled so that activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value.clone()
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=g) + 0.5
        elif key.endswith("attention_biases"):
            out[key] = torch.randn(value.shape, generator=g)
        elif value.ndim > 1:
            out[key] = torch.randn(value.shape, generator=g) / value[0].numel() ** 0.5
        else:
            out[key] = 0.5 * torch.randn(value.shape, generator=g)
    return out


# --------------------------------------------------------------------------- without the reference


def test_state_dict_has_mobile_sam_keys_and_shapes():
    state = TinyViT().state_dict()
    assert len(state) == MOBILE_SAM_NUM_KEYS
    for key, shape in MOBILE_SAM_KEYS:
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert not any(k.endswith("attention_bias_idxs") for k in state)
    assert not any(k.startswith("layers.3.downsample") for k in state)


# 256/512 pad every stage to whole windows; 448 needs no padding; at 224 stage 2 is a single window.
@pytest.mark.parametrize(("img_size", "batch"), [(256, 2), (512, 1), (448, 1), (224, 1)])
def test_output_shape(img_size, batch):
    model = TinyViT(img_size=img_size).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, img_size, img_size))
    assert out.shape == (batch, 256, img_size // 16, img_size // 16)
    assert torch.isfinite(out).all()


def test_classifier_head_does_not_affect_embedding():
    model = TinyViT(img_size=256).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        before = model(x)
        model.head.weight.add_(1.0)
        model.norm_head.weight.add_(1.0)
        after = model(x)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_checkpoint_with_stored_bias_index_tables_loads_strictly():
    model = TinyViT(img_size=256)
    state = _randomised(model.state_dict())
    for name, buf in model.named_buffers():
        if name.endswith("attention_bias_idxs"):
            state[name] = buf.clone()
    fresh = TinyViT(img_size=256)
    fresh.load_state_dict(state, strict=True)
    key = "layers.2.blocks.0.attn.attention_biases"
    torch.testing.assert_close(fresh.layers[2].blocks[0].attn.attention_biases, state[key])


def test_attention_bias_index_table():
    idxs = TinyViT(img_size=256, window_sizes=(7, 3, 3, 3)).layers[1].blocks[0].attn.attention_bias_idxs
    assert idxs.shape == (9, 9) and idxs.dtype == torch.long
    # Positions are row-major in a 3x3 window; the bias of offset (|dy|, |dx|) sits at |dy| * 3 + |dx|.
    assert idxs[0, 0] == 0 and idxs[0, 1] == 1 and idxs[0, 3] == 3 and idxs[0, 8] == 8
    assert idxs[4, 0] == 4 and idxs[8, 0] == 8 and idxs[5, 3] == 2 and idxs[2, 6] == 8
    assert torch.equal(idxs, idxs.T)


@pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"),
    reason="this PyTorch has no fused CPU attention",
)
def test_window_attention_takes_the_fused_cpu_kernel():
    # A 3-D bias mask sent every window to PyTorch's unfused attention, 3.5x slower.
    attention = TinyViT(img_size=256, window_sizes=(7, 7, 14, 7)).layers[1].blocks[0].attn
    nn.init.normal_(attention.attention_biases)
    x = torch.randn(4, 49, attention.num_heads * attention.head_dim)
    with torch.inference_mode(), torch.profiler.profile() as profile:
        out = attention(x)
    ran = {event.key for event in profile.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ran
    assert "aten::_scaled_dot_product_attention_math" not in ran
    with torch.inference_mode():
        qkv = attention.qkv(attention.norm(x)).view(4, 49, attention.num_heads, 3, -1)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)
        bias = attention.attention_biases[:, attention.attention_bias_idxs]
        weights = torch.softmax(q @ k.transpose(-1, -2) * attention.head_dim**-0.5 + bias, dim=-1)
        expected = attention.proj((weights @ v).transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 8])
def test_conv_bn_folds_its_batch_norm_in_eval_mode_only(groups):
    layer = ConvBN(8, 8, kernel_size=3, stride=2, groups=groups)
    for tensor in (layer.bn.weight, layer.bn.bias, layer.bn.running_mean):
        nn.init.normal_(tensor)
    nn.init.uniform_(layer.bn.running_var, 0.5, 2.0)
    x = torch.randn(2, 8, 9, 9)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.bn(layer.c(x)), rtol=1e-5, atol=1e-5)
    layer.train()
    batch_stats = layer(x)  # training normalises with the batch's own statistics
    torch.testing.assert_close(batch_stats.mean((0, 2, 3)), layer.bn.bias.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("groups", [1, 8])
def test_conv_bn_gelu_gives_the_gelu_of_its_output(groups, approximate):
    layer = ConvBN(8, 8, kernel_size=3, groups=groups).eval()
    for tensor in (layer.bn.weight, layer.bn.bias, layer.bn.running_mean):
        nn.init.normal_(tensor)
    x = torch.randn(2, 8, 9, 9).to(memory_format=torch.channels_last)
    expected = F.gelu(layer.bn(layer.c(x)), approximate=approximate)
    with torch.inference_mode():
        fused = layer.gelu(x, approximate)
        assert fused.dtype == torch.float32
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer.gelu(x, approximate)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)
    layer.train()
    trained = layer.gelu(x, approximate)  # batch statistics, and a gradient
    trained.sum().backward()
    assert layer.c.weight.grad is not None


def test_conv_bn_gelu_falls_back_where_the_fused_convolution_fails_or_differs(monkeypatch):
    from samcore.modeling import tiny_vit

    layer = ConvBN(8, 8, kernel_size=3).eval()
    nn.init.normal_(layer.bn.running_mean)
    x = torch.randn(2, 8, 9, 9)
    expected = F.gelu(layer.bn(layer.c(x)))

    def fails(*args):
        raise RuntimeError("no such kernel here")

    def differs(x, weight, bias, *args):
        return F.conv2d(x, weight, bias, padding=1, groups=args[3])  # the GELU left out

    for fake in (fails, differs):
        monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", fake)
        tiny_vit.conv_gelu_works.cache_clear()
        assert not tiny_vit.conv_gelu_works()
        with torch.inference_mode():
            torch.testing.assert_close(layer.gelu(x), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    tiny_vit.conv_gelu_works.cache_clear()
    assert tiny_vit.conv_gelu_works() == torch.backends.mkldnn.is_available()


def test_backward_reaches_every_used_parameter():
    model = TinyViT(img_size=64, depths=(1, 1, 1, 1)).train()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    unused = ("head.", "norm_head.")
    missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith(unused)]
    assert missing == []


def test_invalid_input_and_config_raise_value_error():
    model = TinyViT(img_size=64)
    with pytest.raises(ValueError, match="image batch"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="image batch"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="same length"):
        TinyViT(depths=(2, 2, 6))
    with pytest.raises(ValueError, match="divisible"):
        TinyViT(num_heads=(2, 3, 5, 10))


# --------------------------------------------------------------------------- against MobileSAM


def _timm_stand_in() -> dict[str, types.ModuleType]:
    """The few timm names MobileSAM's TinyViT imports (timm itself needs torchvision)."""

    class DropPath(nn.Module):
        def __init__(self, drop_prob: float | None = None) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    layers.trunc_normal_ = nn.init.trunc_normal_
    registry.register_model = lambda fn: fn
    timm.models = models
    models.layers = layers
    models.registry = registry
    return {
        "timm": timm,
        "timm.models": models,
        "timm.models.layers": layers,
        "timm.models.registry": registry,
    }


@pytest.fixture(scope="module")
def reference_module():
    """MobileSAM's ``tiny_vit_sam`` module from the mobilesam-mirror package.

    The file is loaded on its own: importing the ``mobile_sam`` package pulls in torchvision.
    """
    spec = importlib.util.find_spec("mobile_sam")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("reference package mobilesam-mirror is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "modeling" / "tiny_vit_sam.py"
    stand_in: dict[str, types.ModuleType] = {}
    try:
        importlib.import_module("timm.models.layers")
        importlib.import_module("timm.models.registry")
    except ImportError:
        stand_in = _timm_stand_in()
    saved = {name: sys.modules.get(name) for name in stand_in}
    sys.modules.update(stand_in)
    try:
        ref_spec = importlib.util.spec_from_file_location("_mobile_sam_tiny_vit_reference", path)
        module = importlib.util.module_from_spec(ref_spec)
        ref_spec.loader.exec_module(module)
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    return module


def _reference_vit_t(module) -> nn.Module:
    # Arguments of MobileSAM's build_sam_vit_t.
    return module.TinyViT(
        img_size=1024,
        in_chans=3,
        num_classes=1000,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def test_state_dict_matches_reference(reference_module):
    ref = _reference_vit_t(reference_module)
    ours = TinyViT()
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)
    for key, value in ref_state.items():
        assert our_state[key].shape == value.shape, key
        assert our_state[key].dtype == value.dtype, key
    ref_idxs = {n: b for n, b in ref.named_buffers() if n.endswith("attention_bias_idxs")}
    our_idxs = {n: b for n, b in ours.named_buffers() if n.endswith("attention_bias_idxs")}
    assert ref_idxs.keys() == our_idxs.keys() and len(ref_idxs) == 10
    for name, idxs in ref_idxs.items():
        assert torch.equal(our_idxs[name], idxs), name


def test_output_matches_reference(reference_module):
    ref = _reference_vit_t(reference_module)
    state = _randomised(ref.state_dict(), seed=1)
    ref.load_state_dict(state)
    ref.eval()  # MobileSAM caches the indexed attention biases when switching to eval
    ours = TinyViT()
    ours.load_state_dict(state, strict=True)
    ours.eval()

    captured: dict[str, dict[int, torch.Tensor]] = {"ref": {}, "ours": {}}
    for i in range(4):
        ref.layers[i].register_forward_hook(lambda m, a, out, i=i: captured["ref"].__setitem__(i, out))
        ours.layers[i].register_forward_hook(
            lambda m, a, out, i=i: captured["ours"].__setitem__(i, out.flatten(2).transpose(1, 2))
        )

    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(x)
        actual = ours(x)
    # Every stage is compared, since late stages dominate the final embedding.
    for i in range(4):
        torch.testing.assert_close(
            captured["ours"][i], captured["ref"][i], rtol=1e-4, atol=2e-5, msg=f"stage {i}"
        )
    assert actual.shape == (1, 256, 64, 64)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("size", [(7, 7), (14, 21), (10, 17)])
def test_block_matches_reference(reference_module, size):
    """One window, whole windows, and padded non-square maps."""
    h, w = size
    ref = reference_module.TinyViTBlock(dim=64, input_resolution=(h, w), num_heads=2, window_size=7)
    state = _randomised(ref.state_dict(), seed=3)
    ref.load_state_dict(state)
    ref.eval()
    ours = TinyViTBlock(64, num_heads=2, window_size=7, mlp_ratio=4.0, local_conv_size=3)
    ours.load_state_dict(state, strict=True)
    ours.eval()
    x = torch.randn(2, h, w, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref(x.reshape(2, h * w, 64)).reshape(2, h, w, 64)
        actual = ours(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5)
