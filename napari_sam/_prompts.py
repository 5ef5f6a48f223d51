"""Prompts read from napari layers, as SAM's XY coordinates of one slice of the image layer.

napari's coordinates are (z, y, x) world coordinates; every prompt is mapped through world space
into the image layer's pixel grid, so layer scale and translate are respected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POSITIVE, NEGATIVE = 1, 0


@dataclass(frozen=True)
class SlicePrompts:
    """Prompts of one slice in SAM's convention.

    Attributes:
        points: (N, 2) XY pixel coordinates.
        labels: (N,) 1 for positive, 0 for negative clicks.
        box: (4,) XYXY box, or None.
        mask: (H, W) bool mask painted with the brush, or None.
        open_shapes: Lines and paths drawn on the slice, which are not prompts.
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None
    mask: np.ndarray | None = None
    open_shapes: int = 0

    @property
    def empty(self) -> bool:
        return len(self.points) == 0 and self.box is None and self.mask is None

    def decoder_box(self) -> np.ndarray | None:
        """The box to decode: the one drawn, else the bounding box of the painted mask."""
        if self.box is not None or self.mask is None:
            return self.box
        ys, xs = np.nonzero(self.mask)
        return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def spatial_ndim(image_layer) -> int:
    """The number of spatial axes of an image layer: 2 (YX) or 3 (ZYX), an RGB colour axis left out.

    Counted on the data, since napari versions differ in whether `layer.ndim` counts the colour axis.
    """
    return np.ndim(image_layer.data) - (1 if image_layer.rgb else 0)


def pixel_data(image_layer):
    """The image layer's pixels: the full-resolution level of a multiscale (pyramid) image.

    The other layers (prompts, preview, objects) have the full resolution's shape, and numpy would
    read a pyramid as its coarsest level.
    """
    return image_layer.data[0] if image_layer.multiscale else image_layer.data


def to_image_pixels(layer, image_layer, coords: np.ndarray) -> np.ndarray:
    """Map (N, D) data coordinates of `layer` to the image layer's (N, D) pixel coordinates."""
    coords = np.atleast_2d(np.asarray(coords, dtype=float))
    if len(coords) == 0:
        return coords.reshape(0, image_layer.ndim)
    world = np.array([layer.data_to_world(c) for c in coords])
    return np.array([image_layer.world_to_data(w) for w in world])


def slice_prompts(points_layer, shapes_layer, image_layer, z: int | None, brush_layer=None) -> SlicePrompts:
    """The clicks, the last box and the painted mask of slice z (None for a 2D image).

    Args:
        points_layer: Points with a `label` feature (1 positive, 0 negative).
        shapes_layer: Shapes; a rectangle, ellipse or polygon is a box, its bounding box (the last
            one drawn on the slice counts).
        image_layer: The image being segmented (2D, RGB or 3D).
        z: The slice index for a stack.
        brush_layer: Labels on the image's pixel grid (same spatial shape); any painted pixel counts.
    """
    points, labels = _points_on_slice(points_layer, image_layer, z)
    box, open_shapes = _box_on_slice(shapes_layer, image_layer, z)
    return SlicePrompts(points, labels, box, _mask_on_slice(brush_layer, z), open_shapes)


def _on_slice(pixels: np.ndarray, z: int | None) -> np.ndarray:
    if z is None:
        return np.ones(len(pixels), dtype=bool)
    return np.round(pixels[:, 0]).astype(int) == z


def _points_on_slice(points_layer, image_layer, z: int | None) -> tuple[np.ndarray, np.ndarray]:
    if points_layer is None or len(points_layer.data) == 0:
        return np.zeros((0, 2)), np.zeros(0, dtype=int)
    pixels = to_image_pixels(points_layer, image_layer, points_layer.data)
    labels = np.asarray(points_layer.features["label"], dtype=int)
    keep = _on_slice(pixels, z)
    yx = pixels[keep][:, -2:]
    return yx[:, ::-1].copy(), labels[keep]


# Shapes that enclose an object: their bounding box is the box prompt. Lines and paths enclose nothing.
CLOSED_SHAPES = ("rectangle", "ellipse", "polygon")


def _box_on_slice(shapes_layer, image_layer, z: int | None) -> tuple[np.ndarray | None, int]:
    """The bounding box of the last closed shape drawn on slice z, and how many lines or paths are there."""
    if shapes_layer is None:
        return None, 0
    box, open_shapes = None, 0
    for vertices, kind in zip(shapes_layer.data, shapes_layer.shape_type):
        pixels = to_image_pixels(shapes_layer, image_layer, vertices)
        if not _on_slice(pixels, z).all():
            continue
        if kind not in CLOSED_SHAPES:
            open_shapes += 1
            continue
        ys, xs = pixels[:, -2], pixels[:, -1]
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
    return box, open_shapes


def _mask_on_slice(brush_layer, z: int | None) -> np.ndarray | None:
    if brush_layer is None:
        return None
    painted = np.asarray(brush_layer.data if z is None else brush_layer.data[z]) > 0
    return painted if painted.any() else None
