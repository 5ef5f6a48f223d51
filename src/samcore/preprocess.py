"""Turn arbitrary microscopy images into the uint8 RGB images SAM expects.

Channel rule (applied after an optional ``channel_axis`` is moved last):

* ``(Y, X)``: grayscale, replicated to three identical channels.
* ``(Y, X, 1)``: grayscale, as above.
* ``(Y, X, 2)``: channel 0 becomes red, channel 1 green, blue is zero.
* ``(Y, X, 3)``: used as RGB.
* ``(Y, X, 4)``: RGBA; the alpha channel is dropped.
* ``(Y, X, C)`` with ``C > 4``: only reachable with an explicit
  ``channel_axis``; the first three channels become R, G and B. To show other
  channels, select them yourself before calling.

Without ``channel_axis``, a 3D array is read as ``(Y, X, C)`` only when its last
axis has at most 4 entries. Otherwise it looks like a ``(Z, Y, X)`` stack or a
channels-first image and is refused: pass one 2D slice, or give
``channel_axis``.

Intensities: uint8 data is kept exactly as is. Any other dtype is stretched to
0..255 with one pair of robust percentiles shared by all channels, so the
colour balance between channels is preserved.
"""

from __future__ import annotations

import math

import numpy as np

#: Images with more pixels (Y * X) than this are subsampled on a regular
#: stride when estimating percentiles.
MAX_PERCENTILE_PIXELS = 4_000_000

_SUPPORTED_KINDS = "buif"  # bool, unsigned int, signed int, float


def percentile_range(
    image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.8)
) -> tuple[float, float]:
    """Return robust low/high intensity values, ignoring NaN and +/-inf.

    If the image has more than ``MAX_PERCENTILE_PIXELS`` pixels (``Y * X``), the
    percentiles are computed on the regular grid ``image[::s, ::s]`` with
    ``s = ceil(sqrt(Y * X / MAX_PERCENTILE_PIXELS))``, which keeps about that
    many pixels. No randomness is involved, so results are deterministic.

    Args:
        image: Real-valued array, usually ``(Y, X)`` or ``(Y, X, C)``; for
            ``(Y, X, C)`` all channels are pooled.
        percentiles: ``(low, high)`` percentiles, ``0 <= low < high <= 100``.

    Returns:
        ``(lo, hi)`` as Python floats, with ``lo <= hi``.

    Raises:
        TypeError: For complex, object or other non-numeric dtypes.
        ValueError: If ``percentiles`` is invalid or the image holds no finite
            value.
    """
    p_low, p_high = _check_percentiles(percentiles)
    data = np.asarray(image)
    _check_dtype(data)
    sample = _finite_values(_subsample(data))
    if sample.size == 0:  # the grid may have missed the few finite pixels
        sample = _finite_values(data)
    if sample.size == 0:
        raise ValueError(
            f"The image ({data.dtype}) contains no finite values: every pixel is NaN or infinite."
        )
    lo, hi = np.percentile(sample, [p_low, p_high])
    return float(lo), float(hi)


