"""Synthetic fluorescence nuclei with exact instance labels, for samples, tests and demos."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nuclei_image(
    shape: tuple[int, int] = (256, 256), n_nuclei: int = 12, radius: tuple[float, float] = (8.0, 20.0), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A 2D image of bright, textured, non-overlapping elliptical nuclei on a dim background.

    Args:
        shape: (Y, X) of the image.
        n_nuclei: How many nuclei to try to place (fewer if they do not fit).
        radius: Range of the nuclei's semi-axes in pixels.
        seed: Random seed.

    Returns:
        (Y, X) uint16 image and (Y, X) uint16 instance labels (0 background, 1..n nuclei).
    """
    volume, labels = nuclei_stack((1, *shape), n_nuclei, radius, seed, z_radius=(1e6, 1e6))
    return volume[0], labels[0]


def nuclei_stack(
    shape: tuple[int, int, int] = (32, 256, 256),
    n_nuclei: int = 12,
    radius: tuple[float, float] = (8.0, 20.0),
    seed: int = 0,
    z_radius: tuple[float, float] | None = None,
    max_overlap: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A (Z, Y, X) stack of ellipsoidal nuclei that begin and end within the stack.

    Args:
        shape: (Z, Y, X) of the stack.
        n_nuclei: How many nuclei to try to place.
        radius: Range of the in-plane semi-axes in pixels.
        seed: Random seed.
        z_radius: Range of the axial semi-axes in slices; default a quarter of Z to a third.
        max_overlap: 0 keeps nuclei at least 2 pixels apart. Above 0, a crowded field: nuclei
            touch and press into each other, each over at most this fraction of its voxels; the
            nucleus placed first keeps the shared voxels.

    Returns:
        (Z, Y, X) uint16 image and (Z, Y, X) uint16 instance labels.
    """
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    if z_radius is None:
        z_radius = (depth / 4, depth / 3)
    labels = np.zeros(shape, dtype=np.uint16)
    zz, yy, xx = np.meshgrid(np.arange(depth), np.arange(height), np.arange(width), indexing="ij")
    placed = 0
    for _ in range(n_nuclei * 20):
        if placed == n_nuclei:
            break
        ry, rx = rng.uniform(*radius, size=2)
        rz = rng.uniform(*z_radius)
        cy, cx = rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)
        cz = (depth - 1) / 2 if depth == 1 else rng.uniform(min(rz, depth / 2), max(depth - rz, depth / 2))
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dy * np.cos(angle) + dx * np.sin(angle)
        v = -dy * np.sin(angle) + dx * np.cos(angle)
        inside = (u / ry) ** 2 + (v / rx) ** 2 + ((zz - cz) / rz) ** 2 <= 1.0
        if inside.sum() < 20:
            continue
        if max_overlap > 0:
            if (labels[inside] > 0).mean() > max_overlap:
                continue
            inside &= labels == 0
        else:
            grown = ndimage.binary_dilation(inside, iterations=2) if depth > 1 else _dilate2d(inside)
            if (labels[grown] > 0).any():
                continue
        placed += 1
        labels[inside] = placed
    return _render(labels, rng), labels


def _dilate2d(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(mask[0], iterations=2)[None]


def _render(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fluorescence-like intensities: per-nucleus brightness, texture, blur, background, noise."""
    brightness = rng.uniform(0.5, 1.0, size=int(labels.max()) + 1)
    brightness[0] = 0.0
    signal = brightness[labels]
    texture = ndimage.gaussian_filter(rng.normal(size=labels.shape), 1.5)
    signal = signal * (1 + 0.8 * texture / (texture.std() + 1e-9)).clip(0.3, None)
    sigma = (0.0, 1.2, 1.2) if labels.shape[0] == 1 else (1.0, 1.2, 1.2)
    signal = ndimage.gaussian_filter(signal, sigma)
    background = 0.08 + 0.04 * np.linspace(0, 1, labels.shape[-1])[None, None, :]
    counts = rng.poisson((signal + background) * 400.0)
    return counts.clip(0, np.iinfo(np.uint16).max).astype(np.uint16)
