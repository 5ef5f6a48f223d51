"""Imaging effects for synthetic scenes: optics, uneven illumination, camera noise, file dtypes.

Everything works on float32 (H, W) "ideal signal" arrays whose objects have a brightness of
about 1, and ends in `to_raw`, which makes the uint8 / uint16 / float32 array a microscope
would have saved; `samcore.preprocess.to_rgb_uint8` then turns it into the model's input
exactly as at inference.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field of zero mean and unit standard deviation.

    Args:
        rng: Random generator.
        shape: (H, W) of the output.
        cells: Number of independent values along each side (the field's coarseness).

    Returns:
        (H, W) float32.
    """
    coarse = rng.standard_normal((cells + 2, cells + 2)).astype(np.float32)
    field = _interpolation(shape[0], cells + 2) @ coarse @ _interpolation(shape[1], cells + 2).T
    return (field - field.mean()) / (field.std() + 1e-6)


def band_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise low-passed at `sigma` pixels, normalised to unit standard deviation (float32)."""
    field = gaussian(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / (field.std() + 1e-6)


def gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a (H, W) float32 image; wide kernels run on a block-averaged copy.

    Above 4 px, the image is averaged over f x f blocks (f about sigma / 2), blurred there and
    interpolated back, which costs a fraction of a full-resolution blur and looks the same.
    """
    factor = int(sigma // 2) if sigma > 4 else 1
    height, width = image.shape
    if factor == 1 or height % factor or width % factor:
        return ndimage.gaussian_filter(image, sigma, truncate=3.0)
    small = image.reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, np.sqrt(max(sigma**2 / factor**2 - 1 / 12, 0.25)), truncate=3.0)
    return _upsample(small, factor)


