"""Space-filling cell tilings (epithelia, EM sections): warped Voronoi cells and their membranes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .optics import smooth_noise


def voronoi_cells(
    rng: np.random.Generator, shape: tuple[int, int], diameter: float, regularity: float
) -> np.ndarray:
    """Label every pixel with its nearest seed after a smooth random warp (curved cell walls).

    Args:
        rng: Random generator.
        shape: (H, W) of the scene.
        diameter: Typical cell diameter in pixels.
        regularity: 0 places seeds at random (irregular sizes), 1 on a jittered hexagonal grid.

    Returns:
        (H, W) int32 cell ids from 1, every pixel belonging to a cell.
    """
    height, width = shape
    seeds = _seeds(rng, shape, diameter, regularity)
    coarse = (max(2, height // 2), max(2, width // 2))  # nearest-seed search at half resolution
    seed_image = np.zeros(coarse, dtype=np.int32)
    rows = np.clip((seeds[:, 0] / 2).astype(int), 0, coarse[0] - 1)
    cols = np.clip((seeds[:, 1] / 2).astype(int), 0, coarse[1] - 1)
    seed_image[rows, cols] = np.arange(1, len(seeds) + 1)
    _, (near_r, near_c) = ndimage.distance_transform_edt(seed_image == 0, return_indices=True)
    cells = seed_image[near_r, near_c]
    amplitude = rng.uniform(0.0, 0.25) * diameter / 2
    cells_per_side = int(np.clip(max(height, width) / diameter, 2, 24))
    warp_y = amplitude * smooth_noise(rng, shape, cells_per_side)
    warp_x = amplitude * smooth_noise(rng, shape, cells_per_side)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    coords = np.stack([(yy + warp_y) / 2, (xx + warp_x) / 2])
    return ndimage.map_coordinates(cells, coords, order=0, mode="nearest").astype(np.int32)


def membrane_distance(cells: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the nearest wall between two cells.

    Args:
        cells: (H, W) int cell ids.

    Returns:
        (H, W) float32 distance in pixels; walls lie between pixels, so the pixels on either
        side of a wall are at 0.5.
    """
    wall = np.zeros(cells.shape, dtype=bool)
    down = cells[1:, :] != cells[:-1, :]
    right = cells[:, 1:] != cells[:, :-1]
    wall[1:, :] |= down
    wall[:-1, :] |= down
    wall[:, 1:] |= right
    wall[:, :-1] |= right
    return (ndimage.distance_transform_edt(~wall) + 0.5).astype(np.float32)


def tissue_region(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A large smooth region (the part of the field covered by tissue).

    Returns:
        (H, W) bool, True inside the tissue; covers roughly 40-90 % of the field.
    """
    field = smooth_noise(rng, shape, int(rng.integers(2, 5)))
    return field > np.quantile(field, rng.uniform(0.1, 0.6))


def _seeds(
    rng: np.random.Generator, shape: tuple[int, int], diameter: float, regularity: float
) -> np.ndarray:
    """Cell centres (N, 2) as (row, column): a hexagonal grid jittered more the less regular."""
    height, width = shape
    spacing = max(diameter, 4.0)
    rows = np.arange(-spacing, height + spacing, spacing * 0.866)
    cols = np.arange(-spacing, width + spacing, spacing)
    ys = np.repeat(rows, cols.size)
    xs = np.tile(cols, rows.size) + (spacing / 2) * (np.repeat(np.arange(rows.size), cols.size) % 2)
    grid = np.stack([ys, xs], axis=1)
    jitter = (1.0 - regularity) * 0.5 + 0.12
    grid = grid + rng.normal(0, jitter * spacing, grid.shape)
    inside = (grid[:, 0] >= 0) & (grid[:, 0] < height) & (grid[:, 1] >= 0) & (grid[:, 1] < width)
    return grid[inside]
