"""The masks the current prompts decoded to, and which of them the preview shows."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from samcore import Predictor


class Candidates:
    """The candidate masks of the prompts on the displayed slice: three for a single click, else one.

    With refinement, a single click's candidates are refined one at a time, when first shown: the
    best one at once, the others on N (refining all three first takes twice as long, and was as good
    on generated scenes).

    Args:
        masks: (C, Y, X) bool masks.
        scores: (C,) predicted IoUs; the best candidate is shown first.
        zoomed: The masks were decoded on the crop around a small box.
        unrefined: For a lazily refined click, the `predict` arguments of its prompt and the (C, 256,
            256) low-resolution logits of the first pass; None when nothing is left to refine.
    """

    def __init__(
        self,
        masks: np.ndarray,
        scores: np.ndarray,
        zoomed: bool = False,
        unrefined: tuple[dict, np.ndarray] | None = None,
    ) -> None:
        self.masks, self.scores, self.zoomed = masks, scores, zoomed
        # Shown best first, then by falling predicted IoU (as first decoded: refining changes scores).
        self._order = [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")]
        self._rank = 0
        self.index = self._order[0]
        self._prompt, self._low_res = unrefined if unrefined is not None else (None, None)
        self._pending = set(range(len(scores))) if unrefined is not None else set()

    @property
    def shown(self) -> np.ndarray:
        """The (Y, X) mask the preview shows."""
        return self.masks[self.index]

    def next(self) -> bool:
        """Show the next candidate; False if there is only one."""
        if len(self.scores) < 2:
            return False
        self._rank = (self._rank + 1) % len(self._order)
        self.index = self._order[self._rank]
        return True

    def refine_shown(self, predictor: Predictor) -> None:
        """Refine the shown candidate if it is not yet, with `predictor` still on its slice."""
        if self.index not in self._pending:
            return
        refined, score, _ = predictor.predict(
            **self._prompt, mask_input=self._low_res[self.index][None], multimask_output=False, refine=False
        )
        self.masks[self.index], self.scores[self.index] = refined[0], score[0]
        self._pending.discard(self.index)

    def describe(self, zooming: bool) -> str:
        """The line under the buttons: which candidate, its predicted IoU, and whether it is zoomed in."""
        count, score = len(self.scores), self.scores[self.index]
        best = " (best)" if self._rank == 0 else ""
        text = f"candidate {self._rank + 1}/{count}{best}, predicted IoU {score:.2f}" if count > 1 else (
            f"predicted IoU {score:.2f}"
        )
        return text + (", zoomed in" if self.zoomed else ", zooming in…" if zooming else "")
