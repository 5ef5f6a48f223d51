"""3x3 convolutions by Winograd's algorithm give PyTorch's convolution, and only where they should run."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samcore.modeling import winograd
from samcore.modeling.common import encoder_neck
from samcore.modeling.winograd import Conv2d, transform_weight, winograd_conv3x3


@pytest.fixture
def winograd_path(monkeypatch):
    """The Winograd path taken whether or not it is the faster one on this machine; counts its calls."""
    calls = []
    convolve = winograd.winograd_conv3x3

    def counted(*args):
        calls.append(args[0].shape)
        return convolve(*args)

    monkeypatch.setattr(winograd, "winograd_is_faster", lambda *args: True)
    monkeypatch.setattr(winograd, "winograd_conv3x3", counted)
    return calls


def conv_and_input(channels=24, outputs=40, height=19, width=26, batch=2, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    conv = Conv2d(channels, outputs, kernel_size=3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / (3 * channels**0.5))
        if bias:
            conv.bias.copy_(torch.randn(outputs, generator=generator))
    x = torch.randn(batch, channels, height, width, generator=generator)
    return conv, x


@pytest.mark.parametrize(
    ("height", "width", "bias", "channels_last"),
    [(16, 16, False, True), (19, 26, True, True), (7, 5, True, False), (1, 3, False, False)],
)
def test_winograd_matches_the_direct_convolution(height, width, bias, channels_last):
    conv, x = conv_and_input(height=height, width=width, bias=bias)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(
        x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), padding=1
    )
    with torch.inference_mode():
        out = winograd_conv3x3(x, transform_weight(conv.weight), conv.bias)
    assert out.shape == expected.shape and out.dtype == torch.float32
    scale = expected.abs().max().item()
    assert (out.double() - expected).abs().max().item() < 1e-5 * scale
    # The layout of the input is kept, as oneDNN's convolution keeps it.
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_the_transformed_kernels_are_no_ordinary_copy():
    """A wrong transform (or none) would not give the convolution: check one that must fail does."""
    conv, x = conv_and_input(height=12, width=12)
    wrong = transform_weight(conv.weight.flip(-1))  # the mirrored kernel: a different convolution
    with torch.inference_mode():
        out = winograd_conv3x3(x, wrong, conv.bias)
    assert (out - F.conv2d(x, conv.weight, conv.bias, padding=1)).abs().max() > 0.1


def test_inference_takes_the_winograd_path_and_gives_nn_conv2ds_result(winograd_path):
    conv, x = conv_and_input()
    with torch.inference_mode():
        out = conv(x)
    assert winograd_path == [x.shape]
    assert torch.allclose(out, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4)


def test_a_changed_weight_is_transformed_again(winograd_path):
    conv, x = conv_and_input(bias=False)
    with torch.no_grad():
        first = conv(x)
        conv.weight.mul_(2)  # in place, as a checkpoint loads
        second = conv(x)
    assert len(winograd_path) == 2
    assert torch.allclose(second, 2 * first, atol=1e-4)


def test_training_autocast_and_other_convolutions_take_pytorchs_own_path(winograd_path):
    conv, x = conv_and_input()
    x.requires_grad_(True)
    conv(x).sum().backward()  # autograd: gradients reach the input and the weight
    assert x.grad is not None and conv.weight.grad is not None
    with torch.inference_mode():
        plain = x.detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(plain).dtype == torch.bfloat16
        conv(plain.double().float()[:, :, ::2])  # still 3x3 stride 1: taken
        strided = Conv2d(24, 8, kernel_size=3, stride=2, padding=1)
        depthwise = Conv2d(24, 24, kernel_size=3, padding=1, groups=24)
        pointwise = Conv2d(24, 8, kernel_size=1)
        for layer in (strided, depthwise, pointwise):
            assert torch.allclose(layer(plain), nn.Conv2d.forward(layer, plain))
    assert len(winograd_path) == 1  # the inference call on the 3x3 layer alone


def test_where_it_is_slower_the_direct_convolution_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(winograd, "winograd_is_faster", lambda *args: False)
    monkeypatch.setattr(winograd, "winograd_conv3x3", lambda *args: calls.append(args))
    conv, x = conv_and_input()
    with torch.inference_mode():
        out = conv(x)
    assert not calls and torch.equal(out, F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_the_probe_answers_once_per_shape():
    winograd.winograd_is_faster.cache_clear()
    answer = winograd.winograd_is_faster((1, 8, 12, 12), 8, True)
    assert isinstance(answer, bool)
    assert winograd.winograd_is_faster((1, 8, 12, 12), 8, True) is answer
    assert winograd.winograd_is_faster.cache_info().hits == 1


def test_a_batch_takes_the_path_its_images_take_one_at_a_time(monkeypatch):
    asked = []
    monkeypatch.setattr(winograd, "winograd_is_faster", lambda *args: asked.append(args) or False)
    conv, x = conv_and_input()
    with torch.inference_mode():
        conv(x[:1])
        conv(torch.cat([x, x, x]))
    assert len(asked) == 2 and asked[0] == asked[1] and asked[0][0][0] == 1


def test_checkpoints_load_unchanged_and_copies_drop_the_transformed_weight(winograd_path):
    neck = encoder_neck(32, 16)
    plain = nn.Sequential(
        nn.Conv2d(32, 16, 1, bias=False),
        nn.Identity(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.Identity(),
    )
    assert set(neck.state_dict()) - {"1.weight", "1.bias", "3.weight", "3.bias"} == set(plain.state_dict())
    conv = neck[2]
    with torch.inference_mode():
        conv(torch.randn(1, 16, 8, 8))
    assert "_winograd" in conv.__dict__
    for clone in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert "_winograd" not in clone.__dict__
        assert torch.equal(clone.weight, conv.weight)
