"""SAM's training losses: focal + dice on masks (20:1), MSE on the predicted IoU.

Two options for training from scratch on microscopy:

* the focal weight can be ramped up from 0 (see `focal_ramp`): a randomly initialised model
  first learns to predict nothing anywhere under a focal-dominated loss and stays there for
  hundreds of steps, while the dice loss alone gets it to segment within tens of steps;
* the focal loss can be normalised per object instead of per image (`focal_loss(window=...)`),
  as nuclei may cover 0.05 % of a scene where SAM's objects cover percents. Off by default:
  it makes the focal term dominate again for small objects.

With multimask output (an ambiguous single click), only the best of the candidate masks (the
one with the lowest mask loss) is trained to match the object, so the candidates can specialise
on different readings of the click. The IoU head is trained on every candidate, so that its
scores rank them at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


@dataclass(frozen=True)
class LossParts:
    """A batch's loss and its parts (scalars; `total` carries the gradient).

    Attributes:
        total: focal_weight * focal + DICE_WEIGHT * dice + IOU_WEIGHT * iou_mse.
        focal: Mean focal loss of the trained masks.
        dice: Mean dice loss of the trained masks.
        iou_mse: Mean squared error of the predicted IoUs.
        iou: Mean actual IoU of the trained masks (no gradient).
    """

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou_mse: torch.Tensor
    iou: torch.Tensor


def focal_ramp(step: int, ramp_steps: int) -> float:
    """Focal-loss weight at a training step: rising linearly from 0 to FOCAL_WEIGHT over `ramp_steps`."""
    if ramp_steps <= 0:
        return FOCAL_WEIGHT
    return FOCAL_WEIGHT * min(1.0, step / ramp_steps)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    window: float | None = None,
) -> torch.Tensor:
    """Sigmoid focal loss, averaged over the image (SAM) or normalised per object.

    With `window`, the pixel sum is divided by `window` times the object's area (at most the
    image size): the average over a window around the object `window` times its size. That
    equals SAM's average for large objects, while a 10-pixel nucleus is not drowned by 65 000
    background pixels; false positives anywhere in the image still count.

    Args:
        logits: (N, C, H, W) mask logits.
        targets: (N, 1 or C, H, W) float targets in [0, 1] (soft after downsampling).
        alpha: Weight of the positive class (1 - alpha for the negative).
        gamma: Focusing exponent.
        window: Normalising window relative to the object's area; None averages over the
            whole image as SAM does.

    Returns:
        (N, C) loss per mask.
    """
    targets = targets.expand_as(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = torch.sigmoid(logits)
    p_true = prob * targets + (1 - prob) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    total = (weight * (1 - p_true) ** gamma * cross_entropy).flatten(2).sum(dim=2)
    pixels = float(logits.shape[-2] * logits.shape[-1])
    if window is None:
        return total / pixels
    area = targets.flatten(2).sum(dim=2)
    return total / (area * window).clamp(min=window, max=pixels)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss, 1 - 2|P.T| / (|P| + |T|), with P = sigmoid(logits).

    Args:
        logits: (N, C, H, W) mask logits.
        targets: (N, 1 or C, H, W) float targets in [0, 1].
        smooth: Added to numerator and denominator.

    Returns:
        (N, C) loss per mask.
    """
    prob = torch.sigmoid(logits).flatten(2)
    targets = targets.expand_as(logits).flatten(2)
    overlap = (prob * targets).sum(dim=2)
    return 1 - (2 * overlap + smooth) / (prob.sum(dim=2) + targets.sum(dim=2) + smooth)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded (logit > 0) masks with the targets, without gradient.

    Targets may be soft (the covered fraction of each pixel, as after area downsampling); the
    IoU is then that of the binary prediction with the fractional ground truth.

    Args:
        logits: (N, C, H, W) mask logits.
        targets: (N, 1 or C, H, W) float targets in [0, 1] (or bool).

    Returns:
        (N, C) float32 IoU; 1 where both are empty.
    """
    with torch.no_grad():
        predicted = (logits > 0).flatten(2).float()
        truth = targets.float().expand_as(logits).flatten(2)
        intersection = (predicted * truth).sum(dim=2)
        union = predicted.sum(dim=2) + truth.sum(dim=2) - intersection
        return torch.where(union > 0, intersection / union.clamp(min=1e-6), torch.ones_like(union))


def region_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of dense (S, K, H, W) logits against soft targets in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits, targets)


def sam_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    focal_window: float | None = None,
    focal_weight: float = FOCAL_WEIGHT,
) -> LossParts:
    """Loss of one prompting round.

    Args:
        logits: (N, C, H, W) mask logits at the targets' resolution, C = 1 or 3.
        iou_pred: (N, C) predicted IoUs.
        targets: (N, 1, H, W) float ground truth in [0, 1].
        focal_window: See `focal_loss` (None: SAM's per-image average).
        focal_weight: Weight of the focal loss (SAM: 20, with dice at 1).

    Returns:
        The loss parts; with C > 1 the mask losses are those of each prompt's best candidate.
    """
    if logits.shape[0] != targets.shape[0] or logits.shape[-2:] != targets.shape[-2:]:
        raise ValueError(f"Logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}.")
    focal = focal_loss(logits, targets, window=focal_window)
    dice = dice_loss(logits, targets)
    per_mask = focal_weight * focal + DICE_WEIGHT * dice
    best = per_mask.detach().argmin(dim=1)
    rows = torch.arange(len(best), device=best.device)
    iou = mask_iou(logits, targets)
    iou_mse = F.mse_loss(iou_pred.float(), iou)
    total = per_mask[rows, best].mean() + IOU_WEIGHT * iou_mse
    trained = (focal[rows, best].mean().detach(), dice[rows, best].mean().detach())
    return LossParts(total, *trained, iou_mse.detach(), iou[rows, best].mean())
