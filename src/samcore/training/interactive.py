"""One training step's forward pass: embed the images once, then prompt interactively.

Round 0 uses the initial prompt (a box, or one click with three candidate masks). Each later
round adds one corrective click drawn from the error of the previous round's chosen mask
(the candidate with the highest predicted IoU, as at inference) and feeds that mask's
low-resolution logits back as `mask_input`. Rounds in between run without gradient; the
first and the last round are trained (the loss is their mean), and no gradient flows
through the fed-back masks.

Optionally, a small head (`DenseHead`) reads every object's foreground and edges off the image
embedding, through the mask decoder's own upscaling layers. It is not part of the model and
is not exported: its loss gives the encoder and the upscaling a dense signal at every pixel
from the first step, while the prompt-driven decoder is still learning where to look.

Scenes smaller than the model input are encoded without padding (`encode`): the embedding
then covers only the top-left corner of the model input, and the decoder sees the matching
corner of the positional encoding. It computes what the padded input would give for that
corner, up to the global attention not seeing the padding, at a fraction of the cost: a
512 px model trains on 256 px scenes four times faster. The image encoder has no absolute
positions, so the same embedding may stand anywhere in the grid: each step places it at a
random whole-token `offset` (prompts shifted to match), so that the decoder learns every part
of the positional encoding, not only the corner, and serves whole model-size images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import Sam
from .batches import Batch
from .losses import FOCAL_WEIGHT, LossParts, mask_iou, region_loss, sam_loss
from .prompts import box_prompts, corrective_clicks, point_prompts


@dataclass(frozen=True)
class Prompts:
    """Prompts of N objects in model-input pixels.

    Attributes:
        coords: (N, P, 2) float32 (x, y) points, or None.
        labels: (N, P) int64 point labels (1, 0 or -1), or None.
        boxes: (N, 4) float32 (x0, y0, x1, y1), or None.
        mask_input: (N, 1, 4h, 4w) low-resolution logits of a previous round, or None.
    """

    coords: torch.Tensor | None
    labels: torch.Tensor | None
    boxes: torch.Tensor | None
    mask_input: torch.Tensor | None = None

    def with_click(self, coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor) -> Prompts:
        """These prompts plus one (N, 1, 2) click each and a new mask input."""
        if self.coords is None or self.labels is None:
            return Prompts(coords, labels, self.boxes, mask_input)
        coords = torch.cat([self.coords, coords], dim=1)
        return Prompts(coords, torch.cat([self.labels, labels], dim=1), self.boxes, mask_input)


@dataclass(frozen=True)
class StepOutput:
    """The loss of a step and what it reports.

    Attributes:
        loss: Scalar with gradient.
        first: Loss parts of round 0.
        last: Loss parts of the last round.
        rounds: Number of rounds run.
        regions: Loss of the dense head (no gradient; 0 without one).
    """

    loss: torch.Tensor
    first: LossParts
    last: LossParts
    rounds: int
    regions: torch.Tensor


class DenseHead(nn.Module):
    """Foreground and edge logits from an image embedding, through the decoder's upscaling.

    Args:
        model: The SAM whose `mask_decoder.output_upscaling` is shared (not copied).
    """

    def __init__(self, model: Sam) -> None:
        super().__init__()
        channels = model.mask_decoder.transformer_dim // 8
        self.project = nn.Conv2d(channels, 2, kernel_size=1)
        self._upscaling = [model.mask_decoder.output_upscaling]  # a list: not registered twice

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(S, 256, h, w) embeddings -> (S, 2, 4h, 4w) logits."""
        return self.project(self._upscaling[0](features))


def initial_prompts(masks: torch.Tensor, use_box: bool, generator: torch.Generator) -> Prompts:
    """A noisy box or one positive click per (N, H, W) ground-truth mask."""
    if use_box:
        return Prompts(None, None, box_prompts(masks, generator))
    coords, labels = point_prompts(masks, generator)
    return Prompts(coords, labels, None)


