"""Decode batches of prompts on the slices of a stack, computing missing embeddings on the way.

`propagate` talks to a stack only through the small `SliceDecoder` interface below, so that its
rules can be exercised with any stand-in; `StackDecoder` is the one backed by a `Predictor`.
Coordinates follow SAM's engine conventions: points are (x, y), boxes (x0, y0, x1, y1), in pixels
of the original slice.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .cancel import stopping_on
from .embeddings import EmbeddingStore, StackView, model_key, stack_key
from .logits import mask_logits
from .predictor import Predictor
from .progress import Job, Progress, run
from .transforms import model_input_size
from .zoom import click_order


@dataclass(frozen=True)
class SlicePrompt:
    """The prompts for one object on one slice.

    Attributes:
        points: (N, 2) float XY points, N >= 0.
        labels: (N,) int labels, 1 foreground, 0 background.
        box: (4,) float XYXY box, or None.
        mask_input: Low-resolution logits (as returned in `SliceOutput.low_res`) or None.
        multimask: Decode the 3 candidate masks and keep the one with the best predicted IoU
            (for a single ambiguous click).
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    multimask: bool = False

    def structure(self) -> tuple[bool, bool, bool, bool]:
        """What the prompt holds: prompts of the same structure are decoded in one batch."""
        return len(self.points) > 0, self.box is not None, self.mask_input is not None, self.multimask


@dataclass(frozen=True)
class SliceOutput:
    """One decoded mask.

    Attributes:
        logits: (Y, X) float32 mask logits of the slice; the mask is ``logits > 0``.
        score: The model's predicted IoU of the mask.
        low_res: Low-resolution logits, usable as the `mask_input` of a next prompt.
    """

    logits: np.ndarray
    score: float
    low_res: np.ndarray


class SliceDecoder(Protocol):
    """What propagation needs from a model and a stack."""

    shape: tuple[int, int, int]  # (Z, Y, X)

    def has_embedding(self, z: int) -> bool: ...

    def embed(self, z: int) -> None: ...

    def decode(self, z: int, prompts: Sequence[SlicePrompt]) -> list[SliceOutput]: ...

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray: ...

    def intensities(self, z: int) -> np.ndarray: ...


