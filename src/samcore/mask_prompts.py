"""Prompts for the next slice, derived from an object's mask on the previous one.

Modes (see `prompt_from_mask`):

* ``"box+mask"``: the mask's bounding box, widened by a margin, plus the previous slice's
  low-resolution logits as the mask input;
* ``"box"``: the widened bounding box alone (the fastest: no mask input to encode);
* ``"points"``: positive points deep inside the mask (maxima of its distance transform) and
  negative points on a ring around it.

Prompts come from the mask's main part (`main_part`): SAM's masks often carry stray specks far
from the object, and one of them would stretch the bounding box over half the image.

Points are (x, y) and boxes (x0, y0, x1, y1), in pixels, as in the engine.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .slice_decoder import SlicePrompt

MODES = ("box+mask", "box", "points")
#: The mode used unless another is chosen: the one `benchmarks/bench_propagation.py` measures best
#: (mean per-object 3D IoU) with the bundled model on generated stacks of touching nuclei.
DEFAULT_MODE = "box+mask"
#: Pieces of a mask smaller than this fraction of its largest piece are stray specks (`main_part`).
MIN_PIECE = 0.2


def main_part(mask: np.ndarray, min_piece: float = MIN_PIECE) -> np.ndarray:
    """A (Y, X) bool mask without its specks: the pieces under `min_piece` times the largest one's area.

    Pieces are 8-connected; a mask with one piece (or none) comes back unchanged.
    """
    pieces, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count < 2:
        return mask
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    keep = sizes >= min_piece * sizes.max()
    return keep[pieces]


def bounding_box(mask: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """XYXY box of a (Y, X) bool mask's pixels, widened on each side by `margin` times its size.

    Returns:
        (4,) float box, inclusive pixel coordinates, clipped to the image.

    Raises:
        ValueError: The mask is empty.
    """
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        raise ValueError("An empty mask has no bounding box.")
    y0, y1, x0, x1 = rows.min(), rows.max(), cols.min(), cols.max()
    pad_y, pad_x = margin * (y1 - y0 + 1), margin * (x1 - x0 + 1)
    height, width = mask.shape
    return np.array(
        [max(x0 - pad_x, 0.0), max(y0 - pad_y, 0.0), min(x1 + pad_x, width - 1.0), min(y1 + pad_y, height - 1.0)]
    )


def interior_points(mask: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` points deep inside a (Y, X) mask, deepest first.

    The first is the maximum of the distance to the mask's edge (the image border counts as an
    edge); each next one is the deepest pixel outside the inscribed discs of those chosen, kept
    while it is at least half as deep as the first.

    Returns:
        (K, 2) float XY points, K <= count (0 for an empty mask).
    """
    if count <= 0 or not mask.any():
        return np.zeros((0, 2))
    crop, (top, left) = _crop(mask, pad=1)
    depth = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
    first = depth.max()
    yy, xx = np.indices(depth.shape)
    points = []
    while len(points) < count:
        y, x = np.unravel_index(np.argmax(depth), depth.shape)
        radius = depth[y, x]
        if radius <= 0 or radius < 0.5 * first:
            break
        points.append((x + left, y + top))
        depth[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = 0
    return np.array(points, dtype=float).reshape(-1, 2)


def surrounding_points(mask: np.ndarray, count: int, distance: float | None = None) -> np.ndarray:
    """Up to `count` points around a (Y, X) mask, at `distance` from it, spread over directions.

    Args:
        mask: The object's mask.
        count: How many points: directions evenly spaced around the mask's centroid, starting along +x.
        distance: Pixels between the mask and the points; by default a third of the radius of the
            disc of the mask's area, and at least 2.

    Returns:
        (K, 2) float XY points, K <= count (fewer where the ring leaves the image).
    """
    area = int(mask.sum())
    if area == 0 or count <= 0:
        return np.zeros((0, 2))
    if distance is None:
        distance = max(2.0, np.sqrt(area / np.pi) / 3)
    crop, (top, left) = _crop(mask, pad=int(np.ceil(distance)) + 2)
    away = ndimage.distance_transform_edt(~crop)
    ring_y, ring_x = np.nonzero((away >= distance) & (away < distance + 1.5))
    if len(ring_y) == 0:
        return np.zeros((0, 2))
    cy, cx = ndimage.center_of_mass(crop)
    angles = np.arctan2(ring_y - cy, ring_x - cx)
    points = []
    for target in 2 * np.pi * np.arange(count) / count:
        gap = np.abs(np.angle(np.exp(1j * (angles - target))))
        best = int(np.argmin(gap))
        if gap[best] < np.pi / count:  # a direction with no ring pixel (image border) gets no point
            points.append((ring_x[best] + left, ring_y[best] + top))
    return np.unique(np.array(points, dtype=float).reshape(-1, 2), axis=0)


def prompt_from_mask(
    mode: str,
    mask: np.ndarray,
    low_res: np.ndarray | None = None,
    box_margin: float = 0.1,
    positive_points: int = 3,
    negative_points: int = 4,
) -> SlicePrompt:
    """The prompt for the next slice from an object's (Y, X) bool mask on this one.

    Args:
        mode: One of `MODES`.
        mask: The object's non-empty mask; prompts come from its main part (`main_part`).
        low_res: This slice's low-resolution logits of the object (needed by "box+mask").
        box_margin: Widening of the box on each side, as a fraction of its size.
        positive_points: Most interior points ("points").
        negative_points: Most surrounding points ("points").
    """
    if mode not in MODES:
        raise ValueError(f"Unknown propagation mode {mode!r}; choose one of {', '.join(MODES)}.")
    mask = main_part(mask)
    if mode == "box+mask":
        if low_res is None:
            raise ValueError('The "box+mask" mode needs the low-resolution logits of the previous slice.')
        return SlicePrompt(box=bounding_box(mask, box_margin), mask_input=low_res)
    if mode == "box":
        return SlicePrompt(box=bounding_box(mask, box_margin))
    inside = interior_points(mask, positive_points)  # "points"
    outside = surrounding_points(mask, negative_points)
    labels = np.concatenate([np.ones(len(inside), np.int64), np.zeros(len(outside), np.int64)])
    return SlicePrompt(points=np.concatenate([inside, outside]), labels=labels)


def _crop(mask: np.ndarray, pad: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The mask's bounding region widened by `pad` (within the image), and its top-left corner."""
    rows, cols = np.nonzero(mask)
    top, left = max(int(rows.min()) - pad, 0), max(int(cols.min()) - pad, 0)
    bottom, right = min(int(rows.max()) + pad + 1, mask.shape[0]), min(int(cols.max()) + pad + 1, mask.shape[1])
    return np.asarray(mask[top:bottom, left:right], dtype=bool), (top, left)
