"""Mask logits between the image's pixels and the model's low-resolution frame.

SAM decodes into a (side, side) grid of logits over its padded, resized input square; these
functions take a mask or logits of the original image into that frame and back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .modeling import Sam

MASK_LOGIT_EPS = 1e-3  # a pixel fully in (out of) a mask becomes a logit of about +6.9 (-6.9)


def mask_logits(mask: np.ndarray, model: Sam, input_size: tuple[int, int]) -> np.ndarray:
    """(1, 256, 256) logits standing for a (H, W) bool mask of an image resized to `input_size`.

    The mask is resized and padded the way the model sees its image, averaged over each
    low-resolution cell, and the covered fraction p becomes the logit log(p / (1 - p)).
    """
    pixels = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None]
    fraction = to_low_res(pixels, 0.0, model.img_size, input_size, model.prompt_encoder.mask_input_size[0])
    return torch.logit(fraction, eps=MASK_LOGIT_EPS).numpy().astype(np.float32)


def to_low_res(
    values: torch.Tensor,
    background: torch.Tensor | float,
    img_size: int,
    input_size: tuple[int, int],
    side: int,
) -> torch.Tensor:
    """(C, H, W) image values to the (C, side, side) low-resolution frame a model decodes into.

    The image is resized to `input_size` within the model's padded `img_size` square, as the
    model sees it; the padding takes the values of `background`, low-resolution logits (C, side,
    side) of the same image, or a constant.
    """
    count = values.shape[0]
    if isinstance(background, torch.Tensor):
        square = (img_size, img_size)
        frame = F.interpolate(background[None].float(), square, mode="bilinear", align_corners=False)[0]
    else:
        frame = torch.full((count, img_size, img_size), float(background), device=values.device)
    resized = F.interpolate(
        values[None].float(), input_size, mode="bilinear", align_corners=False, antialias=True
    )
    frame[:, : input_size[0], : input_size[1]] = resized[0]
    return F.interpolate(frame[None], (side, side), mode="area")[0]


def crop_to_low_res(
    values: torch.Tensor,
    crop: tuple[int, int, int, int],
    background: float,
    img_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    side: int,
) -> torch.Tensor:
    """(C, h, w) values of the crop (y0, x0, h, w) of an image, `background` elsewhere, to the (C, side,
    side) low-resolution frame: `to_low_res` of the whole image, without making it (the crop's place is
    rounded to the frame's cells)."""
    y0, x0, height, width = crop
    scale_y = input_size[0] / original_size[0] * side / img_size
    scale_x = input_size[1] / original_size[1] * side / img_size
    top, bottom = round(y0 * scale_y), round((y0 + height) * scale_y)
    left, right = round(x0 * scale_x), round((x0 + width) * scale_x)
    frame = torch.full((values.shape[0], side, side), float(background), device=values.device)
    if bottom > top and right > left:
        frame[:, top:bottom, left:right] = F.interpolate(
            values[None].float(), (bottom - top, right - left), mode="bilinear", align_corners=False,
            antialias=True,
        )[0]
    return frame


def upscale_logits(
    low_res: torch.Tensor, img_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """Low-resolution logits (B, C, h, w) to (B, C, H, W) logits of the original image.

    The logits of segment-anything's `postprocess_masks` (bilinear to the padded model input, crop,
    bilinear to the original size), made the cheapest exact way for the geometry (`AxisResize`):
    in one bilinear step from the part of the grid that covers the image where that is the same;
    else, for an image smaller than the model's input, as two small matrix products; else in
    segment-anything's two steps.
    """
    side = low_res.shape[-1]
    rows = axis_resize(side, img_size, input_size[0], original_size[0])
    columns = axis_resize(side, img_size, input_size[1], original_size[1])
    logits = low_res.float()
    if rows.crop and columns.crop:
        return _bilinear(logits[..., : rows.crop, : columns.crop], original_size)
    height, width = original_size
    if height * side * (side + width) <= MATRIX_RESIZE_WORK and max(original_size) <= img_size:
        matrix_rows = rows.matrix.to(logits.device)
        matrix_columns = columns.matrix.to(logits.device)
        return torch.matmul(torch.matmul(matrix_rows, logits), matrix_columns.T)
    masks = _bilinear(logits, (img_size, img_size))
    masks = masks[..., : input_size[0], : input_size[1]]
    return _bilinear(masks, original_size)


# Multiply-adds per mask below which the matrix form of the exact resize is used (about 0.5 ms on
# a CPU core): images up to about 400 x 400 px.
MATRIX_RESIZE_WORK = 2**26


@dataclass(frozen=True)
class AxisResize:
    """segment-anything's resize of mask logits along one axis, as a matrix.

    Attributes:
        matrix: (original, side) weights: bilinear from `side` cells to the model's input, crop to
            the image's part of it, bilinear to the original pixels.
        crop: The cells covering the image, where one bilinear step from them to the original
            pixels gives `matrix` (to float rounding); 0 where it does not.
    """

    matrix: torch.Tensor
    crop: int


@functools.lru_cache(maxsize=64)
def axis_resize(side: int, img_size: int, input_length: int, original_length: int) -> AxisResize:
    """The `AxisResize` of `side` low-resolution cells to an image side of `original_length` pixels,
    `input_length` of the model's `img_size` input."""
    impulses = torch.eye(side)[:, None, :]  # one signal per cell, (side, 1, side)
    upscaled = F.interpolate(impulses, img_size, mode="linear", align_corners=False)[..., :input_length]
    matrix = F.interpolate(upscaled, original_length, mode="linear", align_corners=False)[:, 0].T.contiguous()
    crop = input_length * side / img_size
    if crop.is_integer():
        crop = int(crop)
        direct = F.interpolate(impulses[:crop, :, :crop], original_length, mode="linear", align_corners=False)
        one_step = torch.zeros_like(matrix)
        one_step[:, :crop] = direct[:, 0].T
        if not torch.allclose(one_step, matrix, rtol=0.0, atol=1e-6):
            crop = 0
    else:
        crop = 0
    return AxisResize(matrix, crop)


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to (B, C, *size), one channel at a time.

    Channels are folded into the batch: with several channels, `F.interpolate` on a CPU takes a
    channels-last path with two extra copies of the output, twice as slow for three masks.
    """
    batch, channels = x.shape[:2]
    resized = F.interpolate(x.reshape(batch * channels, 1, *x.shape[-2:]), size, mode="bilinear", align_corners=False)
    return resized.view(batch, channels, *size)
