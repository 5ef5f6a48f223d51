"""segment-anything's `SamAutomaticMaskGenerator` interface: every object of an image as a list of mask records.

`samcore.segment_everything` paints the objects into one label image; this returns them one by one,
possibly overlapping, with the figures segment-anything gives each: its predicted IoU, stability
score, point prompt and the crop it was decoded on. The search is `samcore.automatic`'s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .automatic import AutoSettings, embedding_masks, point_grid
from .cancel import stopping_on
from .maskops import Masks
from .predictor import Predictor, _rgb
from .progress import Progress, run

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


class AutomaticMaskGenerator:
    """Masks of every object in an image, with segment-anything's parameters and records.

    Code written for `segment_anything.SamAutomaticMaskGenerator` runs with it unchanged, parameters
    and records alike. What differs:

    * `pred_iou_thresh` and `stability_score_thresh` left at None take the model's own thresholds:
      SAM's 0.88 and 0.95 for official and micro-sam weights, lower ones for the bundled model,
      whose predicted IoUs run lower (`AutoSettings.resolved`).
    * Crops are laid out by `samcore.automatic.crop_boxes`: `crop_overlap_ratio` is the fraction of
      a crop's side shared with its neighbour, at every layer (segment-anything measures it against
      the image's shorter side).
    * Duplicates left across crops, or after `min_mask_region_area` cleaned the masks, are removed
      by their mask IoU (above `crop_nms_thresh`), best predicted IoU first, instead of a box NMS
      that prefers masks of smaller crops.
    * `generate` takes the images `Predictor.set_image` takes (grayscale and microscopy dtypes
      too), shows progress and can be cancelled.

    Args:
        model: A SAM model (`samcore.load_model`), or a `Predictor` whose model and precision are used.
        points_per_side: Points along each side of the image; None when `point_grids` are given.
        points_per_batch: Points decoded at once; more is faster and uses more memory.
        pred_iou_thresh: Masks whose predicted IoU is lower are dropped; None: the model's own.
        stability_score_thresh: Masks whose stability score is lower are dropped; None: the model's own.
        stability_score_offset: Logit shift of the stability score.
        box_nms_thresh: Within the image or a crop, a mask whose box overlaps a better one's by more
            is dropped.
        crop_n_layers: 0 searches the whole image only; n adds layers of 2x2, ..., 2^n x 2^n crops.
        crop_nms_thresh: A mask overlapping a better one by more (mask IoU) is dropped at the end.
        crop_overlap_ratio: Fraction of a crop's side shared with its neighbour.
        crop_n_points_downscale_factor: Crop layer i has points_per_side / factor^i points a side.
        point_grids: Instead of `points_per_side`, one (n, 2) array of XY points on the unit square
            per layer (the whole image, then each crop layer).
        min_mask_region_area: Holes and islands smaller than this many pixels are removed from each
            mask (0: off).
        output_mode: "binary_mask" ((H, W) bool arrays), "uncompressed_rle" or "coco_rle" (needs
            pycocotools).
        precision: Encoder precision (see `Predictor`), when `model` is a model.

    Raises:
        ValueError: A parameter out of its range, or both or neither of `points_per_side` and
            `point_grids`.
        ImportError: "coco_rle" without pycocotools installed.
    """

    def __init__(
        self,
        model: torch.nn.Module | Predictor,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float | None = None,
        stability_score_thresh: float | None = None,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        precision: str = "auto",
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Give exactly one of points_per_side and point_grids.")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, not {output_mode!r}.")
        if output_mode == "coco_rle":
            _coco_mask()  # says now, not after the search, that pycocotools is missing
        if crop_n_points_downscale_factor < 1:
            raise ValueError(
                f"crop_n_points_downscale_factor must be at least 1, not {crop_n_points_downscale_factor}."
            )
        if isinstance(model, Predictor):
            model, precision = model.model, model.precision
        self.model, self.precision, self.output_mode = model, precision, output_mode
        self.settings = AutoSettings(
            points_per_side=points_per_side or 1,  # not used with point grids
            points_per_batch=points_per_batch,
            min_predicted_iou=pred_iou_thresh,
            min_stability=stability_score_thresh,
            stability_offset=stability_score_offset,
            box_nms_iou=box_nms_thresh,
            mask_nms_iou=crop_nms_thresh,
            min_area=min_mask_region_area,
            crop_layers=crop_n_layers,
            crop_overlap=crop_overlap_ratio,
        ).resolved(model)
        if point_grids is None:
            sides = [points_per_side // crop_n_points_downscale_factor**layer for layer in range(crop_n_layers + 1)]
            point_grids = [point_grid(max(side, 1)) for side in sides]
        self.point_grids = [_checked_grid(grid, layer) for layer, grid in enumerate(point_grids)]
        if len(self.point_grids) != crop_n_layers + 1:
            raise ValueError(
                f"{len(self.point_grids)} point grids for crop_n_layers={crop_n_layers}: give one for the "
                f"whole image and one per crop layer ({crop_n_layers + 1})."
            )
        # One view: the search decodes the image itself only (see `EmbeddingDecoder`).
        self.predictor = Predictor(model, precision=precision, views=1)

    def generate(
        self,
        image: np.ndarray,
        image_format: str = "RGB",
        channel_axis: int | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[dict[str, Any]]:
        """The masks of every object found in `image`, best predicted IoU first.

        Args:
            image: (H, W) grayscale or (H, W, C) image of any numeric dtype, as `Predictor.set_image` takes.
            image_format: "RGB" or "BGR" channel order of a 3-channel image.
            channel_axis: Axis holding channels, if not the last.
            on_progress: Called with each `Progress` step (the embedding, then batches of points).
            cancel: Set it from another thread to stop; `samcore.cancel.Cancelled` is raised.

        Returns:
            One dict per mask, with segment-anything's keys: "segmentation" (as `output_mode`
            says), "area" (pixels), "bbox" (XYWH as segment-anything gives it: the first pixel's
            x and y, then the last pixel's minus the first's), "predicted_iou", "point_coords" ([[x, y]]
            in image pixels), "stability_score" and "crop_box" (XYWH).
        """
        rgb = _rgb(image, image_format, channel_axis)
        with stopping_on(cancel):
            embedding = self.predictor.embed_rgb(rgb, cancel)
            if on_progress is not None:
                on_progress(Progress("embedding", 1, 1))
            job = embedding_masks(self.model, embedding, rgb, self.settings, self.precision, self.point_grids)
            masks = run(job, on_progress)
        return self.records(masks, embedding.original_size)

    def records(self, masks: Masks, size: tuple[int, int]) -> list[dict[str, Any]]:
        """segment-anything's mask records of `masks` (with their "points", "stability" and
        "crop_boxes" meta) on an image of (H, W) `size`."""
        records = []
        for i in np.argsort(-masks.scores, kind="stable"):
            dense = masks.dense(int(i), size)
            x0, y0, x1, y1 = (int(v) for v in masks.boxes[i])
            cx0, cy0, cx1, cy1 = (int(v) for v in masks.meta["crop_boxes"][i])
            records.append(
                {
                    "segmentation": self._encoded(dense),
                    "area": int(np.count_nonzero(masks.crops[i])),
                    "bbox": [x0, y0, x1 - 1 - x0, y1 - 1 - y0],  # the last pixel, not the edge after it
                    "predicted_iou": float(masks.scores[i]),
                    "point_coords": [[float(v) for v in masks.meta["points"][i]]],
                    "stability_score": float(masks.meta["stability"][i]),
                    "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
                }
            )
        return records

    def _encoded(self, mask: np.ndarray) -> np.ndarray | dict[str, Any]:
        if self.output_mode == "binary_mask":
            return mask
        rle = uncompressed_rle(mask)
        if self.output_mode == "uncompressed_rle":
            return rle
        coco = _coco_mask()
        encoded = coco.frPyObjects(rle, *rle["size"])
        encoded["counts"] = encoded["counts"].decode("utf-8")
        return encoded


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed run-length encoding of a (H, W) bool mask.

    Runs go down the columns (Fortran order) and alternate background and mask, background first,
    so the counts start with 0 when the first pixel is in the mask.
    """
    height, width = mask.shape
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": [height, width], "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """The (H, W) bool mask of an uncompressed run-length encoding (`uncompressed_rle`)."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"The run lengths add up to {counts.sum()} pixels, not {height} x {width}.")
    values = np.arange(len(counts)) % 2 == 1  # background first
    return np.repeat(values, counts).reshape(width, height).T.copy()


def _checked_grid(grid: np.ndarray, layer: int) -> np.ndarray:
    points = np.asarray(grid, np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or not len(points):
        raise ValueError(f"Point grid {layer} must be a non-empty (n, 2) array of XY points, not {points.shape}.")
    if not np.all((points >= 0) & (points <= 1)):
        raise ValueError(f"Point grid {layer} must hold points on the unit square (0 to 1, as fractions of a side).")
    return points


def _coco_mask() -> Any:
    try:
        from pycocotools import mask
    except ImportError:
        raise ImportError(
            'output_mode="coco_rle" needs pycocotools: pip install pycocotools. '
            '"uncompressed_rle" gives the same runs without it.'
        ) from None
    return mask
