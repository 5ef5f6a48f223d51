"""Images and their prompts mapped to the model's input, whose longest side is the model's input size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resized_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """(h, w) of an image whose longest side is scaled to `longest`, rounded half up."""
    scale = longest / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def model_input_size(
    model: torch.nn.Module, original_size: tuple[int, int], crop: bool = False
) -> tuple[int, int]:
    """(h, w) at which `model` sees an image of `original_size` (H, W) inside its square input.

    SAM scales the longest side to its input size (1024 px). A model with a `max_enlargement` (the
    bundled model: see `samcore.zoo.ModelEntry.max_enlargement`) enlarges a small image at most that
    many times, and the rest of its input is padding: objects keep sizes closer to those it was
    trained on. A zoomed `crop` is enlarged to the input size whatever its size: that is what zooming
    is for.
    """
    longest = model.img_size
    most = getattr(model, "max_enlargement", None)
    if most and not crop:
        longest = min(longest, max(1, round(max(original_size) * most)))
    return resized_shape(*original_size, longest)


class ResizeLongestSide:
    """segment-anything's `predictor.transform`: XY points and XYXY boxes of an image of `original_size`
    (H, W) to the pixels of the model's input, where the image's longest side is `target_length`.

    Scripts written for segment-anything's batched prompts use it as they did::

        boxes = predictor.transform.apply_boxes_torch(boxes, image.shape[:2])
        masks, scores, low_res = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = int(target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """A (H, W, 3) uint8 RGB image resized so that its longest side is `target_length` (bilinear,
        antialiased), for `Predictor.set_torch_image` once permuted to (1, 3, h, w)."""
        from .preprocess import resize_uint8

        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"apply_image takes a (H, W, 3) uint8 RGB image, not an array of shape {image.shape} and "
                f"dtype {image.dtype}; samcore.preprocess.to_rgb_uint8 makes one from microscopy data."
            )
        return resize_uint8(image, resized_shape(*image.shape[:2], self.target_length))

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """A (B, 3, H, W) batch resized so that its longest side is `target_length` (bilinear,
        antialiased), as float32."""
        if image.ndim != 4:
            raise ValueError(
                f"apply_image_torch takes a (B, 3, H, W) tensor, not one of shape {tuple(image.shape)}."
            )
        size = resized_shape(*image.shape[-2:], self.target_length)
        return F.interpolate(image.float(), size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) XY points to model-input pixels, as float64."""
        (height, width), (new_h, new_w) = original_size, resized_shape(*original_size, self.target_length)
        scaled = np.array(coords, dtype=np.float64, copy=True)
        scaled[..., 0] *= new_w / width
        scaled[..., 1] *= new_h / height
        return scaled

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 4) XYXY boxes to model-input pixels, as (N, 4) float64."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """`apply_coords` on a tensor: float32, on its device."""
        (height, width), (new_h, new_w) = original_size, resized_shape(*original_size, self.target_length)
        scaled = coords.to(torch.float32).clone()
        scaled[..., 0] *= new_w / width
        scaled[..., 1] *= new_h / height
        return scaled

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """`apply_boxes` on a tensor: (N, 4) float32, on its device."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
