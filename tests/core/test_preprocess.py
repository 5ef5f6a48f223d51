"""Behaviour of samcore.preprocess as seen by a user loading images."""

from __future__ import annotations

import numpy as np
import pytest

from samcore.preprocess import MAX_PERCENTILE_PIXELS, percentile_range, to_rgb_uint8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_uint8_rgb_passes_through_unchanged(rng):
    image = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    out = to_rgb_uint8(image)
    assert out.dtype == np.uint8
    assert out.shape == (32, 48, 3)
    np.testing.assert_array_equal(out, image)


def test_uint8_grayscale_is_replicated_without_rescaling():
    image = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16).astype(np.uint8) // 4
    out = to_rgb_uint8(image)
    assert out.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], image)


def test_uint8_rgba_drops_alpha():
    image = np.zeros((8, 8, 4), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2], image[..., 3] = 10, 20, 30, 99
    out = to_rgb_uint8(image)
    np.testing.assert_array_equal(out, image[..., :3])


def test_dim_uint16_fluorescence_is_stretched_and_keeps_order(rng):
    image = rng.integers(0, 236, size=(64, 64), dtype=np.uint16)
    out = to_rgb_uint8(image)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    gray = out[..., 0]
    assert gray.min() == 0 and gray.max() == 255
    # Intensity order is preserved: brighter input is never darker output.
    order = np.argsort(image.ravel(), kind="stable")
    assert np.all(np.diff(gray.ravel()[order].astype(int)) >= 0)


def test_float_with_nan_and_inf():
    image = np.linspace(0.0, 1.0, 100, dtype=np.float32).reshape(10, 10)
    image[0, 0] = np.nan
    image[0, 1] = np.inf
    image[0, 2] = -np.inf
    out = to_rgb_uint8(image)[..., 0]
    assert out[0, 0] == 0
    assert out[0, 1] == 255
    assert out[0, 2] == 0
    assert out[9, 9] == 255


def test_two_channels_become_red_and_green_with_black_blue():
    image = np.zeros((8, 8, 2), dtype=np.float32)
    image[..., 0] = 1.0  # bright first channel
    image[:4, :, 1] = 1.0  # second channel bright in the top half
    out = to_rgb_uint8(image)
    assert out.shape == (8, 8, 3)
    assert np.all(out[..., 0] == 255)
    assert np.all(out[:4, :, 1] == 255) and np.all(out[4:, :, 1] == 0)
    assert np.all(out[..., 2] == 0)


def test_five_channels_on_last_axis_are_refused_as_a_stack():
    image = np.zeros((16, 16, 5), dtype=np.uint16)
    with pytest.raises(ValueError, match="slice"):
        to_rgb_uint8(image)


def test_five_channels_with_channel_axis_keep_the_first_three():
    image = np.zeros((5, 8, 8), dtype=np.uint8)
    for c in range(5):
        image[c] = 10 * (c + 1)
    out = to_rgb_uint8(image, channel_axis=0)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])


def test_channels_first_input_with_channel_axis_zero():
    cyx = np.zeros((3, 6, 7), dtype=np.uint8)
    cyx[0], cyx[1], cyx[2] = 1, 2, 3
    out = to_rgb_uint8(cyx, channel_axis=0)
    assert out.shape == (6, 7, 3)
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out[3, 4], [1, 2, 3])


def test_rgb_non_uint8_shares_one_scale_across_channels():
    image = np.zeros((10, 10, 3), dtype=np.uint16)
    image[..., 0] = 1000
    image[..., 1] = 500
    image[..., 2] = 0
    out = to_rgb_uint8(image)
    # Red stays brighter than green (colours are not stretched independently).
    assert out[0, 0, 0] == 255
    assert out[0, 0, 1] == 128
    assert out[0, 0, 2] == 0


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64, np.int32, bool])
def test_constant_image_gives_zeros_without_warnings(dtype):
    image = np.full((12, 12), 7, dtype=dtype)
    out = to_rgb_uint8(image)
    assert out.shape == (12, 12, 3)
    assert not out.any()


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_nearly_constant_image_falls_back_to_min_max():
    image = np.zeros((100, 100), dtype=np.float32)
    image[0, 0] = 1.0  # one bright pixel, below the robust percentiles
    out = to_rgb_uint8(image)
    assert out[0, 0, 0] == 255
    assert out[1:, 1:].max() == 0


def test_bool_mask_becomes_black_and_white():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 3:7] = True
    out = to_rgb_uint8(mask)
    np.testing.assert_array_equal(out[..., 1], np.where(mask, 255, 0))


def test_4d_input_error_mentions_number_of_dimensions():
    with pytest.raises(ValueError, match="4 dimensions"):
        to_rgb_uint8(np.zeros((2, 3, 16, 16), dtype=np.uint16))


def test_zyx_stack_is_refused_with_a_message_about_slices():
    stack = np.zeros((10, 64, 64), dtype=np.uint16)
    with pytest.raises(ValueError, match=r"stack.*slice"):
        to_rgb_uint8(stack)
    # ... but a single slice of it is fine.
    assert to_rgb_uint8(stack[0]).shape == (64, 64, 3)


@pytest.mark.parametrize("shape", [(0, 10), (10, 0), (5, 5, 0), (0, 5, 3)])
def test_empty_array_is_refused(shape):
    with pytest.raises(ValueError, match="empty"):
        to_rgb_uint8(np.zeros(shape, dtype=np.float32))


def test_all_nan_or_inf_is_refused():
    image = np.full((8, 8), np.nan)
    image[0, 0] = np.inf
    with pytest.raises(ValueError, match="finite"):
        to_rgb_uint8(image)


@pytest.mark.parametrize("dtype", [np.complex64, object])
def test_unsupported_dtypes_raise_type_error(dtype):
    with pytest.raises(TypeError, match="dtype"):
        to_rgb_uint8(np.zeros((8, 8), dtype=dtype))


@pytest.mark.parametrize("shape", [(1, 10), (10, 1), (1, 10, 3)])
def test_too_small_image_is_refused(shape):
    with pytest.raises(ValueError, match="too small"):
        to_rgb_uint8(np.zeros(shape, dtype=np.uint8))


def test_bad_channel_axis_is_refused():
    with pytest.raises(ValueError, match="channel_axis"):
        to_rgb_uint8(np.zeros((3, 8, 8), dtype=np.uint8), channel_axis=3)
    with pytest.raises(ValueError, match="2D"):
        to_rgb_uint8(np.zeros((8, 8), dtype=np.uint8), channel_axis=0)


def test_percentile_range_ignores_non_finite_values():
    image = np.arange(100, dtype=np.float64).reshape(10, 10)
    image[0, :3] = [np.nan, np.inf, -np.inf]
    lo, hi = percentile_range(image, (0.0, 100.0))
    assert (lo, hi) == (3.0, 99.0)


def test_percentile_range_large_image_is_subsampled_and_deterministic(rng):
    image = rng.integers(0, 4096, size=(2048, 2048), dtype=np.uint16)
    assert image.size > MAX_PERCENTILE_PIXELS
    first = percentile_range(image, (1.0, 99.8))
    assert first == percentile_range(image, (1.0, 99.8))
    exact = np.percentile(image, [1.0, 99.8])
    np.testing.assert_allclose(first, exact, rtol=0.02)


def test_invalid_percentiles_are_refused():
    with pytest.raises(ValueError, match="Percentiles"):
        to_rgb_uint8(np.zeros((8, 8), dtype=np.float32), percentiles=(50.0, 10.0))
