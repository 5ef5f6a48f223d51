"""The masks the current prompts decoded to, and which of them the preview shows."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from samcore import Predictor
    from samcore.crop_decoder import CropDecoder


class Candidates:
    """The candidate masks of the prompts on the displayed slice: three for a single click, else one.

    A candidate's full-resolution mask is made when it is first shown: on a large image, upscaling
    the three candidates of a click costs more than decoding them, and the user looks at one. With
    refinement, a single click's candidates are also refined one at a time, when first shown: the
    best one at once, the others on N (refining all three first takes twice as long, and was as good
    on generated scenes), each keeping its own reading of the click (see `refine_shown`). A zoomed
    click's are too, on the crop around it.

    Args:
        scores: (C,) predicted IoUs; the best candidate is shown first.
        low_res: (C, 256, 256) low-resolution logits.
        decoder: What decoded them, still on the displayed slice: the predictor, or for a zoomed click
            the crop's decoder (`Predictor.crop_decoder`). It upscales logits to masks of the slice and
            refines candidates.
        masks: (C, Y, X) bool masks made already (a zoomed box's prediction pastes them together at
            full resolution); None: made from `low_res` when shown.
        zoomed: The masks were decoded on the crop around a small box or a click.
        unrefined: For a lazily refined click, the `predict` arguments of its prompt: `low_res`
            are then the first pass's logits; None when nothing is left to refine.
    """

    def __init__(
        self,
        scores: np.ndarray,
        low_res: np.ndarray,
        decoder: Predictor | CropDecoder,
        masks: np.ndarray | None = None,
        zoomed: bool = False,
        unrefined: dict | None = None,
    ) -> None:
        self.scores, self.low_res, self.zoomed = scores, low_res, zoomed
        self._decoder = decoder
        self._masks: list[np.ndarray | None] = list(masks) if masks is not None else [None] * len(scores)
        # Shown best first, then by falling predicted IoU (as first decoded: refining changes scores).
        self._order = [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")]
        self._rank = 0
        self.index = self._order[0]
        self._prompt = unrefined
        self._pending = set(range(len(scores))) if unrefined is not None else set()

    @property
    def shown(self) -> np.ndarray:
        """The (Y, X) mask the preview shows."""
        return self.mask(self.index)

    def mask(self, index: int) -> np.ndarray:
        """Candidate `index`'s (Y, X) mask, made from its logits on first use."""
        if self._masks[index] is None:
            self._masks[index] = self._decoder.masks_from_logits(self.low_res[index][None])[0]
        return self._masks[index]

    def next(self) -> bool:
        """Show the next candidate; False if there is only one."""
        if len(self.scores) < 2:
            return False
        self._rank = (self._rank + 1) % len(self._order)
        self.index = self._order[self._rank]
        return True

    def refine_shown(self) -> None:
        """Refine the shown candidate if it is not yet."""
        if self.index not in self._pending:
            return
        # The best candidate through the single-mask output, as `Predictor(refine=True)` does. Each other
        # through its own multimask output: through the single one they all became the best one again
        # (300 clicks on generated scenes: the three candidates overlapped by a median IoU of 0.97, against
        # 0.65 this way, and the best of the three matched the object by 0.739, against 0.756).
        own = self._rank > 0
        score, low_res = self._decoder.predict_logits(
            **self._prompt, mask_input=self.low_res[self.index][None], multimask_output=own, refine=False
        )
        pick = self.index if own else 0
        self.low_res[self.index], self.scores[self.index] = low_res[pick], score[pick]
        self._masks[self.index] = None
        self._pending.discard(self.index)

    def describe(self, zooming: bool) -> str:
        """The line under the buttons: which candidate, its predicted IoU, and whether it is zoomed in."""
        count, score = len(self.scores), self.scores[self.index]
        best = " (best)" if self._rank == 0 else ""
        text = f"candidate {self._rank + 1}/{count}{best}, predicted IoU {score:.2f}" if count > 1 else (
            f"predicted IoU {score:.2f}"
        )
        return text + (", zoomed in" if self.zoomed else ", zooming in…" if zooming else "")
