"""Decoder warm-up on prompt geometry, before any scene is seen.

From scratch, SAM's decoder is slow to learn where a box or a click points: for the first
thousands of steps its masks barely depend on the prompt. This stage teaches that part alone,
cheaply: the embedding is unit-variance noise (what a fresh encoder's normalised output looks
like), and the target is an ellipse of random size and orientation, prompted by its noisy
bounding box or by a click inside it. Only the prompt encoder and the mask decoder train; no
image is rendered or encoded, so a step costs a fraction of a scene step.

The warm-up works at a coarse scale whatever the model's token stride: its canvas is the top-left
`CANVAS_TOKENS` x `CANVAS_TOKENS` tokens (fewer on a smaller model) of a grid of `COARSE_STRIDE` px
tokens, half the side of a 512 px input, with the positional encoding evaluated at those tokens'
centres. The decoder's positional encoding is a continuous function of the normalised position,
so what it learns there holds on the model's own grid; finer detail and the rest of the image
come with the scenes. (A 16-token canvas at stride 8, at random offsets, learnt nothing in 700
steps: it covers a quarter of the image side, and every offset has to be learnt.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..modeling import Sam
from .interactive import Prompts
from .losses import dice_loss, mask_iou
from .prompts import BOX_NOISE, BOX_NOISE_MAX

COARSE_STRIDE = 16  # model-input pixels per token of the warm-up grid
CANVAS_TOKENS = 16
RADIUS_RANGE = (3.0, 70.0)  # semi-major axes, in model-input pixels (log-uniform)
CLICK_DEPTH = 0.7  # clicks fall within this fraction of the ellipse's radii


def ellipses(
    count: int, tokens: int, stride: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ellipses on a canvas of `tokens` x `tokens` tokens of `stride` pixels.

    Returns:
        (N, 4 tokens, 4 tokens) bool masks at the decoder's low resolution, (N, 5) float
        parameters (centre x, centre y, semi-axes a >= b, angle) in canvas pixels, and (N, 2)
        the half-extents of their bounding boxes.
    """
    device = generator.device
    side = tokens * stride
    low, high = (math.log(r) for r in RADIUS_RANGE)
    major = torch.exp(torch.empty(count, device=device).uniform_(low, high, generator=generator))
    minor = major * torch.empty(count, device=device).uniform_(0.5, 1.0, generator=generator)
    angle = torch.rand(count, generator=generator, device=device) * math.pi
    margin = major.clamp(max=side / 2 - 1)
    free = side - 2 * margin[:, None]
    centre = torch.rand(count, 2, generator=generator, device=device) * free + margin[:, None]
    cells = 4 * tokens
    pixel = (torch.arange(cells, device=device) + 0.5) * (side / cells)
    dx = pixel[None, None, :] - centre[:, 0, None, None]
    dy = pixel[None, :, None] - centre[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    masks = (u / major[:, None, None]) ** 2 + (v / minor[:, None, None]) ** 2 < 1
    cell = (centre / (side / cells)).long().clamp(max=cells - 1)
    masks[torch.arange(count, device=device), cell[:, 1], cell[:, 0]] = True  # never empty
    extent = torch.stack(
        [torch.hypot(major * torch.cos(angle), minor * torch.sin(angle)),
         torch.hypot(major * torch.sin(angle), minor * torch.cos(angle))], dim=1
    )
    return masks, torch.stack([centre[:, 0], centre[:, 1], major, minor, angle], dim=1), extent


def geometry_prompts(
    params: torch.Tensor, extent: torch.Tensor, use_box: bool, generator: torch.Generator
) -> Prompts:
    """Noisy bounding boxes of the ellipses, or one click inside each."""
    count, device = len(params), params.device
    centre = params[:, :2]
    if use_box:
        boxes = torch.cat([centre - extent, centre + extent], dim=1)
        spread = (BOX_NOISE * extent).clamp(max=BOX_NOISE_MAX).repeat(1, 2)
        return Prompts(None, None, boxes + torch.randn(count, 4, generator=generator, device=device) * spread)
    turn = torch.rand(count, generator=generator, device=device) * 2 * math.pi
    depth = torch.sqrt(torch.rand(count, generator=generator, device=device)) * CLICK_DEPTH
    u, v = depth * params[:, 2] * torch.cos(turn), depth * params[:, 3] * torch.sin(turn)
    cos, sin = torch.cos(params[:, 4]), torch.sin(params[:, 4])
    click = torch.stack([centre[:, 0] + u * cos - v * sin, centre[:, 1] + u * sin + v * cos], dim=1)
    return Prompts(click[:, None], torch.ones(count, 1, dtype=torch.int64, device=device), None)


def geometry_step(
    model: Sam, count: int, use_box: bool, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """Loss of one warm-up batch (dice + BCE on the best candidate, MSE on the IoU scores).

    Returns:
        The loss (with gradient) and the mean IoU of the highest-scored masks.
    """
    coarse = max(1, model.img_size // COARSE_STRIDE)
    tokens = min(CANVAS_TOKENS, coarse)
    masks, params, extent = ellipses(count, tokens, model.img_size // coarse, generator)
    shape = (count, model.mask_decoder.transformer_dim, tokens, tokens)
    embeddings = torch.randn(shape, generator=generator, device=generator.device)
    prompts = geometry_prompts(params, extent, use_box, generator)
    points = None if prompts.coords is None else (prompts.coords, prompts.labels)
    sparse, dense = model.prompt_encoder(points, prompts.boxes, None)
    image_pe = model.prompt_encoder.pe_layer((coarse, coarse))[None, :, :tokens, :tokens]
    logits, scores = model.mask_decoder(
        embeddings, image_pe, sparse, dense[..., :1, :1].expand(-1, -1, tokens, tokens), not use_box
    )
    targets = masks[:, None].float()
    per_mask = dice_loss(logits, targets) + F.binary_cross_entropy_with_logits(
        logits, targets.expand_as(logits), reduction="none"
    ).mean(dim=(2, 3))
    rows = torch.arange(count, device=logits.device)
    ious = mask_iou(logits, targets)
    loss = per_mask[rows, per_mask.detach().argmin(dim=1)].mean() + F.mse_loss(scores, ious)
    return loss, float(ious[rows, scores.detach().argmax(dim=1)].mean())


def pretrain_decoder(
    model: Sam,
    steps: int,
    seed: int,
    lr: float = 3e-4,
    count: int = 32,
    log: Callable[[str], None] = print,
    log_every: int = 100,
) -> list[float]:
    """Train the prompt encoder and mask decoder of `model` on geometry for `steps` steps.

    Steps alternate between boxes and single clicks. The image encoder is not touched.

    Returns:
        The IoU of every step (boxes on even steps, clicks on odd ones).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed * 7_777 + 1)
    params = list(model.prompt_encoder.parameters()) + list(model.mask_decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    history: list[float] = []
    for step in range(steps):
        use_box = step % 2 == 0
        loss, iou = geometry_step(model, count, use_box, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append(iou)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = range(max(0, step + 1 - log_every), step + 1)
            boxes = [history[i] for i in recent if i % 2 == 0]
            clicks = [history[i] for i in recent if i % 2 == 1]
            log(f"geometry step {step + 1}/{steps} | box IoU {_mean(boxes):.3f} "
                f"click IoU {_mean(clicks):.3f}")
    model.train(was_training)
    return history


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
