"""Clicks on a large image decoded on the embedded crop around them, in the whole image's terms."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .logits import MASK_LOGIT_EPS
from .zoom import Window

if TYPE_CHECKING:
    from .predictor import ImageEmbedding, Predictor

BACKGROUND_LOGIT = math.log(MASK_LOGIT_EPS)  # what lies outside a click crop


class CropDecoder:
    """Decodes prompts on the crop `window` of the current image, embedded on its own (a zoomed click).

    It answers `Predictor.predict_logits` and `Predictor.masks_from_logits` as the whole image's
    predictor does, so that a front end shows and refines a zoomed click's candidates one at a time,
    as it does an unzoomed one's: prompts are in the whole image's pixels, low-resolution logits
    (and a `mask_input`) are the crop's, and masks are the whole image's, background outside the crop.
    Make one with `Predictor.crop_decoder`.

    Args:
        decoder: A predictor of the image's model that decodes the crop (its image is set to the
            crop's embedding before each call).
        window: The crop, in the whole image's pixels.
        embedding: The crop's embedding.
        original_size: (H, W) of the whole image.
    """

    def __init__(
        self, decoder: Predictor, window: Window, embedding: ImageEmbedding, original_size: tuple[int, int]
    ) -> None:
        self.window, self.original_size = window, original_size
        self._decoder, self._embedding = decoder, embedding

    def predict_logits(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        refine: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`Predictor.predict_logits` on the crop: scores (C,) and the crop's (C, 256, 256) logits."""
        decoder = self._on_crop()
        return decoder.predict_logits(
            None if point_coords is None else self.window.points(point_coords), point_labels,
            None if box is None else self.window.box(box), mask_input, multimask_output, refine,
        )

    def masks_from_logits(self, low_res: np.ndarray, return_logits: bool = False) -> np.ndarray:
        """(C, 256, 256) logits of the crop to (C, H, W) masks of the whole image (float32 logits with
        `return_logits`, `BACKGROUND_LOGIT` outside the crop)."""
        decoder = self._on_crop()
        logits = decoder.masks_from_logits(low_res, return_logits=True)
        return pasted_on_background(
            logits, self.window, self.original_size, decoder.model.mask_threshold, return_logits
        )

    def _on_crop(self) -> Predictor:
        self._decoder.set_embedding(self._embedding)
        return self._decoder


def pasted_on_background(
    crop_logits: np.ndarray, window: Window, size: tuple[int, int], threshold: float, return_logits: bool
) -> np.ndarray:
    """(C, H, W) masks (or logits) of an image of `size`: the crop's in `window`, background elsewhere."""
    count = crop_logits.shape[0]
    if return_logits:
        pasted = np.full((count, *size), BACKGROUND_LOGIT, np.float32)
        pasted[(slice(None), *window.slices)] = crop_logits
    else:
        pasted = np.zeros((count, *size), bool)
        pasted[(slice(None), *window.slices)] = crop_logits > threshold
    return pasted
