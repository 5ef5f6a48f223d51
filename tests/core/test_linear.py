"""The encoders' linear layers and attention give PyTorch's results whichever kernels run them."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samcore.modeling import linear
from samcore.modeling.common import LayerNorm2d
from samcore.modeling.image_encoder import (
    Attention,
    chunked_attention,
    relative_position_bias,
    relative_table,
)
from samcore.modeling.linear import Linear, linear_gelu, through_onednn


@pytest.fixture
def onednn(monkeypatch):
    """oneDNN's path taken whether or not it is the faster one on this machine."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(linear, "onednn_is_faster", lambda: True)


def layer_and_input(rows=37, inner=48, columns=80):
    generator = torch.Generator().manual_seed(0)
    layer = Linear(inner, columns)
    x = torch.randn(2, rows, inner, generator=generator)
    return layer, x


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_inference_through_onednn_matches_torch(onednn, approximate):
    layer, x = layer_and_input()
    with torch.inference_mode():
        assert through_onednn(x, layer.weight)
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
        expected = F.gelu(F.linear(x, layer.weight, layer.bias), approximate=approximate)
        fused = linear_gelu(layer, x, approximate)
    assert fused.shape == (2, 37, 80)
    assert torch.allclose(fused, expected, atol=1e-5)


def test_autograd_autocast_and_a_disabled_onednn_take_torchs_own_path(monkeypatch):
    layer, x = layer_and_input()
    x.requires_grad_(True)
    assert not through_onednn(x, layer.weight)
    linear_gelu(layer, x).sum().backward()  # gradients flow to the input and the weights
    assert x.grad is not None and layer.weight.grad is not None
    with torch.inference_mode():
        plain = x.detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not through_onednn(plain, layer.weight)
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        assert not through_onednn(plain, layer.weight)
        assert torch.equal(layer(plain), F.linear(plain, layer.weight, layer.bias))


def test_onednn_is_not_used_where_its_product_disagrees(monkeypatch):
    def wrong(x, weight, bias, *args):
        return torch.zeros(len(x), len(weight))

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", wrong, raising=False)
    assert not linear.onednn_is_faster.__wrapped__()


def test_without_onednn_the_layers_fall_back_to_torch(monkeypatch):
    monkeypatch.setattr(linear, "onednn_is_faster", lambda: False)
    layer, x = layer_and_input()
    with torch.inference_mode():
        assert not through_onednn(x, layer.weight)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert torch.equal(linear_gelu(layer, x), F.gelu(F.linear(x, layer.weight, layer.bias)))


def test_bf16_autocast_gives_autocasts_product_and_follows_weight_changes():
    if not linear.bf16_packing_works():
        pytest.skip("this PyTorch has no oneDNN bf16 products")
    layer, x = layer_and_input()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear.bf16_through_onednn(x, layer.weight)
        product = layer(x)
        assert product.dtype == torch.bfloat16
        assert torch.equal(product, F.linear(x, layer.weight, layer.bias))
        activated = linear_gelu(layer, x)
        assert activated.dtype == torch.bfloat16
        assert torch.allclose(activated.float(), F.gelu(product.float()), atol=0.05)
    layer.load_state_dict({"weight": -layer.weight.detach(), "bias": layer.bias.detach()})  # in place
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    # The packed weight is oneDNN's opaque tensor: copies and pickles (a Dask worker's model) leave it out.
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(copied(x), F.linear(x, layer.weight, layer.bias))


def test_layers_made_in_inference_mode_run_in_bf16():
    # Their weights are inference tensors, which keep no count of in-place changes.
    if not linear.bf16_packing_works():
        pytest.skip("this PyTorch has no oneDNN bf16 products")
    with torch.inference_mode():
        layer, x = layer_and_input()
        assert layer.weight.is_inference()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("through", [False, True])
