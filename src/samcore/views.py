"""Mirrored views: an image decoded together with its mirror images, prompts and logits mirrored too.

A `Predictor` with 2 or 4 views embeds the image and its mirror images (left to right, then top to
bottom and both); each prompt is mirrored into every view, decoded there, and the low-resolution
logits are mirrored back and averaged.
"""

from __future__ import annotations

import math

import torch

from .modeling import Sam
from .zoo import VIEWS

MIRRORS = ((False, False), (True, False), (False, True), (True, True))  # (x, y) reversed, per view


def check_views(views: int) -> int:
    """`views` if it is a number of views a predictor can decode (see `VIEWS`)."""
    if isinstance(views, bool) or views not in VIEWS:
        raise ValueError(f"views must be one of {', '.join(map(str, VIEWS))}, not {views!r}.")
    return int(views)


class Mirror:
    """One view's mirroring of prompts and low-resolution logits, in model-input coordinates.

    The image fills the top-left (h', w') of the model input; a view reverses its x and/or y axis
    within that area, the padding staying bottom-right. SAM places a point (x, y) at x + 0.5, so
    the mirror of x is w' - 1 - x. A low-resolution cell i has its centre mirrored to cell
    position c - 1 - i, c being the image's extent in cells (w' / 4 for SAM): a cell when c is
    whole, otherwise the linear blend of two neighbours (what the bilinear upscaling would read
    there). Mirroring twice gives back the logits exactly when c is whole.
    """

    def __init__(self, mirror_x: bool, mirror_y: bool, input_size: tuple[int, int], model: Sam) -> None:
        self.mirror_x, self.mirror_y = mirror_x, mirror_y
        self.input_size = input_size
        self.cell = model.img_size / model.prompt_encoder.mask_input_size[0]  # input pixels per cell

    def points(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) XY model-input points, mirrored."""
        if not (self.mirror_x or self.mirror_y):
            return coords
        out = coords.clone()
        if self.mirror_x:
            out[..., 0] = self.input_size[1] - 1 - coords[..., 0]
        if self.mirror_y:
            out[..., 1] = self.input_size[0] - 1 - coords[..., 1]
        return out

    def boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) XYXY model-input boxes, mirrored (corners reordered to stay XYXY)."""
        if not (self.mirror_x or self.mirror_y):
            return boxes
        corners = self.points(boxes.reshape(-1, 2, 2))
        return torch.cat([corners.amin(1), corners.amax(1)], dim=1)

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., S, S) low-resolution logits, mirrored (the padding cells are left as they are)."""
        if self.mirror_y:
            logits = _mirror_cells(logits, self.input_size[0] / self.cell, -2)
        if self.mirror_x:
            logits = _mirror_cells(logits, self.input_size[1] / self.cell, -1)
        return logits


def _mirror_cells(x: torch.Tensor, extent: float, dim: int) -> torch.Tensor:
    """`x` with its first `extent` cells along `dim` mirrored (see `Mirror`)."""
    whole = min(math.ceil(extent), x.shape[dim])
    region = x.narrow(dim, 0, whole).flip(dim)  # cell i <- cell whole - 1 - i
    fraction = whole - extent
    if fraction > 0:  # the mirror of cell i lies `fraction` of a cell before whole - 1 - i
        ahead = torch.cat([region.narrow(dim, 1, whole - 1), region.narrow(dim, whole - 1, 1)], dim)
        region = torch.lerp(region, ahead, fraction)
    out = x.clone()
    out.narrow(dim, 0, whole).copy_(region)
    return out
