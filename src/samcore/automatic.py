"""Automatic segmentation of one 2D image: a grid of point prompts, filtered, deduplicated, painted.

The steps, each a function of `samcore.maskops` or of this module:

1. A regular grid of single positive points (`point_grid`) over the image, and optionally over
   overlapping crops of it (`crop_boxes`), each crop embedded anew at the model's resolution.
2. Points go through the decoder in batches; each gives 3 candidate masks. Candidates whose
   predicted IoU is below `min_predicted_iou` are dropped before upscaling (the decoder does not
   even make the masks of a point whose 3 candidates all are), then those whose `stability_score`
   is below `min_stability`.
3. Per crop, box non-maximum suppression keeps one mask per object; masks cut by a crop's inner
   edge are dropped (another crop, or the whole image, holds them entire).
4. Holes and islands smaller than `min_area` are removed, then mask NMS removes duplicates left
   across crops.
5. The masks are painted into an instance label image (`maskops.paint_labels`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .cancel import check
from .logits import upscale_logits
from .maskops import Masks, box_nms, clean_masks, concat, mask_nms, paint_labels, stability_score
from .predictor import ImageEmbedding, Predictor
from .progress import Job, Progress
from .zoo import SAM_THRESHOLDS

Box = tuple[int, int, int, int]
THRESHOLDS = ("min_predicted_iou", "min_stability")
UPSCALE_PIXELS = 64 * 2**20  # full-size logits made at once, in pixels (256 MB of float32)


@dataclass(frozen=True)
class AutoSettings:
    """Parameters of automatic segmentation.

    Attributes:
        points_per_side: The point grid has this many points along each side of the image (or crop).
        points_per_batch: Points decoded at once; more is faster and uses more memory.
        min_predicted_iou: Candidate masks with a lower predicted IoU are dropped. None: the model's own
            (see `resolved`).
        min_stability: Candidate masks with a lower `stability_score` are dropped. None: the model's own.
        stability_offset: Logit shift used by the stability score.
        box_nms_iou: Within an image or crop, a mask whose box overlaps a better one's by more is dropped.
        mask_nms_iou: At the end, a mask overlapping a better one by more (mask IoU) is dropped.
        min_area: Holes and islands smaller than this many pixels are removed from each mask (0: off).
        min_visible: Fraction of a mask that must stay visible in the label image (see `paint_labels`).
        crop_layers: 0 uses the whole image only; n adds layers of 2x2, 4x4, ... 2^n x 2^n crops,
            each embedded at full model resolution, for small objects in large images.
        crop_overlap: Fraction of a crop's width and height shared with its neighbour.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    min_predicted_iou: float | None = None
    min_stability: float | None = None
    stability_offset: float = 1.0
    box_nms_iou: float = 0.7
    mask_nms_iou: float = 0.7
    min_area: int = 25
    min_visible: float = 0.5
    crop_layers: int = 0
    crop_overlap: float = 0.25

    @classmethod
    def for_model(cls, model: torch.nn.Module, **options: float) -> AutoSettings:
        """The settings for `model`: its own thresholds where its weights have them, then `options`.

        Weights whose predicted IoUs run lower than SAM's (the bundled model) carry their own
        `min_predicted_iou` and `min_stability` (see `samcore.zoo.ModelEntry.auto_thresholds`).
        """
        return cls(**options).resolved(model)

    def resolved(self, model: torch.nn.Module | None) -> AutoSettings:
        """These settings with the thresholds left unset (None) filled in: `model`'s own where its
        weights carry them (the bundled model's run lower than SAM's), else SAM's (`SAM_THRESHOLDS`)."""
        own = {**dict(zip(THRESHOLDS, SAM_THRESHOLDS)), **getattr(model, "auto_defaults", {})}
        unset = {name: own[name] for name in THRESHOLDS if getattr(self, name) is None}
        return dataclasses.replace(self, **unset) if unset else self

    def __post_init__(self) -> None:
        for name in ("points_per_side", "points_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}.")
        for name in ("min_predicted_iou", "min_stability", "box_nms_iou", "mask_nms_iou", "min_visible"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a fraction between 0 and 1, not {getattr(self, name)}.")
        for name in ("min_area", "crop_layers", "stability_offset"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} cannot be negative, not {getattr(self, name)}.")
        if not 0.0 <= self.crop_overlap < 1.0:
            raise ValueError(f"crop_overlap is a fraction from 0 to below 1, not {self.crop_overlap}.")


class PointDecoder(Protocol):
    """Decodes single positive point prompts on one image; a mask is `logits > 0`.

    Attributes:
        size: (H, W) of the image.
    """

    size: tuple[int, int]

    def decode(self, points: np.ndarray, min_score: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2) XY pixel points to logits (B, C, h, w) at any resolution and predicted IoUs (B, C).

        The masks of a point whose predicted IoUs are all below `min_score` may be left out
        (empty logits): the caller drops them.
        """

    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, h, w) logits from `decode` to (N, H, W) logits of the image."""


class EmbeddingDecoder:
    """A `PointDecoder` on one image embedding, with a model's prompt encoder and mask decoder.

    Only the embedding's first view (the image itself, not its mirror images) is decoded.

    Args:
        model: The SAM model.
        embedding: The image's embedding.
        precision: Passed to the `Predictor` used inside.
    """

    def __init__(self, model: torch.nn.Module, embedding: ImageEmbedding, precision: str = "auto") -> None:
        self._predictor = Predictor(model, precision=precision, views=embedding.views)
        self._predictor.set_embedding(embedding)
        self.size = embedding.original_size

    def decode(self, points: np.ndarray, min_score: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        predictor = self._predictor
        device = predictor.device
        coords = torch.as_tensor(predictor.transform_coords(points), dtype=torch.float32, device=device)
        labels = torch.ones(len(points), 1, dtype=torch.int64, device=device)
        # The image itself only, as the thresholds were calibrated: one decoding per point is
        # most of segment-all's time.
        return predictor.predict_low_res(
            coords[:, None, :], labels, multimask_output=True, views=1, min_score=min_score
        )

    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        model = self._predictor.model
        with torch.inference_mode():
            masks = upscale_logits(logits[:, None], model.img_size, self._predictor.input_size, self.size)
        return masks[:, 0] - model.mask_threshold


def point_grid(points_per_side: int) -> np.ndarray:
    """(n * n, 2) XY points at the centres of an n x n grid of cells on the unit square, row by row."""
    centres = (np.arange(points_per_side) + 0.5) / points_per_side
    xs, ys = np.meshgrid(centres, centres)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def crop_boxes(height: int, width: int, layers: int, overlap: float) -> list[Box]:
    """The whole image, then for each layer i = 1..layers a 2^i x 2^i tiling of overlapping crops.

    Args:
        height: Image height H.
        width: Image width W.
        layers: Number of crop layers.
        overlap: Fraction of a crop's side shared with its neighbour.

    Returns:
        XYXY boxes (x1, y1 exclusive), the whole image first.
    """
    boxes = [(0, 0, width, height)]
    for layer in range(1, layers + 1):
        n = 2**layer
        crop_w = math.ceil(width / (n - (n - 1) * overlap))
        crop_h = math.ceil(height / (n - (n - 1) * overlap))
        step_w = (width - crop_w) / (n - 1)
        step_h = (height - crop_h) / (n - 1)
        for row in range(n):
            for col in range(n):
                x0, y0 = round(col * step_w), round(row * step_h)
                boxes.append((x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)))
    return boxes


def cut_by_crop(boxes: np.ndarray, crop: Box, image_size: tuple[int, int]) -> np.ndarray:
    """(N,) bool: which masks (boxes in crop pixels) touch an edge of the crop that lies inside the image."""
    x0, y0, x1, y1 = crop
    height, width = image_size
    return (
        ((boxes[:, 0] <= 0) & (x0 > 0))
        | ((boxes[:, 1] <= 0) & (y0 > 0))
        | ((boxes[:, 2] >= x1 - x0) & (x1 < width))
        | ((boxes[:, 3] >= y1 - y0) & (y1 < height))
    )


def filter_candidates(
    decoder: PointDecoder, points: np.ndarray, settings: AutoSettings, upscale_chunk: int = 16
) -> Masks:
    """Decode a batch of points and keep the candidates that pass the predicted-IoU and stability filters.

    Args:
        decoder: The image's decoder.
        points: (B, 2) XY points in the decoder's image pixels.
        settings: Thresholds.
        upscale_chunk: Candidates upscaled at once, at most; fewer on a large image (`UPSCALE_PIXELS`),
            which bounds the memory of full-size logits.

    Returns:
        The kept masks, in the decoder's image pixels.
    """
    settings = settings.resolved(None)  # thresholds left unset: SAM's (no model here to ask)
    masks, _ = scored_candidates(
        decoder, points, settings.min_predicted_iou, settings.min_stability, settings.stability_offset, upscale_chunk
    )
    return masks


def scored_candidates(
    decoder: PointDecoder,
    points: np.ndarray,
    min_predicted_iou: float,
    min_stability: float,
    stability_offset: float = 1.0,
    upscale_chunk: int = 16,
) -> tuple[Masks, np.ndarray]:
    """`filter_candidates` with explicit thresholds, also returning each kept mask's stability score.

    Returns:
        The kept (non-empty) masks with their predicted IoUs, their points and stability scores as
        `meta` "points" and "stability", and (N,) the stability scores again.
    """
    # Candidates scored below the threshold are dropped here: the decoder need not make their masks.
    logits, scores = decoder.decode(points, min_score=min_predicted_iou)
    per_point = logits.shape[1]
    logits, scores = logits.flatten(0, 1), scores.flatten(0, 1).float()
    keep = torch.nonzero(scores >= min_predicted_iou).flatten()
    parts, stabilities = [], []
    start, chunk = 0, 1  # the first candidate gives the image's size, and so the chunk
    while start < len(keep):
        check()  # a cancelled job stops between chunks: on a large image, each takes a while
        index = keep[start : start + chunk]
        full = decoder.upscale(logits[index])
        stability = stability_score(full, 0.0, stability_offset)
        positive = full > 0
        kept = (stability >= min_stability) & positive.flatten(1).any(dim=1)
        rows = index[kept].cpu().numpy()
        meta = {
            "points": np.asarray(points, np.float64)[rows // per_point],
            "stability": stability[kept].float().cpu().numpy(),
        }
        kept_masks = Masks.from_dense(positive[kept], scores[index][kept], meta)
        parts.append(kept_masks)
        stabilities.append(kept_masks.meta["stability"])
        start += len(index)
        chunk = max(1, min(upscale_chunk, UPSCALE_PIXELS // full[0].numel()))
    return concat(parts), np.concatenate(stabilities) if stabilities else np.zeros(0, np.float32)


def generate_masks(
    decoder_for: Callable[[Box], PointDecoder],
    image_size: tuple[int, int],
    settings: AutoSettings,
    grids: Sequence[np.ndarray] | None = None,
) -> Job[Masks]:
    """The masks of every object found in an image, as a job yielding one step per batch of points.

    Args:
        decoder_for: Makes the decoder of a crop box (the whole image first).
        image_size: (H, W) of the image.
        settings: Parameters.
        grids: The (n, 2) XY points on the unit square of the whole image, then of each crop layer's
            crops (`settings.crop_layers + 1` grids); default `point_grid(settings.points_per_side)` for all.

    Returns:
        Deduplicated, cleaned masks in image pixels, with their predicted IoUs and, as `meta`, their
        points (image pixels), stability scores and the crop boxes they were decoded on.
    """
    height, width = image_size
    crops = crop_boxes(height, width, settings.crop_layers, settings.crop_overlap)
    layers = [0] + [layer for layer in range(1, settings.crop_layers + 1) for _ in range(4**layer)]
    if grids is None:
        grids = [point_grid(settings.points_per_side)] * (settings.crop_layers + 1)
    elif len(grids) != settings.crop_layers + 1:
        raise ValueError(
            f"{len(grids)} point grids for {settings.crop_layers} crop layers: give one for the whole "
            f"image and one per crop layer ({settings.crop_layers + 1})."
        )
    step = settings.points_per_batch
    total = sum(math.ceil(len(grids[layer]) / step) for layer in layers)
    found, done = [], 0
    for crop, layer in zip(crops, layers):
        decoder = decoder_for(crop)
        crop_h, crop_w = crop[3] - crop[1], crop[2] - crop[0]
        points = grids[layer] * np.array([crop_w, crop_h])
        parts = []
        for start in range(0, len(points), step):
            parts.append(filter_candidates(decoder, points[start : start + step], settings))
            done += 1
            yield Progress("masks", done, total)
        masks = deduplicate_crop(concat(parts), crop, image_size, settings)
        crop_rows = np.tile(np.array(crop, np.int64), (len(masks), 1))
        found.append(dataclasses.replace(masks, meta={**masks.meta, "crop_boxes": crop_rows}))
    return merge_crops(found, settings)


def deduplicate_crop(masks: Masks, crop: Box, image_size: tuple[int, int], settings: AutoSettings) -> Masks:
    """Step 3 on the filtered candidates of one crop: box NMS, masks cut by the crop dropped.

    Returns:
        The crop's masks, in image pixels.
    """
    masks = masks.select(box_nms(masks.boxes, masks.scores, settings.box_nms_iou))
    masks = masks.select(np.flatnonzero(~cut_by_crop(masks.boxes, crop, image_size)))
    return masks.shifted(crop[0], crop[1])


def merge_crops(found: list[Masks], settings: AutoSettings) -> Masks:
    """Step 4 on the masks of every crop: small holes and islands removed, then mask NMS."""
    masks = clean_masks(concat(found), settings.min_area)
    return masks.select(mask_nms(masks, settings.mask_nms_iou))


def segment_embedding(
    model: torch.nn.Module,
    embedding: ImageEmbedding,
    rgb: np.ndarray | None = None,
    settings: AutoSettings | None = None,
    precision: str = "auto",
) -> Job[np.ndarray]:
    """Automatic segmentation of an embedded image, as a job (see `samcore.progress`).

    Args:
        model: The SAM model that made the embedding.
        embedding: The image's embedding.
        rgb: The (H, W, 3) uint8 image; needed only with crops (`settings.crop_layers > 0`).
        settings: Parameters; default `AutoSettings()`, the thresholds left unset being the model's own.
        precision: Encoder precision for crops.

    Returns:
        (H, W) int32 instance labels.
    """
    settings = (settings or AutoSettings()).resolved(model)
    masks = yield from embedding_masks(model, embedding, rgb, settings, precision)
    return paint_labels(masks, embedding.original_size, settings.min_visible)


def embedding_masks(
    model: torch.nn.Module,
    embedding: ImageEmbedding,
    rgb: np.ndarray | None,
    settings: AutoSettings,
    precision: str = "auto",
    grids: Sequence[np.ndarray] | None = None,
) -> Job[Masks]:
    """The masks of `segment_embedding` before they are painted, possibly overlapping (see `generate_masks`).

    `settings` are taken as they are: `AutoSettings.resolved` fills in the model's thresholds.
    """
    if settings.crop_layers and rgb is None:
        raise ValueError("Crops are embedded anew: pass the image (rgb) along with its embedding.")
    whole = EmbeddingDecoder(model, embedding, precision)
    encoder = Predictor(model, precision=precision, views=1) if settings.crop_layers else None

    def decoder_for(crop: Box) -> PointDecoder:
        if crop == (0, 0, whole.size[1], whole.size[0]):
            return whole
        x0, y0, x1, y1 = crop
        return EmbeddingDecoder(model, encoder.embed_rgb(np.ascontiguousarray(rgb[y0:y1, x0:x1])), precision)

    return (yield from generate_masks(decoder_for, embedding.original_size, settings, grids))