def _upsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Linear interpolation of a (h, w) image to (h * factor, w * factor), pixel centres aligned."""
    height, width = image.shape
    rows = _linear(height * factor, height)
    cols = _linear(width * factor, width)
    return (rows @ image @ cols.T).astype(np.float32)


def _linear(out: int, inp: int) -> np.ndarray:
    """(out, inp) matrix of linear-interpolation weights between pixel-centre grids."""
    pos = np.clip((np.arange(out) + 0.5) * inp / out - 0.5, 0, inp - 1)
    low = np.floor(pos).astype(int)
    high = np.minimum(low + 1, inp - 1)
    frac = (pos - low).astype(np.float32)
    weights = np.zeros((out, inp), dtype=np.float32)
    np.add.at(weights, (np.arange(out), low), 1 - frac)
    np.add.at(weights, (np.arange(out), high), frac)
    return weights


def _interpolation(out: int, knots: int) -> np.ndarray:
    """(out, knots) smooth (Gaussian-kernel) interpolation weights from evenly spaced knots."""
    centres = (np.arange(knots, dtype=np.float32) - 0.5) / (knots - 2)
    pos = (np.arange(out, dtype=np.float32) + 0.5) / out
    weights = np.exp(-(((pos[:, None] - centres[None, :]) * (knots - 2) / 0.8) ** 2))
    return weights / weights.sum(axis=1, keepdims=True)


def illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Multiplicative illumination: vignetting, a linear gradient and slow unevenness.

    Computed on a coarse grid and interpolated, as it varies slowly.

    Returns:
        (H, W) float32 factor around 1 (between about 0.3 and 1.5).
    """
    coarse = (max(2, shape[0] // 8), max(2, shape[1] // 8))
    yy = np.linspace(-1.0, 1.0, coarse[0], dtype=np.float32)[:, None]
    xx = np.linspace(-1.0, 1.0, coarse[1], dtype=np.float32)[None, :]
    cy, cx = rng.uniform(-0.4, 0.4, 2)
    vignette = 1.0 - rng.uniform(0.0, 0.45) * ((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0
    angle = rng.uniform(0, 2 * np.pi)
    gradient = 1.0 + rng.uniform(0.0, 0.35) * (np.cos(angle) * xx + np.sin(angle) * yy)
    uneven = 1.0 + rng.uniform(0.0, 0.15) * smooth_noise(rng, coarse, int(rng.integers(2, 6)))
    factor = np.clip(vignette * gradient * uneven, 0.3, 1.5).astype(np.float32)
    return _linear(shape[0], coarse[0]) @ factor @ _linear(shape[1], coarse[1]).T


def background(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Additive background: an offset plus smooth haze (out-of-focus light, autofluorescence).

    Returns:
        (H, W) float32, non-negative, typically 0-0.4 of the objects' brightness.
    """
    level = rng.uniform(0.0, 0.25) ** 1.5
    haze = rng.uniform(0.0, 0.12) * np.abs(smooth_noise(rng, shape, int(rng.integers(3, 10))))
    return (level + haze).astype(np.float32)


def optical_blur(rng: np.random.Generator, signal: np.ndarray, scale: float) -> np.ndarray:
    """Point-spread blur plus, sometimes, a wide out-of-focus halo.

    Args:
        rng: Random generator.
        signal: (H, W) float32 ideal signal.
        scale: Typical object radius in pixels (blur stays small next to it).

    Returns:
        (H, W) float32 blurred signal.
    """
    sigma = rng.uniform(0.3, 1.0) * min(2.5, 0.5 + 0.12 * scale)
    blurred = gaussian(signal, sigma)
    if rng.random() < 0.4:
        width = rng.uniform(1.0, 3.0) * max(scale, 3.0)
        halo = gaussian(signal, min(width, 30.0))
        blurred = blurred + rng.uniform(0.05, 0.5) * halo
    return blurred


def add_specks(rng: np.random.Generator, signal: np.ndarray) -> None:
    """Add a few unlabelled bright specks (debris) to a (H, W) float32 signal, in place."""
    height, width = signal.shape
    count = int(rng.poisson(rng.uniform(0.0, 2e-4) * height * width))
    rows, cols = rng.integers(0, height - 1, count), rng.integers(0, width - 1, count)
    for dy in (0, 1):
        for dx in (0, 1):
            np.add.at(signal, (rows + dy, cols + dx), rng.uniform(0.2, 1.5, count).astype(np.float32))


def out_of_focus_blobs(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Unlabelled clutter: a few strongly blurred objects from other focal planes.

    Returns:
        (H, W) float32 additive signal, peaks around 0.1-1.
    """
    height, width = shape
    out = np.zeros(shape, dtype=np.float32)
    sigma = max(3.0, scale * rng.uniform(0.8, 2.0))
    for _ in range(int(rng.integers(1, 6))):
        y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
        out[y, x] += rng.uniform(0.3, 1.0) * 2 * np.pi * sigma**2
    return gaussian(out, sigma)


def photon_counts(rng: np.random.Generator, expected: np.ndarray, exact: bool) -> np.ndarray:
    """Photon counts of a (H, W) float32 expectation.

    Args:
        rng: Random generator.
        expected: Expected counts.
        exact: Draw Poisson counts; otherwise use the (faster) rounded normal approximation,
            good where objects collect tens of photons or more.
    """
    if exact:
        return rng.poisson(expected).astype(np.float32)
    noise = rng.standard_normal(expected.shape, dtype=np.float32)
    return np.maximum(np.rint(expected + np.sqrt(expected) * noise), 0.0)


def to_raw(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Simulate the camera: photon (Poisson) noise, read (Gaussian) noise, offset, bit depth.

    Args:
        rng: Random generator.
        image: (H, W) float32 expected intensity, objects around 1.

    Returns:
        (H, W) uint16 (counts, sometimes far below the full range), uint8 (sometimes saturated)
        or float32 (arbitrary units).
    """
    photons = 10.0 ** rng.uniform(1.0, 3.3)  # photons at brightness 1
    counts = photon_counts(rng, np.maximum(image, 0.0) * np.float32(photons), exact=photons < 30)
    counts += np.float32(rng.uniform(0.0, 3.0)) * rng.standard_normal(image.shape, dtype=np.float32)
    kind = rng.choice(3, p=[0.45, 0.4, 0.15])
    if kind == 0:  # 16-bit camera counts with a baseline
        gain = rng.uniform(0.5, 20.0)
        raw = counts * gain + rng.uniform(0.0, 600.0)
        return np.clip(np.rint(raw), 0, 65535).astype(np.uint16)
    if kind == 1:  # 8-bit export, full or partial range, sometimes clipped highlights
        top = np.percentile(counts[::4, ::4], 99.9) + 1e-6
        raw = counts / top * rng.uniform(60.0, 330.0) + rng.uniform(0.0, 30.0)
        return np.clip(np.rint(raw), 0, 255).astype(np.uint8)
    return (counts / photons * rng.uniform(0.01, 100.0)).astype(np.float32)