def decode(
    model: Sam, embeddings: torch.Tensor, prompts: Prompts, multimask: bool, offset: tuple[int, int] = (0, 0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompt encoder and the reference mask decoder.

    Args:
        model: The SAM model.
        embeddings: (N, 256, h, w) image embedding of each prompt's image.
        prompts: N prompts, in pixels of the embedded scene.
        multimask: Return three candidate masks instead of one.
        offset: (row, column) of the embedding's first token in the model's embedding grid.

    Returns:
        Low-resolution logits (N, C, 4h, 4w) and predicted IoUs (N, C), C = 3 or 1.
    """
    height, width = embeddings.shape[-2:]
    grid_h, grid_w = model.prompt_encoder.image_embedding_size
    row, column = offset
    if not (0 <= row <= grid_h - height and 0 <= column <= grid_w - width):
        raise ValueError(f"An embedding of {height}x{width} tokens does not fit the grid at offset {offset}.")
    stride = model.img_size / grid_w
    shift = torch.tensor([column * stride, row * stride], device=embeddings.device)
    points = None if prompts.coords is None else (prompts.coords + shift, prompts.labels)
    boxes = None if prompts.boxes is None else prompts.boxes + shift.repeat(2)
    sparse, dense = model.prompt_encoder(points, boxes, prompts.mask_input)
    image_pe = model.prompt_encoder.get_dense_pe()[..., row : row + height, column : column + width]
    return model.mask_decoder(embeddings, image_pe, sparse, dense[..., :height, :width], multimask)


def random_offset(model: Sam, embeddings: torch.Tensor, generator: torch.Generator) -> tuple[int, int]:
    """A uniformly drawn whole-token position of the embedding in the model's grid."""
    height, width = embeddings.shape[-2:]
    grid_h, grid_w = model.prompt_encoder.image_embedding_size
    draw = torch.randint(0, (grid_h - height + 1) * (grid_w - width + 1), (1,), generator=generator,
                         device=generator.device)
    return divmod(int(draw), grid_w - width + 1)


def encode(model: Sam, images: torch.Tensor) -> torch.Tensor:
    """Embed (B, 3, s, s) 0-255 scenes placed top-left in the model input, without padding.

    Returns:
        (B, 256, h, w): the corner of the model's embedding grid the scenes cover.
    """
    size = images.shape[-1]
    stride = model.img_size // model.prompt_encoder.image_embedding_size[0]
    if size > model.img_size or size % stride:
        raise ValueError(f"Scenes of {size} px do not fit a {model.img_size} px model in steps of {stride} px.")
    return model.image_encoder((images - model.pixel_mean) / model.pixel_std)


def upscale(model: Sam, low_res: torch.Tensor, size: int, out: int | None = None) -> torch.Tensor:
    """Low-resolution logits (N, C, 4h, 4w) to logits of the unpadded square scene.

    Args:
        model: The SAM model.
        low_res: (N, C, 4h, 4w) logits of the top-left corner of the model input that the
            embedding covered (the whole input, or the scene when encoded unpadded).
        size: Side of the scene in pixels (the top-left part of the model input).
        out: Side of the result (default `size`); the covered input must scale to it by an
            integer ratio (covered * out / size whole).

    Returns:
        (N, C, out, out) logits, as bilinear interpolation to the scene would give them.
    """
    out = size if out is None else out
    per_pixel = model.img_size / (4 * model.prompt_encoder.image_embedding_size[0])
    full = low_res.shape[-1] * per_pixel * out / size
    if not full.is_integer():
        raise ValueError(
            f"Logits cannot be scaled to {out} px for a {size} px scene on a {model.img_size} px model."
        )
    logits = F.interpolate(low_res, (int(full), int(full)), mode="bilinear", align_corners=False)
    return logits[..., :out, :out]


def area_targets(masks: torch.Tensor, out: int) -> torch.Tensor:
    """(N, H, W) bool masks to (N, 1, out, out) float covered fractions (area averaging)."""
    targets = masks[:, None].float()
    if masks.shape[-1] == out:
        return targets
    return F.interpolate(targets, (out, out), mode="area")


def interactive_step(
    model: Sam,
    batch: Batch,
    use_box: bool,
    corrective: int,
    generator: torch.Generator,
    loss_size: int | None = None,
    focal_window: float | None = None,
    focal_weight: float = FOCAL_WEIGHT,
    dense_head: DenseHead | None = None,
    dense_weight: float = 1.0,
) -> StepOutput:
    """Forward pass of one training step with `corrective` corrective-click rounds.

    Args:
        model: The SAM model (train mode).
        batch: Images and objects (square scenes).
        use_box: Start from noisy boxes instead of single clicks.
        corrective: Corrective rounds after the initial prompt (0 trains round 0 only).
        generator: Random generator for the prompts (on the batch's device).
        loss_size: Side at which logits meet the (area-averaged) ground truth, and where
            corrective clicks are drawn; default the scene size. Half the scene size costs a
            quarter of the loss computation.
        focal_window: Normalisation of the focal loss (see `losses.focal_loss`).
        focal_weight: Weight of the focal loss against dice (see `losses.focal_ramp`).
        dense_head: Head reading the batch's `regions` off the embeddings, or None.
        dense_weight: Weight of the dense head's loss.

    Returns:
        The loss and its report.
    """
    size = batch.masks.shape[-1]
    loss_size = size if loss_size is None else loss_size
    features = encode(model, batch.images)
    embeddings = features[batch.image_index]
    targets = area_targets(batch.masks, loss_size)
    truth = targets[:, 0] > 0.5
    click_scale = size / loss_size
    prompts = initial_prompts(batch.masks, use_box, generator)
    offset = random_offset(model, embeddings, generator)
    trained: list[LossParts] = []
    for round_index in range(corrective + 1):
        with_grad = round_index in (0, corrective)
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            low_res, iou_pred = decode(model, embeddings, prompts, round_index == 0 and not use_box, offset)
            logits = upscale(model, low_res, size, loss_size)
            if with_grad:
                trained.append(sam_loss(logits, iou_pred, targets, focal_window, focal_weight))
        if round_index == corrective:
            break
        chosen = iou_pred.detach().argmax(dim=1)
        rows = torch.arange(len(chosen), device=chosen.device)
        predicted = logits.detach()[rows, chosen] > 0
        coords, labels = corrective_clicks(predicted, truth, generator)
        coords = coords * click_scale + (click_scale - 1) / 2  # centre of the coarse pixel
        prompts = prompts.with_click(coords, labels, low_res.detach()[rows, chosen][:, None])
    loss = torch.stack([parts.total for parts in trained]).mean()
    regions = torch.zeros((), device=loss.device)
    if dense_head is not None:
        dense = upscale(model, dense_head(features), size, loss_size)
        regions = region_loss(dense, F.interpolate(batch.regions.float(), (loss_size, loss_size), mode="area"))
        loss = loss + dense_weight * regions
    return StepOutput(loss, trained[0], trained[-1], corrective + 1, regions.detach())


@torch.no_grad()
def evaluate_prompts(model: Sam, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """IoU per object from a noisy box and from one click (candidate with the best score).

    Args:
        model: The SAM model (put in eval mode by the caller).
        batch: Images and objects.
        generator: Random generator for the prompts.

    Returns:
        "box" and "point" (N,) IoUs, and "point_oracle" (N,), the best candidate's IoU.
    """
    size = batch.masks.shape[-1]
    embeddings = encode(model, batch.images)[batch.image_index]
    targets = batch.masks[:, None]
    out = {}
    for name, use_box in (("box", True), ("point", False)):
        prompts = initial_prompts(batch.masks, use_box, generator)
        low_res, iou_pred = decode(model, embeddings, prompts, multimask=not use_box)
        ious = mask_iou(upscale(model, low_res, size), targets)
        out[name] = ious[torch.arange(len(ious)), iou_pred.argmax(dim=1)]
        if not use_box:
            out["point_oracle"] = ious.max(dim=1).values
    return out
