"""Placing objects on a canvas: where they go, and whether they may touch or overlap.

The canvas keeps an additive signal (overlapping fluorescent objects add up) and an instance
label image where the object drawn last owns the overlap. An object is refused when it would
hide too much of itself or of an object already there, so every label stays well visible.
"""

from __future__ import annotations

import numpy as np

from .shapes import Stamp


class Canvas:
    """Additive signal and instance labels being painted.

    Args:
        shape: (H, W) of the scene.
        max_overlap: Largest fraction of a new object, or of an existing one, that may be
            shared; 0 allows touching but no overlap.
    """

    def __init__(self, shape: tuple[int, int], max_overlap: float) -> None:
        self.signal = np.zeros(shape, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.int32)
        self.max_overlap = float(max_overlap)
        self._visible = [0]  # visible pixels per label id; index 0 unused

    @property
    def count(self) -> int:
        """Number of objects painted so far."""
        return len(self._visible) - 1

    def add(self, stamp: Stamp, profile: np.ndarray) -> bool:
        """Paint an object if the overlap rules allow it.

        Args:
            stamp: The object's mask and window.
            profile: (h, w) float32 intensity over the stamp's window (used inside the mask).

        Returns:
            True if the object was painted and given the next label id.
        """
        window, inner = self._clip(stamp)
        if window is None:
            return False
        mask = stamp.mask[inner]
        area = int(mask.sum())
        if area == 0:
            return False
        under = self.labels[window][mask]
        shared = under[under > 0]
        if shared.size > self.max_overlap * area:
            return False
        if shared.size:
            ids, counts = np.unique(shared, return_counts=True)
            visible = np.asarray(self._visible)[ids]
            if np.any(counts > self.max_overlap * visible):
                return False
            for label, lost in zip(ids, counts):
                self._visible[label] -= int(lost)
        self.signal[window] += np.where(mask, profile[inner], 0.0).astype(np.float32)
        self.labels[window][mask] = len(self._visible)
        self._visible.append(area)
        return True

    def _clip(self, stamp: Stamp) -> tuple[tuple[slice, slice] | None, tuple[slice, slice]]:
        """The part of the stamp's window inside the image, as (image slices, stamp slices)."""
        height, width = self.labels.shape
        h, w = stamp.mask.shape
        y0, x0 = max(stamp.top, 0), max(stamp.left, 0)
        y1, x1 = min(stamp.top + h, height), min(stamp.left + w, width)
        if y1 <= y0 or x1 <= x0:
            return None, (slice(0, 0), slice(0, 0))
        window = (slice(y0, y1), slice(x0, x1))
        inner = (slice(y0 - stamp.top, y1 - stamp.top), slice(x0 - stamp.left, x1 - stamp.left))
        return window, inner


def scatter(
    rng: np.random.Generator, shape: tuple[int, int], count: int, spacing: float, limit: int
) -> np.ndarray:
    """Candidate centres: uniform, clustered, or a jittered hexagonal grid (crowded tissue).

    Args:
        rng: Random generator.
        shape: (H, W) of the scene.
        count: How many centres a uniform or clustered layout draws.
        spacing: Typical centre-to-centre distance of neighbours for the grid layout (pixels).
        limit: At most this many centres; a grid with more keeps a colony of this many
            around a random point.

    Returns:
        (N, 2) float array of (row, column) centres in random order, N <= limit, some slightly
        outside the image so that objects are cut by its border.
    """
    height, width = shape
    layout = rng.choice(3, p=[0.45, 0.25, 0.3])
    if layout == 0:
        points = rng.uniform(-0.03, 1.03, (count, 2)) * (height, width)
    elif layout == 1:
        centres = rng.uniform(0, 1, (int(rng.integers(1, 6)), 2)) * (height, width)
        spread = rng.uniform(0.05, 0.25) * max(height, width)
        points = centres[rng.integers(0, len(centres), count)] + rng.normal(0, spread, (count, 2))
    else:
        points = _hex_grid(rng, shape, spacing)
        if len(points) > limit:
            centre = rng.uniform(0, 1, 2) * (height, width)
            nearest = np.argsort(((points - centre) ** 2).sum(axis=1))
            points = points[nearest[:limit]]
    return points[rng.permutation(len(points))][:limit]


def _hex_grid(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> np.ndarray:
    """Jittered hexagonal grid with a random orientation covering the whole (H, W) scene."""
    height, width = shape
    spacing = max(spacing, 3.0)
    reach = np.hypot(height, width) / 2 + spacing
    rows = np.arange(-reach, reach, spacing * 0.866)
    cols = np.arange(-reach, reach, spacing)
    ys = np.repeat(rows, cols.size)
    xs = np.tile(cols, rows.size) + (spacing / 2) * (np.repeat(np.arange(rows.size), cols.size) % 2)
    angle = rng.uniform(0, np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    grid = np.stack([ys * cos - xs * sin + height / 2, ys * sin + xs * cos + width / 2], axis=1)
    inside = (grid[:, 0] > -spacing) & (grid[:, 0] < height + spacing)
    inside &= (grid[:, 1] > -spacing) & (grid[:, 1] < width + spacing)
    grid = grid[inside]
    return grid + rng.normal(0, 0.15 * spacing, grid.shape)
