"""SAM's prompts, checked against the image they are for, with errors that say what is wrong.

Coordinates are SAM's: points (x, y) and boxes (x0, y0, x1, y1) in pixels of the original image.
"""

from __future__ import annotations

import numpy as np
import torch

POINT_LABELS = (1, 0, -1)  # on the object, background, a point to ignore (SAM's padding)


def check_points(
    point_coords: np.ndarray, point_labels: np.ndarray | None, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) float64 points and (N,) labels, checked for a (height, width) image."""
    coords = np.asarray(point_coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0:
        raise ValueError(f"point_coords must be an (N, 2) array of (x, y) points, not shape {coords.shape}.")
    if point_labels is None:
        raise ValueError("point_labels are needed with point_coords (1 = foreground, 0 = background).")
    labels = np.asarray(point_labels)
    if labels.shape != (len(coords),):
        raise ValueError(
            f"point_labels must hold one label per point: {len(coords)} points, labels {labels.shape}."
        )
    unknown = ~np.isin(labels, POINT_LABELS) if labels.dtype.kind in "biuf" else np.ones(len(labels), bool)
    if unknown.any():
        raise ValueError(
            f"Point labels are 1 (on the object) or 0 (background), or -1 for a point to ignore, "
            f"not {labels[np.argmax(unknown)]!r}."
        )
    if not np.all(np.isfinite(coords)):
        raise ValueError("point_coords contain NaN or infinite values.")
    outside = (coords[:, 0] < 0) | (coords[:, 0] > width) | (coords[:, 1] < 0) | (coords[:, 1] > height)
    if outside.any():
        x, y = coords[np.argmax(outside)]
        raise ValueError(f"The point (x={x:g}, y={y:g}) lies outside the {width}x{height} image.")
    return coords, labels


def check_box(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (1, 4) float64 XYXY box, checked for a (height, width) image."""
    array = np.asarray(box, dtype=np.float64).reshape(-1)
    if array.shape != (4,) or not np.all(np.isfinite(array)):
        raise ValueError(f"box must be 4 finite numbers (x0, y0, x1, y1), not {np.asarray(box)!r}.")
    x0, y0, x1, y1 = array
    if x1 < x0 or y1 < y0:
        raise ValueError(f"The box {array.tolist()} is inverted: it needs x0 <= x1 and y0 <= y1.")
    if x1 < 0 or y1 < 0 or x0 > width or y0 > height:
        raise ValueError(f"The box {array.tolist()} lies outside the {width}x{height} image.")
    return array[None]


def check_mask_input(mask_input: np.ndarray, side: tuple[int, int]) -> torch.Tensor:
    """A (1, 1, *side) float32 tensor of the (1, *side) or (*side) low-resolution logits of a previous
    prediction."""
    array = np.asarray(mask_input, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.shape != (1, *side):
        raise ValueError(
            f"mask_input must be the (1, {side[0]}, {side[1]}) low-resolution logits of a previous "
            f"prediction, not an array of shape {array.shape}."
        )
    if not np.all(np.isfinite(array)):  # the decoder would return NaN scores and empty masks
        raise ValueError(
            "mask_input contains NaN or infinite values: pass the logits of a previous prediction."
        )
    return torch.as_tensor(array)[None]
