"""Object geometry for synthetic scenes: star-convex blobs and (bent) rods, drawn in small windows.

Every shape is returned as a `Stamp`: a boolean mask in a window of the image plus a radial
coordinate (0 at the centre or medial axis, 1 on the outline) that the renderer turns into
intensity profiles (flat, domed, rimmed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

@dataclass(frozen=True)
class Stamp:
    """An object drawn in a window of the image.

    Attributes:
        top: Row of the window's first pixel in the image (may be negative before clipping).
        left: Column of the window's first pixel.
        mask: (h, w) bool, True inside the object.
        radial: (h, w) float32, 0 at the centre / medial axis rising to 1 on the outline
            (values above 1 lie outside).
    """

    top: int
    left: int
    mask: np.ndarray
    radial: np.ndarray


@dataclass(frozen=True)
class BlobSpec:
    """A star-convex blob: an ellipse whose radius is modulated by a few harmonics.

    Attributes:
        cy, cx: Centre in pixels (row, column).
        radius: Mean radius in pixels.
        aspect: Ratio of long to short axis (>= 1), area-preserving.
        angle: Orientation of the long axis in radians.
        harmonics: (K, 3) rows of (order k >= 2, relative amplitude, phase).
    """

    cy: float
    cx: float
    radius: float
    aspect: float
    angle: float
    harmonics: np.ndarray


@dataclass(frozen=True)
class RodSpec:
    """A capsule (bacterium-like rod) whose axis may bend along a parabola.

    Attributes:
        cy, cx: Centre in pixels.
        length: Length of the straight part of the axis in pixels.
        width: Diameter in pixels.
        angle: Orientation of the axis in radians.
        bend: Curvature coefficient: the axis is v = bend * u**2 in the rod's own frame (1/px).
    """

    cy: float
    cx: float
    length: float
    width: float
    angle: float
    bend: float


def blob_stamp(spec: BlobSpec) -> Stamp:
    """Rasterise a star-convex blob.

    Returns:
        The stamp; its window covers the whole blob plus a 1 px margin.
    """
    scale = np.sqrt(spec.aspect)
    reach = spec.radius * scale * (1.0 + float(np.abs(spec.harmonics[:, 1]).sum())) + 1.5
    yy, xx, top, left = _window(spec.cy, spec.cx, reach)
    cos, sin = np.cos(spec.angle), np.sin(spec.angle)
    along = (yy * sin + xx * cos) / scale
    across = (yy * cos - xx * sin) * scale
    rho = np.hypot(along, across)
    table = spec.radius * _modulation(spec.harmonics, _TABLE_ANGLES)
    bins = ((np.arctan2(across, along) + np.pi) * (_TABLE_SIZE / (2 * np.pi))).astype(np.intp)
    outline = table[np.minimum(bins, _TABLE_SIZE - 1)]
    radial = (rho / outline).astype(np.float32)
    return Stamp(top, left, radial <= 1.0, radial)


def rod_stamp(spec: RodSpec) -> Stamp:
    """Rasterise a (possibly bent) capsule.

    Returns:
        The stamp; its window covers the whole rod plus a 1 px margin.
    """
    half = spec.length / 2.0
    sag = abs(spec.bend) * half**2
    reach = half + spec.width / 2.0 + sag + 1.5
    yy, xx, top, left = _window(spec.cy, spec.cx, reach)
    cos, sin = np.cos(spec.angle), np.sin(spec.angle)
    along = yy * sin + xx * cos
    across = yy * cos - xx * sin - spec.bend * np.minimum(along**2, half**2) + spec.bend * half**2 / 3.0
    beyond = np.maximum(np.abs(along) - half, 0.0)
    radial = (np.hypot(beyond, across) / (spec.width / 2.0)).astype(np.float32)
    return Stamp(top, left, radial <= 1.0, radial)


def random_harmonics(rng: np.random.Generator, roughness: float, lobes: float) -> np.ndarray:
    """Harmonics for `BlobSpec`: smooth wobble plus, optionally, one dominant lobe order.

    Args:
        rng: Random generator.
        roughness: Amplitude of the wobble of orders 2..6 (0 gives an ellipse; ~0.05 nuclei,
            ~0.2 irregular cells).
        lobes: Amplitude of one extra order 3..6 (0 for none; 0.2-0.4 gives lobed shapes).

    Returns:
        (K, 3) array of (order, amplitude, phase).
    """
    orders = np.arange(2, 7, dtype=np.float64)
    amplitudes = roughness * rng.uniform(0.2, 1.0, orders.size) / (orders - 1.0)
    rows = [np.stack([orders, amplitudes, rng.uniform(0, 2 * np.pi, orders.size)], axis=1)]
    if lobes > 0:
        rows.append(np.array([[rng.integers(3, 7), lobes, rng.uniform(0, 2 * np.pi)]]))
    return np.concatenate(rows, axis=0)


_TABLE_SIZE = 256
# Centres of the angle bins of the outline table (blob outlines are looked up, not evaluated).
_TABLE_ANGLES = (np.arange(_TABLE_SIZE) + 0.5) * (2 * np.pi / _TABLE_SIZE) - np.pi


def _modulation(harmonics: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Relative outline radius at 1D angles `theta`: 1 + sum of harmonics, kept above 0.35."""
    orders, amplitudes, phases = (harmonics[:, i, None] for i in range(3))
    out = 1.0 + (amplitudes * np.cos(orders * theta[None] + phases)).sum(axis=0)
    return np.maximum(out, 0.35)


def _window(cy: float, cx: float, reach: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Pixel offsets (dy, dx) from the centre over a square window of half-side `reach`.

    Returns:
        dy (h, 1) and dx (1, w) float arrays (pixel centres minus the object centre), and the
        window's top-left corner.
    """
    top, left = int(np.floor(cy - reach)), int(np.floor(cx - reach))
    side = int(np.ceil(2 * reach)) + 2
    dy = (np.arange(top, top + side) - cy)[:, None]
    dx = (np.arange(left, left + side) - cx)[None, :]
    return dy, dx, top, left