def to_rgb_uint8(
    image: np.ndarray,
    channel_axis: int | None = None,
    percentiles: tuple[float, float] = (1.0, 99.8),
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Convert a 2D grayscale or ``(Y, X, C)`` image to SAM's uint8 RGB input.

    See the module docstring for the channel rule. uint8 values pass through
    unchanged. Other dtypes (bool, integers, floats) are scaled as
    ``round(clip((x - lo) / (hi - lo), 0, 1) * 255)`` where ``lo, hi`` come from
    :func:`percentile_range` over all kept channels. If ``hi <= lo`` the finite
    minimum and maximum are used instead; if those are equal too the result is
    all zeros. NaN and -inf map to 0, +inf to 255.

    Args:
        image: ``(Y, X)`` or ``(Y, X, C)`` array, or a 3D array with channels
            on ``channel_axis``. Each spatial side must be at least 2 pixels.
        channel_axis: Axis holding channels in a 3D input, e.g. ``0`` for
            ``(C, Y, X)``. ``None`` means ``(Y, X)`` or ``(Y, X, C<=4)``.
        percentiles: ``(low, high)`` percentiles used for non-uint8 data.
        value_range: ``(lo, hi)`` intensities mapped to 0 and 255 instead of
            this image's own percentiles; pass the range of a whole stack
            (from :func:`percentile_range`) so all its slices share one
            contrast.

    Returns:
        C-contiguous ``(Y, X, 3)`` uint8 array in RGB order.

    Raises:
        TypeError: For complex, object, string or other non-numeric dtypes.
        ValueError: For the wrong number of dimensions, empty or too-small
            images, an ambiguous 3D stack, an invalid ``channel_axis`` or
            ``percentiles``, or an image without any finite value.
    """
    data = np.asarray(image)
    _check_dtype(data)
    _check_percentiles(percentiles)
    kept = _to_yxc(data, channel_axis)
    if kept.dtype != np.uint8:
        kept = _scale_to_uint8(kept, percentiles, value_range)
    return _expand_to_rgb(kept)


def _check_dtype(data: np.ndarray) -> None:
    if data.dtype.kind not in _SUPPORTED_KINDS:
        raise TypeError(
            f"Cannot display an image of dtype {data.dtype} (shape {data.shape}); "
            "expected boolean, integer or real floating-point pixel values."
        )


def _check_percentiles(percentiles: tuple[float, float]) -> tuple[float, float]:
    p_low, p_high = (float(p) for p in percentiles)
    if not 0.0 <= p_low < p_high <= 100.0:
        raise ValueError(
            f"Percentiles must satisfy 0 <= low < high <= 100, got {percentiles}."
        )
    return p_low, p_high


def _to_yxc(data: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """Validate the shape and return the kept ``(Y, X, C)`` channels, C <= 3."""
    desc = f"shape {data.shape}, dtype {data.dtype}"
    if data.ndim not in (2, 3):
        raise ValueError(
            f"The image has {data.ndim} dimensions ({desc}), but SAM needs a "
            "single 2D slice (Y, X) or a colour image (Y, X, C). Select one "
            "slice (e.g. one time point, Z plane or channel set) first."
        )
    if data.size == 0:
        raise ValueError(f"The image is empty ({desc}): one of its axes has length 0.")
    if data.ndim == 2:
        if channel_axis is not None:
            raise ValueError(
                f"channel_axis={channel_axis} was given, but the image is 2D ({desc})."
            )
        data = data[:, :, np.newaxis]
    elif channel_axis is not None:
        if not -3 <= channel_axis <= 2:
            raise ValueError(
                f"channel_axis={channel_axis} is out of range for a 3D image ({desc})."
            )
        data = np.moveaxis(data, channel_axis, -1)
    elif data.shape[-1] > 4:
        raise ValueError(
            f"The 3D image ({desc}) looks like a stack of slices (Z, Y, X), not a "
            "colour image: its last axis has more than 4 entries. Pass one 2D "
            "slice at a time, or set channel_axis if one axis holds channels."
        )
    if data.shape[0] < 2 or data.shape[1] < 2:
        raise ValueError(
            f"The image is too small ({desc}): each side must be at least 2 pixels."
        )
    return data[..., :3] if data.shape[-1] > 2 else data


def _expand_to_rgb(data: np.ndarray) -> np.ndarray:
    """Map uint8 ``(Y, X, C)`` with C in 1..3 to contiguous ``(Y, X, 3)``."""
    n_channels = data.shape[-1]
    if n_channels == 1:
        return np.repeat(data, 3, axis=-1)
    if n_channels == 2:
        blue = np.zeros(data.shape[:2] + (1,), dtype=data.dtype)
        return np.concatenate([data, blue], axis=-1)
    return np.ascontiguousarray(data)


def _scale_to_uint8(
    rgb: np.ndarray, percentiles: tuple[float, float], value_range: tuple[float, float] | None
) -> np.ndarray:
    """Stretch a non-uint8 ``(Y, X, C)`` array to uint8 with shared limits."""
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
    else:
        lo, hi = percentile_range(rgb, percentiles)
    if hi <= lo and value_range is None:
        finite = _finite_values(rgb)
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(rgb.shape, dtype=np.uint8)
    # float32 is exact for 8/16-bit data; wider types keep float64 precision.
    work = np.float32 if rgb.dtype.itemsize <= 2 else np.float64
    values = rgb.astype(work)
    if rgb.dtype.kind == "f":
        values[np.isnan(values)] = lo
    values -= lo
    values *= 255.0 / (hi - lo)
    np.clip(values, 0.0, 255.0, out=values)
    np.rint(values, out=values)
    return values.astype(np.uint8)


def _subsample(data: np.ndarray) -> np.ndarray:
    """Regular-grid subsample of the first two axes of large images."""
    if data.ndim < 2:
        return data
    n_pixels = data.shape[0] * data.shape[1]
    if n_pixels <= MAX_PERCENTILE_PIXELS:
        return data
    stride = math.ceil(math.sqrt(n_pixels / MAX_PERCENTILE_PIXELS))
    return data[::stride, ::stride]


def _finite_values(data: np.ndarray) -> np.ndarray:
    """Flat float64 array of the finite values of ``data``."""
    if data.dtype.kind == "f":
        return data[np.isfinite(data)].astype(np.float64)
    return data.ravel().astype(np.float64)


def resize_uint8(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear, antialiased resize of a (H, W, 3) uint8 image to (h, w), as PIL does it."""
    from PIL import Image

    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.array(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))
