"""The SAM model: an image encoder, a prompt encoder and a mask decoder, composed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
#: How a non-square image is filled out to the square input: "zeros" after normalisation (SAM's
#: way, what its weights were trained with), or "mirror", the image reflected at its edges, again
#: and again where the gap is wider than the image.
PADDINGS = ("zeros", "mirror")


class Sam(nn.Module):
    """Segment Anything from its parts.

    Args:
        image_encoder: Maps (B, 3, S, S) normalised images to (B, 256, S/16, S/16) embeddings;
            must expose `img_size` (S).
        prompt_encoder: Embeds points, boxes and masks.
        mask_decoder: Predicts masks and IoU scores.
        pixel_mean: Per-channel mean of 0-255 RGB input, subtracted before encoding.
        pixel_std: Per-channel standard deviation, divided before encoding.
        padding: One of `PADDINGS`: what fills the input square beyond a non-square image.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"  # the channel order the encoder expects, as segment-anything's model says

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
        padding: str = "zeros",
    ) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, not {padding!r}.")
        self.padding = padding
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.architecture = ""  # set by the builder to its registry name
        # Automatic-segmentation thresholds of these weights, where they differ from SAM's (set by
        # `samcore.load_model` from the model's registry entry; see `AutoSettings.for_model`).
        self.auto_defaults: dict[str, float] = {}

    @property
    def img_size(self) -> int:
        """Side of the square model input in pixels."""
        return int(self.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (B, 3, h, w) 0-255 RGB and pad it bottom-right to (B, 3, S, S) (see `padding`)."""
        x = (x - self.pixel_mean) / self.pixel_std
        height, width = x.shape[-2:]
        size = self.img_size
        if self.padding == "mirror":
            rows, columns = (_mirrored_indices(n, size, x.device) for n in (height, width))
            return x.index_select(-2, rows).index_select(-1, columns)
        return F.pad(x, (0, size - width, 0, size - height))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Upscale low-resolution logits to the original image.

        Args:
            masks: (B, C, 4H, 4W) low-resolution logits.
            input_size: (h, w) of the resized image before padding.
            original_size: (H, W) of the user's image.

        Returns:
            (B, C, H, W) logits.
        """
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, batched_input: list[dict], multimask_output: bool) -> list[dict]:
        """segment-anything's end-to-end call, ``sam(batched_input, multimask_output)``, for scripts
        written for it (interactive work is faster through `samcore.Predictor`).

        Args:
            batched_input: One dict per image: "image", a (3, h, w) 0-255 RGB tensor already resized so
                that its longest side is `img_size` (``ResizeLongestSide.apply_image_torch`` or
                ``apply_image``); "original_size", its (H, W) before resizing; and optionally
                "point_coords" (B, N, 2) with "point_labels" (B, N), "boxes" (B, 4) and "mask_inputs"
                (B, 1, 256, 256), in the resized image's pixels.
            multimask_output: Three masks per prompt instead of one.

        Returns:
            One dict per image: "masks" (B, C, H, W) bool, "iou_predictions" (B, C) and
            "low_res_logits" (B, C, 256, 256).
        """
        if isinstance(batched_input, dict) or not all(isinstance(entry, dict) for entry in batched_input):
            raise TypeError("sam(...) takes a list of one dict per image (segment-anything's batched input).")
        for index, entry in enumerate(batched_input):
            missing = {"image", "original_size"} - set(entry)
            if missing:
                raise ValueError(f"Image {index} of the batch lacks {', '.join(sorted(missing))}.")
            image = entry["image"]
            if image.ndim != 3 or image.shape[0] != 3 or max(image.shape[1:]) > self.img_size:
                raise ValueError(
                    f"Image {index} of the batch has shape {tuple(image.shape)}: it must be (3, h, w), "
                    f"resized so that its longest side is at most {self.img_size} (apply_image_torch)."
                )
        images = torch.stack([self.preprocess(entry["image"][None].float())[0] for entry in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for entry, embedding in zip(batched_input, embeddings):
            points = (entry["point_coords"], entry["point_labels"]) if "point_coords" in entry else None
            sparse, dense = self.prompt_encoder(points, entry.get("boxes"), entry.get("mask_inputs"))
            low_res, iou_predictions = self.mask_decoder(
                embedding[None], self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
            )
            input_size, original_size = tuple(entry["image"].shape[-2:]), tuple(entry["original_size"])
            masks = self.postprocess_masks(low_res, input_size, original_size) > self.mask_threshold
            outputs.append({"masks": masks, "iou_predictions": iou_predictions, "low_res_logits": low_res})
        return outputs


def _mirrored_indices(length: int, size: int, device: torch.device) -> torch.Tensor:
    """Indices 0..length-1 followed by their reflection, edge pixel repeated, up to `size` entries."""
    position = torch.arange(size, device=device) % (2 * length)
    return torch.where(position < length, position, 2 * length - 1 - position)