def test_global_attention_gives_the_fused_attentions_result_either_way(monkeypatch, through):
    # q, k and v as the encoder makes them: strided views of one (3, B, heads, N, d) tensor.
    if through and not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(linear, "onednn_is_faster", lambda: through)
    size, heads, width = (24, 20), 3, 8
    generator = torch.Generator().manual_seed(1)
    qkv = torch.randn(1, size[0] * size[1], 3, heads, width, generator=generator).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    rel_h, rel_w = (torch.randn(2 * side - 1, width, generator=generator) for side in size)
    with torch.inference_mode():
        assert through_onednn(q, k) == through
        chunked = chunked_attention(q, k, v, rel_h, rel_w, size)
        bias = relative_position_bias(q, rel_h, rel_w, size)
        whole = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_global_attention_in_bf16_stays_close_to_float32():
    # bf16 takes the path that writes the bias first and adds the product to it.
    size, heads, width = (24, 20), 3, 64
    generator = torch.Generator().manual_seed(2)
    qkv = torch.randn(1, size[0] * size[1], 3, heads, width, generator=generator).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    rel_h, rel_w = (torch.randn(2 * side - 1, width, generator=generator) / 4 for side in size)
    with torch.inference_mode():
        assert not through_onednn(q.bfloat16(), k.bfloat16())
        chunked = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), rel_h, rel_w, size)
        bias = relative_position_bias(q, rel_h, rel_w, size)
        whole = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert chunked.dtype == torch.bfloat16
    error = (chunked.float() - whole).abs()
    assert error.mean() < 0.01 and error.max() < 0.2, (error.mean(), error.max())


def test_windowed_attention_trains_and_infers_alike():
    # Inference writes the bias into a buffer (no gradient through out=); training sums it.
    attention = Attention(dim=32, num_heads=2, size=6)
    for table in (attention.rel_pos_h, attention.rel_pos_w):
        nn.init.normal_(table)
    x = torch.randn(2, 6, 6, 32)
    trained = attention(x)
    trained.square().sum().backward()
    assert attention.rel_pos_h.grad.abs().sum() > 0 and attention.rel_pos_w.grad.abs().sum() > 0
    with torch.inference_mode():
        inferred = attention(x)
        queries = x.new_ones(1, 1, 36, 16)
        bias = relative_position_bias(queries, attention.rel_pos_h, attention.rel_pos_w, (6, 6))
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-6)
    assert bias.is_contiguous() and bias.shape == (1, 1, 36, 36)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_relative_position_bias_is_the_sum_of_its_two_terms(dtype):
    # bf16 makes it as a product with a 0/1 matrix; each value must still be the one rounded sum.
    size, width = (5, 7), 16
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, size[0] * size[1], width, generator=generator).to(dtype)
    rel_h, rel_w = (torch.randn(2 * side - 1, width, generator=generator) for side in size)
    with torch.inference_mode():
        bias = relative_position_bias(q, rel_h, rel_w, size)
    grid = q.reshape(2, 3, *size, width)
    terms_h = torch.einsum("bnhwc,hkc->bnhwk", grid, relative_table(size[0], rel_h).to(dtype))
    terms_w = torch.einsum("bnhwc,wkc->bnhwk", grid, relative_table(size[1], rel_w).to(dtype))
    expected = (terms_h[..., :, None] + terms_w[..., None, :]).reshape(bias.shape)
    assert bias.dtype == dtype and torch.equal(bias, expected)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_layer_norm_2d_normalises_each_pixel_over_its_channels_in_its_layout(layout):
    norm = LayerNorm2d(16)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(2, 16, 5, 7) * 3 + 1).contiguous(memory_format=layout)
    mean = x.mean(1, keepdim=True)
    variance = (x - mean).square().mean(1, keepdim=True)
    normalised = (x - mean) / torch.sqrt(variance + norm.eps)
    expected = norm.weight[:, None, None] * normalised + norm.bias[:, None, None]
    out = norm(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=layout)
    out.sum().backward()  # the decoders' norms train
    assert norm.weight.grad is not None
    with torch.inference_mode():
        low = norm(x.bfloat16())
    torch.testing.assert_close(low.float(), expected.detach(), rtol=0.02, atol=0.05)


def test_cpu_autocast_dtype_is_none_outside_autocast():
    assert linear.cpu_autocast_dtype() is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear.cpu_autocast_dtype() == torch.bfloat16