class StackDecoder:
    """A `SliceDecoder` on a `Predictor`, with the stack's embeddings kept in an `EmbeddingStore`.

    Args:
        predictor: The predictor; `decode` changes its current image, so a propagation running
            beside interactive use wants a `Predictor` of its own (on the same model).
        image: (Z, Y, X) stack, (Y, X) image, or a `StackView` (e.g. for RGB stacks).
        store: Where embeddings are looked up and kept; a new in-memory store by default.
        zoom: Decode a box around a small object, and clicks alone on a large image, on the crop
            around them, like `Predictor.predict` with zoom: one more embedding per such prompt
            (clicks near earlier ones may reuse theirs), decoded on its own rather than in a batch.
        cancel: Set it from another thread to abandon an embedding in progress: `embed` and `decode`
            then raise `samcore.cancel.Cancelled`.
    """

    def __init__(
        self,
        predictor: Predictor,
        image: np.ndarray | StackView,
        store: EmbeddingStore | None = None,
        zoom: bool = False,
        cancel: threading.Event | None = None,
    ) -> None:
        self.predictor = predictor
        self.zoom = zoom
        self.cancel = cancel
        self.view = image if isinstance(image, StackView) else StackView.of(image)
        if store is None:
            key = stack_key(self.view, model_key(predictor.model), predictor.views)
            store = EmbeddingStore(key, self.view.n_slices)
        elif store.n_slices != self.view.n_slices:
            raise ValueError(
                f"The embedding store holds {store.n_slices} slices, but the stack has {self.view.n_slices}: "
                "it belongs to another image."
            )
        self.store = store
        self.shape = (self.view.n_slices, *self.view.data.shape[1:3])

    def has_embedding(self, z: int) -> bool:
        return z in self.store

    def embed(self, z: int) -> None:
        """Compute and keep the embedding of slice z."""
        self.store.put(z, self.predictor.embed_rgb(self.view.rgb_slice(z), self.cancel))

    def decode(self, z: int, prompts: Sequence[SlicePrompt]) -> list[SliceOutput]:
        """Decode one mask per prompt on slice z, prompts of one structure in one batch.

        Returns:
            One `SliceOutput` per prompt, in the order of `prompts`.
        """
        return run(self.decode_steps(z, prompts))

    def decode_steps(self, z: int, prompts: Sequence[SlicePrompt]) -> Job[list[SliceOutput]]:
        """`decode` as a job: it yields `Progress("prompts", done, total, z)` after each zoomed prompt (each
        embeds a crop) and after the batches of the others, and returns the outputs."""
        if not self.has_embedding(z):
            self.embed(z)
        pixels = self.view.rgb_slice(z) if self.zoom else None  # only a zoomed decode needs them
        self.predictor.set_embedding(self.store.get(z), image=pixels)
        outputs: list[SliceOutput | None] = [None] * len(prompts)
        zoomed: list[int] = []
        groups: dict[tuple[bool, ...], list[int]] = {}
        for index, prompt in enumerate(prompts):
            if self.zoom and self._zooms(prompt):
                zoomed.append(index)
            else:
                groups.setdefault(prompt.structure(), []).append(index)
        # Clicks alone in an order that shares their crops; boxes first, each with its own crop.
        clicks = [index for index in zoomed if prompts[index].box is None]
        points = [prompts[index].points for index in clicks]
        order = click_order(points, self.shape[1:3], self.predictor.model.img_size)
        zoomed = [index for index in zoomed if prompts[index].box is not None] + [clicks[i] for i in order]
        # A zoomed prompt embeds its crop, and the decoder checks before each prompt: both stop on `cancel`.
        for done, index in enumerate(zoomed, start=1):
            with stopping_on(self.cancel):
                outputs[index] = self._decode_zoomed(prompts[index])
            yield Progress("prompts", done, len(prompts), z)
        with stopping_on(self.cancel):
            for indices in groups.values():
                for index, output in zip(indices, self._decode_batch([prompts[i] for i in indices])):
                    outputs[index] = output
        if groups:
            yield Progress("prompts", len(prompts), len(prompts), z)
        return outputs

    def logits_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """Low-resolution logits standing for a (Y, X) bool mask of a slice, as a `mask_input`."""
        model = self.predictor.model
        return mask_logits(mask, model, model_input_size(model, (self.shape[1], self.shape[2])))

    def intensities(self, z: int) -> np.ndarray:
        """Slice z's own (Y, X) float32 intensities (RGB: the mean of its channels)."""
        plane = np.asarray(self.view.data[z], dtype=np.float32)
        return plane[..., :3].mean(axis=-1) if self.view.rgb else plane

    def _zooms(self, prompt: SlicePrompt) -> bool:
        """Whether the predictor would decode the prompt zoomed in (see `samcore.zoom`): a small box, or
        clicks alone on a large image."""
        points = prompt.points if len(prompt.points) else None
        if prompt.box is None and (points is None or prompt.mask_input is not None):
            return False
        return self.predictor.zoom_window(prompt.box, points) is not None

    def _decode_zoomed(self, prompt: SlicePrompt) -> SliceOutput:
        points = len(prompt.points) > 0
        logits, scores, low_res = self.predictor.predict(
            prompt.points if points else None, prompt.labels if points else None, prompt.box,
            prompt.mask_input, multimask_output=prompt.multimask, return_logits=True, refine=False, zoom=True,
        )
        best = int(np.argmax(scores))
        return SliceOutput(np.asarray(logits[best], np.float32), float(scores[best]), low_res[best][None])

    def _decode_batch(self, prompts: list[SlicePrompt]) -> list[SliceOutput]:
        predictor, device = self.predictor, self.predictor.device
        has_points, has_box, has_mask, multimask = prompts[0].structure()
        coords = labels = boxes = masks = None
        if has_points:
            count = max(len(p.points) for p in prompts)
            xy = np.zeros((len(prompts), count, 2))
            tags = np.full((len(prompts), count), -1, dtype=np.int64)  # -1: padding, not a point
            for row, prompt in enumerate(prompts):
                xy[row, : len(prompt.points)] = prompt.points
                tags[row, : len(prompt.points)] = prompt.labels
            coords = torch.as_tensor(predictor.transform_coords(xy), dtype=torch.float32, device=device)
            labels = torch.as_tensor(tags, device=device)
        if has_box:
            stacked = np.stack([p.box for p in prompts]).astype(np.float64)
            boxes = torch.as_tensor(predictor.transform_boxes(stacked), dtype=torch.float32, device=device)
        if has_mask:
            stacked = np.stack([np.asarray(p.mask_input, dtype=np.float32).reshape(1, *p.mask_input.shape[-2:])
                                for p in prompts])
            masks = torch.as_tensor(stacked, device=device)
        # One decoder pass even for models that refine interactive prompts (`Predictor.refine`):
        # on generated stacks, refining every slice made propagation worse and twice as slow.
        logits, scores, low_res = predictor.predict_torch(
            coords, labels, boxes, masks, multimask_output=multimask, return_logits=True, refine=False
        )
        best = scores.argmax(dim=1)
        rows = torch.arange(len(prompts), device=scores.device)
        logits, scores, low_res = logits[rows, best], scores[rows, best], low_res[rows, best]
        logits = logits.float().cpu().numpy()
        scores = scores.float().cpu().numpy()
        low_res = low_res.float().cpu().numpy()
        return [SliceOutput(logits[i], float(scores[i]), low_res[i][None]) for i in range(len(prompts))]

