"""Predictor: compute an image's embedding once, then segment it from many prompts.

Coordinates follow SAM's conventions: points are (x, y) pixels of the original image, boxes are
(x0, y0, x1, y1). Masks come back at the original image's (H, W).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .allocator import reuse_freed_memory
from .cancel import make_cancellable, stopping_on
from .crop_decoder import BACKGROUND_LOGIT, CropDecoder, pasted_on_background
from .logits import crop_to_low_res, mask_logits, to_low_res, upscale_logits
from .modeling import Sam
from .modeling.fast_decoder import DecoderConstants, ImageContext, decode_prompts, decode_with_masks
from .modeling.versions import tensor_versions
from .precision import autocast, resolve_precision
from .preprocess import resize_uint8, to_rgb_uint8
from .prompt_checks import check_box, check_mask_input, check_points
from .transforms import ResizeLongestSide, model_input_size, resized_shape
from .views import MIRRORS, Mirror, check_views
from .zoom import Window, click_window, serves, zoom_window

# Zoomed crops kept per image: clicking back and forth between a few places embeds nothing new.
HELD_CROPS = 4
# Images a CUDA GPU embeds in one encoder pass when a stack's slices are embedded (`embed_batch`).
CUDA_EMBED_BATCH = 8


@dataclass(frozen=True)
class ImageEmbedding:
    """An image's embedding and the geometry needed to map prompts and masks.

    Attributes:
        features: (V, 256, h, w) float32 embedding, on any device: one row per view of the image,
            the image itself first, then its mirror images (see `Predictor`'s `views`).
        original_size: (H, W) of the user's image.
        input_size: (h', w') of the image after resizing its longest side to the model input.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def views(self) -> int:
        return int(self.features.shape[0])


class Predictor:
    """Segment one image at a time from point, box and mask prompts.

    Args:
        model: A SAM model (see `samcore.load_model`).
        precision: "fp32", "bf16", "int8" (ViT encoders on the CPU; see `samcore.modeling.int8`),
            or "auto": bf16 where the device runs it clearly faster than fp32 (timed once per
            process on a CPU, see `samcore.precision.bf16_is_fast`), else fp32.
        refine: Decode every prompt twice, the second time with each mask's own low-resolution
            logits as `mask_input` (SAM's way of adding clicks, here without a new click), and
            return the second pass. None follows the model: on for weights registered as gaining
            from it (`samcore.zoo.ModelEntry.refine`: the bundled model), off otherwise, as in
            segment-anything. `predict` and `predict_torch` take it per call too. The second pass
            gives the single-mask output, which makes the best candidate better but the three
            candidates of a click much alike: pass ``refine=False`` to choose among distinct ones.
        views: 1, 2 or 4 views of each image: the image itself, then its mirror image left to
            right, then top to bottom and both. Each view is embedded, every prompt is mirrored
            with it and decoded, and the masks are mirrored back and their logits averaged (as are
            the scores). Where the views disagree, at a leak into a neighbouring object, the
            average cancels it. None follows the model (`samcore.zoo.ModelEntry.views`: 2 for the
            bundled model, 1 otherwise, as in segment-anything). It costs one embedding and one
            decoding per view.
        zoom: Look again at small boxed objects, and at clicks on large images (see `samcore.zoom`):
            where a box prompt covers a small part of the image, the crop around it is embedded on
            its own, enlarged to the model's input size, and decoded; clicks without a box on an
            image at least twice the model's input size are decoded on a crop of that size around
            them, at the image's own resolution. It needs the image's pixels (`set_image`, or
            `set_embedding` with ``image``) and costs one embedding of the crop per new box, or per
            clicks outside the crops held (the last `HELD_CROPS`). None follows the model
            (`samcore.zoo.ModelEntry.zoom`: on for the bundled model, off otherwise, as in
            segment-anything). `predict` takes it per call too.
        embed_batch: How many images go through the encoder in one pass where there are several of
            one size, as the slices of a stack (`embed_rgb_batch`, `samcore.embeddings.embed_slices`).
            None: `CUDA_EMBED_BATCH` on a CUDA GPU, which runs several images a pass faster than one
            at a time; 1 elsewhere, where a CPU gains nothing from it and progress and cancel come
            per pass.
    """

    def __init__(
        self,
        model: Sam,
        precision: str = "auto",
        refine: bool | None = None,
        views: int | None = None,
        zoom: bool | None = None,
        embed_batch: int | None = None,
    ) -> None:
        self.model = model.eval()
        make_cancellable(model.image_encoder)  # now, before any thread encodes with it (samcore.cancel)
        self.precision = resolve_precision(precision, model)
        self.refine = bool(getattr(model, "refine_masks", False)) if refine is None else bool(refine)
        self.views = check_views(getattr(model, "views", 1) if views is None else views)
        self.zoom = bool(getattr(model, "zoom_boxes", False)) if zoom is None else bool(zoom)
        if embed_batch is None:
            embed_batch = CUDA_EMBED_BATCH if self.device.type == "cuda" else 1
        if isinstance(embed_batch, bool) or not isinstance(embed_batch, int) or embed_batch < 1:
            raise ValueError(f"embed_batch is a number of images, at least 1, not {embed_batch!r}.")
        self.embed_batch = embed_batch
        if self.device.type == "cpu":
            reuse_freed_memory()  # large activations reused, not faulted in anew (samcore.allocator)
        self._embedding: ImageEmbedding | None = None
        self._pixels: np.ndarray | None = None  # the current image as (H, W, 3) uint8, for zooming in
        # The zoomed crops of the current image, newest last: (its pixels, the crop, the crop's embedding).
        self._crops: list[tuple[np.ndarray, Window, ImageEmbedding]] = []
        self._crop_decoder: Predictor | None = None  # decodes zoomed crops
        # Decoder work that does not depend on the prompt, kept between prompts (see `_decoding`).
        self._decoder_tensors: list[torch.Tensor] | None = None
        self._constants: tuple[tuple, DecoderConstants] | None = None
        self._context: tuple[torch.Tensor, tuple, list[ImageContext]] | None = None
        self._int8_encoder: torch.nn.Module | None = None
        self._decodes_in_batches: bool | None = None  # None: by device (see `decodes_in_batches`)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    @property
    def original_size(self) -> tuple[int, int] | None:
        return None if self._embedding is None else self._embedding.original_size

    @property
    def input_size(self) -> tuple[int, int] | None:
        return None if self._embedding is None else self._embedding.input_size

    # -- embeddings -------------------------------------------------------------------------

    def embed(
        self,
        image: np.ndarray,
        image_format: str = "RGB",
        channel_axis: int | None = None,
        cancel: threading.Event | None = None,
    ) -> ImageEmbedding:
        """Compute an image's embedding without making it the current image.

        Args:
            image: (H, W) grayscale or (H, W, C) image of any numeric dtype; see
                `samcore.preprocess.to_rgb_uint8` for the channel and intensity rules.
            image_format: "RGB" or "BGR" channel order of a 3-channel image.
            channel_axis: Axis holding channels, if not the last.
            cancel: Set it from another thread to abandon the embedding between two encoder layers.

        Returns:
            The embedding, with features on the model's device.

        Raises:
            samcore.cancel.Cancelled: `cancel` was set before the embedding was done.
        """
        return self.embed_rgb(_rgb(image, image_format, channel_axis), cancel)

    def embed_rgb(
        self, rgb: np.ndarray, cancel: threading.Event | None = None, crop: bool = False
    ) -> ImageEmbedding:
        """Embedding of a (H, W, 3) uint8 RGB image; `cancel` as in `embed`. A zoomed `crop` is enlarged to
        the model's input size whatever its size (see `samcore.transforms.model_input_size`)."""
        return self.embed_rgb_batch([rgb], cancel, crop)[0]

    def embed_rgb_batch(
        self, images: Sequence[np.ndarray], cancel: threading.Event | None = None, crop: bool = False
    ) -> list[ImageEmbedding]:
        """Embeddings of (H, W, 3) uint8 RGB images of one size, given to the encoder together.

        The same embeddings as `embed_rgb` of each image (to float rounding), in one encoder pass per
        view: on a GPU several images a pass run faster than one at a time (see `embed_batch`). A
        cancel drops them all.
        """
        if not images:
            return []
        sizes = {tuple(np.shape(rgb)) for rgb in images}
        if len(sizes) > 1:
            raise ValueError(f"Images embedded together must have one size, not {sorted(sizes)}.")
        original_size = (int(images[0].shape[0]), int(images[0].shape[1]))
        input_size = model_input_size(self.model, original_size, crop)
        resized = np.stack([resize_uint8(rgb, input_size) for rgb in images])
        return self._embed_resized(torch.from_numpy(resized).permute(0, 3, 1, 2), original_size, cancel)

    def _embed_resized(
        self, resized: torch.Tensor, original_size: tuple[int, int], cancel: threading.Event | None
    ) -> list[ImageEmbedding]:
        """Embeddings of B images of `original_size` already resized to the model's input: (B, 3, h, w),
        0-255 RGB of any dtype."""
        features = []
        with torch.inference_mode(), autocast(self.precision, self.device), stopping_on(cancel):
            # One memory layout whatever the caller's tensor: channels-last, as `embed_rgb_batch` makes
            # it. A caller's (1, 3, h, w) tensor could otherwise run the encoder on other strides: other
            # kernels, rounding apart from `set_image`'s embedding of the same pixels.
            pixels = torch.empty(
                resized.shape, dtype=torch.float32, device=self.device, memory_format=torch.channels_last
            )
            pixels.copy_(resized)
            for mirror_x, mirror_y in MIRRORS[: self.views]:  # mirrored after resizing: exact mirror images
                axes = [axis for axis, mirrored in ((-1, mirror_x), (-2, mirror_y)) if mirrored]
                view = pixels.flip(axes) if axes else pixels
                features.append(self._encode(self.model.preprocess(view)).float())
        input_size = (int(resized.shape[-2]), int(resized.shape[-1]))
        views = torch.stack(features, dim=1)  # (B, views, C, h, w)
        if len(views) == 1:
            return [ImageEmbedding(views[0], original_size, input_size)]
        # Each its own copy: a stored embedding does not keep its whole batch in memory.
        return [ImageEmbedding(image_views.clone(), original_size, input_size) for image_views in views]

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.precision != "int8":
            return self.model.image_encoder(pixels)
        from .modeling.int8 import COMPILE_ERRORS, Int8ImageEncoder  # loads torch.compile's machinery

        first = self._int8_encoder is None
        if first:
            self._int8_encoder = Int8ImageEncoder(self.model.image_encoder)
        try:
            return self._int8_encoder(pixels)
        except COMPILE_ERRORS as error:
            if not first:
                raise
            warnings.warn(
                f"int8 encoding could not be compiled on this machine (it needs a C++ compiler): "
                f"{str(error).splitlines()[0]}. Using fp32 instead.",
                stacklevel=4,
            )
            self.precision, self._int8_encoder = "fp32", None
            return self.model.image_encoder(pixels)

    def set_image(
        self,
        image: np.ndarray,
        image_format: str = "RGB",
        channel_axis: int | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Compute and keep the embedding of `image` (see `embed`) for the following predictions.

        A cancelled call (`cancel` set meanwhile) raises `samcore.cancel.Cancelled` and keeps the image
        that was current before it.
        """
        rgb = _rgb(image, image_format, channel_axis)
        self._use(self.embed_rgb(rgb, cancel), rgb)

    def set_torch_image(
        self,
        transformed_image: torch.Tensor,
        original_image_size: tuple[int, int],
        cancel: threading.Event | None = None,
    ) -> None:
        """segment-anything's `set_torch_image`: embed an image already resized for the model.

        Args:
            transformed_image: (1, 3, h, w) 0-255 RGB, the image with its longest side scaled to the
                model's input size, as ``predictor.transform.apply_image`` (then permuted to channels
                first) or ``apply_image_torch`` give it.
            original_image_size: (H, W) of the image before resizing: prompts and masks are in its pixels.
            cancel: as in `embed`.

        Without the original pixels, boxes and clicks are decoded on the whole image (no `zoom`).
        """
        if not isinstance(transformed_image, torch.Tensor):
            raise TypeError(
                f"set_torch_image takes a torch.Tensor, not {type(transformed_image).__name__}; "
                f"set_image takes a numpy image."
            )
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[:2] != (1, 3):
            raise ValueError(
                f"set_torch_image takes one RGB image as a (1, 3, h, w) tensor, not one of shape {shape}."
            )
        try:
            height, width = (int(side) for side in original_image_size)
        except (TypeError, ValueError):
            raise ValueError(
                f"original_image_size must be the image's (H, W), not {original_image_size!r}."
            ) from None
        longest = max(shape[2:])
        resized = height >= 1 and width >= 1 and shape[2:] == resized_shape(height, width, longest)
        if not resized or longest > self.model.img_size:
            raise ValueError(
                f"The image of shape {shape} is not a {height}x{width} image resized for this model, whose "
                f"input is {self.model.img_size} px: resize it with predictor.transform.apply_image first."
            )
        self._use(self._embed_resized(transformed_image, (height, width), cancel)[0])

    def set_embedding(self, embedding: ImageEmbedding, image: np.ndarray | None = None) -> None:
        """Use a precomputed embedding (e.g. from a cache) as the current image.

        Args:
            embedding: An `ImageEmbedding`, as `embed` makes it: its features and the image sizes
                they belong to (`get_image_embedding` gives the features alone).
            image: The (H, W, 3) uint8 RGB image the embedding was computed from (as
                `samcore.preprocess.to_rgb_uint8` or `StackView.rgb_slice` give it), for `zoom`;
                without it, boxes are decoded on the whole image only.
        """
        if not isinstance(embedding, ImageEmbedding):
            raise TypeError(
                f"set_embedding takes an ImageEmbedding, which records the image's size along with its "
                f"features (make one with predictor.embed(image)), not {type(embedding).__name__}."
            )
        expected = (self.model.prompt_encoder.embed_dim, *self.model.prompt_encoder.image_embedding_size)
        if embedding.features.ndim != 4 or tuple(embedding.features.shape[1:]) != expected:
            raise ValueError(
                f"This embedding has shape {tuple(embedding.features.shape)}, but the model makes "
                f"({self.views}, {', '.join(map(str, expected))}): it was computed with another model."
            )
        if embedding.views != self.views:
            raise ValueError(
                f"This embedding holds {embedding.views} view(s) of its image, but this predictor decodes "
                f"{self.views} (views={self.views}): compute the embedding with the same views setting."
            )
        if image is not None:
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.shape != (*embedding.original_size, 3):
                height, width = embedding.original_size
                raise ValueError(
                    f"image must be the embedding's {height}x{width} image as (H, W, 3) uint8 RGB, not an "
                    f"array of shape {image.shape} and dtype {image.dtype}."
                )
        features = embedding.features.to(self.device, torch.float32)
        self._use(ImageEmbedding(features, embedding.original_size, embedding.input_size), image)

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's (V, 256, h, w) embedding: (1, 256, h, w) with one view."""
        return self._current().features

    def reset_image(self) -> None:
        """Forget the current image."""
        self._use(None)

    # -- prompts ----------------------------------------------------------------------------

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        refine: bool | None = None,
        zoom: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for one object on the current image.

        Args:
            point_coords: (N, 2) XY points in original-image pixels.
            point_labels: (N,) labels, 1 foreground and 0 background (-1: ignored).
            box: (4,) XYXY box in original-image pixels.
            mask_input: (1, 256, 256) low-resolution logits from a previous prediction.
            multimask_output: Return 3 candidate masks (best for a single ambiguous click).
            return_logits: Return logits instead of boolean masks.
            refine: Decode each candidate a second time with its own logits as mask input (see
                the class); None: this predictor's `refine`.
            zoom: Decode a box around a small object on the crop around it (see the class);
                None: this predictor's `zoom`.

        Returns:
            masks (C, H, W) bool (float32 logits with return_logits), scores (C,) predicted IoUs,
            and low-resolution logits (C, 256, 256), with C = 3 or 1.
        """
        embedding = self._current()
        coords, labels, boxes, masks = self._prompts_to_tensors(
            embedding, point_coords, point_labels, box, mask_input
        )
        zoom = self.zoom if zoom is None else zoom
        window = None
        if zoom:
            window = self.zoom_window(box, point_coords)
        if window is None:
            out_masks, scores, low_res = self.predict_torch(
                coords, labels, boxes, masks, multimask_output, return_logits, refine
            )
            return (
                out_masks[0].cpu().numpy(), scores[0].float().cpu().numpy(), low_res[0].float().cpu().numpy()
            )
        return self._predict_zoomed(
            window, (point_coords, point_labels, box, mask_input), multimask_output, return_logits, refine
        )

    def predict_logits(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        refine: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`predict` without the full-resolution masks, on the whole image (not zoomed in).

        On a large image, upscaling is most of a prediction's time (three masks of a 3000x4000
        image take longer than decoding them), so a front end that shows one candidate at a time
        upscales it when it is shown, with `masks_from_logits`: the masks are those of `predict`.

        Returns:
            scores (C,) predicted IoUs and low-resolution logits (C, 256, 256), C = 3 or 1.
        """
        embedding = self._current()
        tensors = self._prompts_to_tensors(embedding, point_coords, point_labels, box, mask_input)
        refine = self.refine if refine is None else refine
        low_res, scores = self.predict_low_res(*tensors, multimask_output, refine)
        return scores[0].float().cpu().numpy(), low_res[0].float().cpu().numpy()

    def prepare_decoding(self) -> None:
        """Make now the part of decoding the current image that no prompt changes (one context per view).

        The first prompt on an image makes it otherwise, and waits about as long again as a prompt
        for each view. A front end calls this while the user looks at the image, so that the first
        click on it comes back as fast as the next. Where prompts are decoded in batches (see
        `decodes_in_batches`) there is no such part, and nothing is done.
        """
        embedding = self._current()
        if not self.decodes_in_batches:
            with torch.inference_mode():
                self._decoding(embedding)

    def masks_from_logits(self, low_res: np.ndarray, return_logits: bool = False) -> np.ndarray:
        """(C, 256, 256) low-resolution logits of the current image to (C, H, W) masks, as `predict`
        makes them (float32 logits with `return_logits`)."""
        logits = torch.as_tensor(np.asarray(low_res, dtype=np.float32), device=self.device)
        return self._full_resolution(logits[None], return_logits)[0].cpu().numpy()

    def _full_resolution(self, low_res: torch.Tensor, return_logits: bool) -> torch.Tensor:
        """(B, C, 256, 256) low-resolution logits to (B, C, H, W) masks of the current image (logits
        with `return_logits`)."""
        embedding = self._current()
        with torch.inference_mode():
            masks = upscale_logits(low_res, self.model.img_size, embedding.input_size, embedding.original_size)
            return masks if return_logits else masks > self.model.mask_threshold

    def _predict_zoomed(
        self, window: Window, prompts: tuple, multimask_output: bool, return_logits: bool, refine: bool | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`predict` on the crop `window` of the image, its logits pasted on background.

        The object lies inside the crop: a box's crop spans `samcore.zoom.ZOOM_CONTEXT` times its
        longest side, and a crop for clicks holds them. On generated scenes (three seeds, 314 zoomed
        boxes), the whole image's masks, which once stood outside a box's crop, never had a pixel
        there, and decoding them doubled the time of a zoomed box once its crop was embedded.
        """
        embedding = self._current()
        point_coords, point_labels, box, mask_input = prompts
        refine = self.refine if refine is None else refine
        sizes = (self.model.img_size, embedding.input_size, embedding.original_size)
        side = self.model.prompt_encoder.mask_input_size[0]  # of the low-resolution logits
        background = BACKGROUND_LOGIT
        crop = self._crop_predictor(window)
        with torch.inference_mode():
            crop_mask = None
            if mask_input is not None:  # the given logits, in the crop's frame
                given = torch.as_tensor(np.asarray(mask_input, np.float32), device=self.device)
                given = given.reshape(1, 1, side, side)
                given = upscale_logits(given, *sizes)[0]
                crop_mask = to_low_res(
                    given[(slice(None), *window.slices)], background, self.model.img_size, crop.input_size,
                    side,
                ).cpu().numpy()
        crop_logits, scores, _ = crop.predict(
            None if point_coords is None else window.points(point_coords), point_labels,
            None if box is None else window.box(box),
            crop_mask, multimask_output, return_logits=True, refine=refine, zoom=False,
        )
        masks = pasted_on_background(
            crop_logits, window, embedding.original_size, self.model.mask_threshold, return_logits
        )
        low_res = crop_to_low_res(
            torch.from_numpy(crop_logits), (window.y0, window.x0, window.height, window.width), background,
            *sizes, side,
        )
        return masks, scores, low_res.numpy()

    def zoom_window(
        self, box: np.ndarray | None = None, point_coords: np.ndarray | None = None
    ) -> Window | None:
        """The crop a zoomed `predict` of these prompts decodes on; None where it would not zoom in.

        For clicks alone, a crop held for earlier clicks that serves these (`samcore.zoom.serves`), so
        that no new crop is embedded. None too without the image's pixels (see `set_embedding`).
        """
        if self._pixels is None:
            return None
        size = self._current().original_size
        points = None if point_coords is None else np.asarray(point_coords, dtype=np.float64).reshape(-1, 2)
        if box is not None:
            return zoom_window(box, points, size)
        if points is None or not len(points):
            return None
        fresh = click_window(points, size, self.model.img_size)
        if fresh is None:
            return None
        for _, held, _ in reversed(self._held_crops()):
            same_size = (held.width, held.height) == (fresh.width, fresh.height)
            if held.clicks and same_size and serves(held, points, size):
                return held
        return fresh

    def embed_crop(self, window: Window, cancel: threading.Event | None = None) -> ImageEmbedding:
        """Embed the crop `window` of the current image and keep it for zoomed predictions.

        This is the slow part of a zoomed `predict`, and the only part that may run in another thread
        while this predictor decodes (an interactive front end calls it in a worker, then predicts).
        `cancel` as in `embed`.
        """
        pixels = self._pixels
        if pixels is None:
            raise RuntimeError("Zooming in needs the image's pixels: set_image, or set_embedding(image=...).")
        crop = self.embed_rgb(np.ascontiguousarray(pixels[window.slices]), cancel, crop=True)
        if pixels is self._pixels:  # still the current image
            kept = [held for held in self._held_crops() if held[1] != window]
            self._crops = [*kept, (pixels, window, crop)][-HELD_CROPS:]
        return crop

    def has_crop(self, window: Window) -> bool:
        """Whether the crop `window` of the current image is embedded (a zoomed `predict` is then fast)."""
        return self._held_crop(window) is not None

    def crop_decoder(self, window: Window) -> CropDecoder:
        """Decode clicks on the crop `window` of the current image (from `zoom_window`, for clicks alone),
        as `predict_logits` and `masks_from_logits` do on the whole image (see `CropDecoder`).

        A front end that shows one candidate at a time uses it as it uses the predictor, on a zoomed
        click. The crop is embedded now unless held (see `embed_crop`).
        """
        if not window.clicks:
            raise ValueError(
                "crop_decoder is for the crop of clicks alone; a box's crop is decoded by predict."
            )
        crop = self._crop_predictor(window)
        return CropDecoder(crop, window, crop._current(), self._current().original_size)

    def _held_crops(self) -> list[tuple[np.ndarray, Window, ImageEmbedding]]:
        """The crops held for the current image (a thread may have embedded one as the image changed)."""
        return [held for held in self._crops if held[0] is self._pixels]

    def _held_crop(self, window: Window) -> ImageEmbedding | None:
        return next((crop for _, held, crop in self._held_crops() if held == window), None)

    def _crop_predictor(self, window: Window) -> Predictor:
        """A predictor decoding the embedding of the crop `window` of the current image."""
        embedding = self._held_crop(window)
        if embedding is None:
            embedding = self.embed_crop(window)
        if self._crop_decoder is None:
            self._crop_decoder = Predictor(self.model, self.precision, self.refine, self.views, zoom=False)
        self._crop_decoder.set_embedding(embedding)
        return self._crop_decoder

    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        refine: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict masks for a batch of B prompts, in model-input coordinates.

        The batch is decoded on the whole image: no prompt is zoomed in on (see the class), so with
        the bundled model a small box gives a coarser mask here than through `predict`.

        Args:
            point_coords: (B, N, 2) XY points already mapped with `transform_coords`.
            point_labels: (B, N) labels.
            boxes: (B, 4) XYXY boxes already mapped with `transform_boxes`.
            mask_input: (B, 1, 256, 256) low-resolution logits.
            multimask_output: 3 masks per prompt instead of 1.
            return_logits: Return logits instead of boolean masks.
            refine: A second pass per mask (see the class); None: this predictor's `refine`.

        Returns:
            masks (B, C, H, W), scores (B, C), low-resolution logits (B, C, 256, 256).
        """
        refine = self.refine if refine is None else refine
        low_res, scores = self.predict_low_res(
            point_coords, point_labels, boxes, mask_input, multimask_output, refine
        )
        return self._full_resolution(low_res, return_logits), scores, low_res

    def predict_low_res(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        refine: bool = False,
        views: int | None = None,
        min_score: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `predict_torch`, without upscaling: for callers that keep only a few of many masks.

        `refine` is off unless asked for: the many-mask callers (automatic segmentation) are
        calibrated on one pass. `views`: decode the first 1, 2 or 4 views of the embedding (None:
        all it holds); the others are ignored.

        `min_score`: for callers that drop every mask scored below it. The masks of a prompt whose
        scores are all lower may then be left out, their logits all -1e4 (empty masks): decoded
        one prompt at a time (`decodes_in_batches` False), in one view and one pass without mask
        input, such a prompt takes about a third less time. The scores are always made.

        Returns:
            low-resolution logits (B, C, 256, 256) and scores (B, C); `upscale_logits` maps kept
            logits to the original image.
        """
        embedding = self._current()
        count = embedding.views if views is None else check_views(views)
        if count > embedding.views:
            raise ValueError(f"views={views}: at most the embedding's {embedding.views} can be decoded.")
        # With several views or passes, the scores that count are known only at the end.
        skip_below = min_score if count == 1 and not refine and mask_input is None else None
        with torch.inference_mode():
            contexts = None if self.decodes_in_batches else self._decoding(embedding)[1]
            low_res = scores = None
            for index in range(count):
                mirror = Mirror(*MIRRORS[index], embedding.input_size, self.model)
                points = None if point_coords is None else (mirror.points(point_coords), point_labels)
                view_boxes = None if boxes is None else mirror.boxes(boxes)
                view_masks = None if mask_input is None else mirror.logits(mask_input)
                source = embedding.features[index : index + 1] if contexts is None else contexts[index]
                view_low_res, view_scores = self._decode(
                    source, points, view_boxes, view_masks, multimask_output, refine, skip_below
                )
                view_low_res = mirror.logits(view_low_res)
                if low_res is None:
                    low_res, scores = view_low_res, view_scores
                else:
                    low_res, scores = low_res + view_low_res, scores + view_scores
            if count > 1:
                low_res, scores = low_res / count, scores / count
            return low_res, scores

    def _decode(
        self,
        source: ImageContext | torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        refine: bool,
        min_score: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution logits and scores of one view. `source` is the view's decoder context, for the
        rewrite of `samcore.modeling.fast_decoder` one prompt at a time, or its (1, C, h, w) features, for
        the model's own mask decoder with every prompt at once (see `decodes_in_batches`). `min_score`:
        see `predict_low_res`."""
        sparse, dense = self.model.prompt_encoder(points, boxes, None)
        if mask_input is not None and points is None and boxes is None:  # one sparse row (no prompt) per mask
            sparse = sparse.expand(len(mask_input), -1, -1)
        low_res, scores = self._decode_once(source, sparse, dense, mask_input, multimask_output, min_score)
        if not refine:
            return low_res, scores
        # Each candidate again, with its own logits and the same prompts: the single-mask output.
        batch, count = scores.shape
        again = sparse.expand(batch, -1, -1).repeat_interleave(count, dim=0)
        low_res, scores = self._decode_once(source, again, dense, low_res.flatten(0, 1)[:, None], False)
        return low_res.view(batch, count, *low_res.shape[-2:]), scores.view(batch, count)

    def _decode_once(
        self,
        source: ImageContext | torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        min_score: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass over (N, T, C) sparse prompts, with (N, 1, h, w) mask inputs or none (then
        `dense`, the prompt encoder's no-mask embedding); `source` as in `_decode`. `min_score`: see
        `predict_low_res` (taken by the rewrite without mask inputs)."""
        if isinstance(source, ImageContext):
            # The dense embedding of a mask input is made by `decode_with_masks`, in low-rank form.
            if mask_input is None:
                return decode_prompts(source, sparse, multimask_output, min_score)
            return decode_with_masks(source, sparse, mask_input, multimask_output)
        prompt_encoder = self.model.prompt_encoder
        if mask_input is not None:
            dense = prompt_encoder(None, None, mask_input)[1]
        return self.model.mask_decoder(source, prompt_encoder.get_dense_pe(), sparse, dense, multimask_output)

    @property
    def decodes_in_batches(self) -> bool:
        """Whether prompts go through the model's own mask decoder all at once, as in segment-anything,
        rather than through the rewrite of `samcore.modeling.fast_decoder` one prompt at a time.

        The rewrite does a fraction of the work, which is what counts on a CPU. On a GPU, the many
        small operations of each prompt cost more than the work, and the batch is faster.
        """
        if self._decodes_in_batches is not None:
            return self._decodes_in_batches
        return self.device.type != "cpu"

    @property
    def transform(self) -> ResizeLongestSide:
        """segment-anything's `predictor.transform`: prompts of the current image to model-input pixels,
        for `predict_torch` (`transform_coords` and `transform_boxes` do the same)."""
        if self._embedding is None:
            return ResizeLongestSide(self.model.img_size)
        return ResizeLongestSide(max(self._embedding.input_size))  # the image's longest side, as embedded

    @property
    def features(self) -> torch.Tensor:
        """segment-anything's `predictor.features`: the current image's embedding, as
        `get_image_embedding` gives it."""
        return self.get_image_embedding()

    def transform_coords(self, coords: np.ndarray) -> np.ndarray:
        """Map (..., 2) XY original-image pixels of the current image to model-input pixels."""
        return self.transform.apply_coords(coords, self._current().original_size)

    def transform_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map (..., 4) XYXY original-image boxes of the current image to model-input pixels."""
        return self.transform_coords(np.asarray(boxes).reshape(-1, 2, 2)).reshape(-1, 4)

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """Low-resolution logits standing for a (H, W) mask of the current image, as a `mask_input`.

        For a mask that did not come from the decoder (painted, or from another slice). Alone, such
        a mask prompt decodes poorly; give it with a box or clicks.
        """
        embedding = self._current()
        mask = np.asarray(mask)
        if mask.shape != embedding.original_size:
            raise ValueError(f"The mask has shape {mask.shape}, the image {embedding.original_size}.")
        return mask_logits(mask, self.model, embedding.input_size)

    # -- helpers ----------------------------------------------------------------------------

    def _use(self, embedding: ImageEmbedding | None, pixels: np.ndarray | None = None) -> None:
        """Make `embedding` (of `pixels`, if known) the current image; what belongs to another is dropped."""
        if self._context is not None and (embedding is None or self._context[0] is not embedding.features):
            self._context = None
        if pixels is not self._pixels:
            self._crops = []  # another image's
        self._embedding, self._pixels = embedding, pixels

    def _decoding(self, embedding: ImageEmbedding) -> tuple[DecoderConstants, list[ImageContext]]:
        """The decoder's per-model constants and the image's contexts (one per view), made when first needed.

        Both are checked against the storage and in-place version counters of the tensors they derive
        from, so weights loaded or moved in place, or an embedding changed in place (outside inference
        mode), are never decoded with stale values.
        """
        prompt_encoder, decoder = self.model.prompt_encoder, self.model.mask_decoder
        if self._decoder_tensors is None:  # listing them walks the modules: slower than checking them
            self._decoder_tensors = [*prompt_encoder.parameters(), *prompt_encoder.buffers(), *decoder.parameters()]
        weights = tensor_versions(self._decoder_tensors)
        if self._constants is None or self._constants[0] != weights:
            constants = DecoderConstants(decoder, prompt_encoder.get_dense_pe(), prompt_encoder)
            self._constants = (weights, constants)
            self._context = None
        constants = self._constants[1]
        features = embedding.features
        current = self._context
        if current is None or current[0] is not features or current[1] != tensor_versions([features]):
            self._context = None  # its buffers are about to be reused
            no_mask = prompt_encoder.no_mask_embed.weight.T  # the no-mask dense prompt
            contexts = [
                ImageContext(constants, view.flatten(1) + no_mask, constants.context_space(index))
                for index, view in enumerate(features)
            ]
            # Holding `features` keeps its storage from being reused by another embedding.
            self._context = (features, tensor_versions([features]), contexts)
        return constants, self._context[2]

    def _current(self) -> ImageEmbedding:
        if self._embedding is None:
            raise RuntimeError("No image is set: call set_image(image) or set_embedding(...) first.")
        return self._embedding

    def _prompts_to_tensors(
        self,
        embedding: ImageEmbedding,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        height, width = embedding.original_size
        coords = labels = boxes = masks = None
        if point_coords is not None:
            points = check_points(point_coords, point_labels, height, width)
            coords = torch.as_tensor(self.transform_coords(points[0]), dtype=torch.float32, device=self.device)[None]
            labels = torch.as_tensor(points[1], dtype=torch.int64, device=self.device)[None]
        elif point_labels is not None:
            raise ValueError("point_labels were given without point_coords.")
        if box is not None:
            checked = check_box(box, height, width)
            boxes = torch.as_tensor(self.transform_boxes(checked), dtype=torch.float32, device=self.device)
        if mask_input is not None:
            side = self.model.prompt_encoder.mask_input_size
            masks = check_mask_input(mask_input, side).to(self.device)
        return coords, labels, boxes, masks


def _rgb(image: np.ndarray, image_format: str, channel_axis: int | None) -> np.ndarray:
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', not {image_format!r}.")
    rgb = to_rgb_uint8(np.asarray(image), channel_axis=channel_axis)
    return np.ascontiguousarray(rgb[..., ::-1]) if image_format == "BGR" else rgb
