"""Simulated user prompts, as SAM was trained with them.

* a point drawn uniformly inside the object;
* the object's bounding box with each coordinate moved by noise of 10 % of the box side
  (at most `BOX_NOISE_MAX` pixels);
* corrective clicks: a point drawn uniformly from the error region of the previous prediction,
  positive (label 1) where the object was missed, negative (label 0) where background was taken.

All coordinates are (x, y) pixels of the model input, the convention of `PromptEncoder`.
Randomness comes from an explicit `torch.Generator`, so prompts are reproducible.
"""

from __future__ import annotations

import torch

BOX_NOISE = 0.1  # standard deviation of the box corner noise, relative to the box side
BOX_NOISE_MAX = 20.0  # pixels
PAD_LABEL = -1  # a point the prompt encoder ignores


def sample_points(masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One pixel drawn uniformly from each mask.

    Args:
        masks: (N, H, W) bool.
        generator: Random generator (on the masks' device).

    Returns:
        (N, 2) float32 (x, y) pixel coordinates and (N,) bool, False for empty masks (whose
        point is (0, 0)).
    """
    flat = masks.flatten(1)
    counts = flat.sum(dim=1)
    present = counts > 0
    draw = torch.rand(len(flat), generator=generator, device=masks.device)
    rank = (draw * counts).long().clamp(max=counts.clamp(min=1) - 1)  # which True pixel, 0-based
    running = flat.int().cumsum(dim=1)
    index = torch.searchsorted(running, (rank + 1).int()[:, None].to(running.dtype)).squeeze(1)
    index = torch.where(present, index, torch.zeros_like(index))
    width = masks.shape[-1]
    coords = torch.stack([index % width, torch.div(index, width, rounding_mode="floor")], dim=1)
    return coords.float(), present


def point_prompts(masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A positive click inside every object.

    Args:
        masks: (N, H, W) bool ground-truth masks, none empty.
        generator: Random generator.

    Returns:
        (N, 1, 2) float32 coordinates and (N, 1) int64 labels (all 1).
    """
    coords, present = sample_points(masks, generator)
    if not bool(present.all()):
        raise ValueError("Every ground-truth mask needs at least one pixel to place a point in it.")
    return coords[:, None, :], torch.ones((len(masks), 1), dtype=torch.int64, device=masks.device)


def bounding_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of (N, H, W) bool masks as (N, 4) float32 (x0, y0, x1, y1), pixel indices inclusive."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    if not bool(rows.any(dim=1).all()):
        raise ValueError("Every ground-truth mask needs at least one pixel to have a bounding box.")
    height, width = masks.shape[-2:]
    y_index = torch.arange(height, device=masks.device)
    x_index = torch.arange(width, device=masks.device)
    y0 = torch.where(rows, y_index, height).amin(dim=1)
    y1 = torch.where(rows, y_index, -1).amax(dim=1)
    x0 = torch.where(cols, x_index, width).amin(dim=1)
    x1 = torch.where(cols, x_index, -1).amax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def box_prompts(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noisy bounding boxes, as a user would draw them.

    Args:
        masks: (N, H, W) bool ground-truth masks, none empty.
        generator: Random generator.

    Returns:
        (N, 4) float32 (x0, y0, x1, y1), clamped to the image and never inverted.
    """
    boxes = bounding_boxes(masks)
    height, width = masks.shape[-2:]
    sides = (boxes[:, 2:] - boxes[:, :2] + 1).repeat(1, 2)  # (w, h, w, h)
    noise = torch.randn(boxes.shape, generator=generator, device=boxes.device) * BOX_NOISE * sides
    boxes = boxes + noise.clamp(-BOX_NOISE_MAX, BOX_NOISE_MAX)
    limit = boxes.new_tensor([width - 1, height - 1, width - 1, height - 1])
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    low = torch.minimum(boxes[:, :2], boxes[:, 2:])
    high = torch.maximum(boxes[:, :2], boxes[:, 2:])
    return torch.cat([low, high], dim=1)


def corrective_clicks(
    predicted: torch.Tensor, target: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per object in the error region of the current prediction.

    Args:
        predicted: (N, H, W) bool predicted masks.
        target: (N, H, W) bool ground-truth masks.
        generator: Random generator.

    Returns:
        (N, 1, 2) float32 coordinates and (N, 1) int64 labels: 1 on a missed object pixel,
        0 on a wrongly included background pixel, `PAD_LABEL` where the prediction is perfect.
    """
    if predicted.shape != target.shape:
        raise ValueError(
            f"Predictions {tuple(predicted.shape)} and targets {tuple(target.shape)} differ in shape."
        )
    error = predicted ^ target
    coords, present = sample_points(error, generator)
    x, y = coords[:, 0].long(), coords[:, 1].long()
    missed = target[torch.arange(len(target), device=target.device), y, x]
    labels = torch.where(present, missed.long(), torch.full_like(missed, PAD_LABEL, dtype=torch.long))
    return coords[:, None, :], labels[:, None]
