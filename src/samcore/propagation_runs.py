"""The runs of a propagation: their plan from an object's key slices, their state, and the rules
that decide each slice (when an object ends, who gets contested pixels).

See `samcore.propagation` for the behaviour these rules make up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .mask_prompts import DEFAULT_MODE, MODES, main_part, prompt_from_mask
from .maskops import ring_contrast
from .slice_decoder import SliceDecoder, SliceOutput, SlicePrompt

# The contrast rule applies to objects that differ from their surroundings on the key slice by at
# least this fraction of the slice's intensity range (1st to 99th percentile).
CONTRAST_FLOOR = 0.1


@dataclass(frozen=True)
class PropagationSettings:
    """How objects are propagated and when they end.

    Attributes:
        mode: How each slice is prompted from the previous one: one of `samcore.mask_prompts.MODES`.
        min_iou: Stop when the new mask's IoU with the previous slice's mask is lower (0: never).
        min_score: Stop when the model's predicted IoU of the new mask is lower (0: never).
        min_area: Stop when the new mask has fewer pixels (an empty mask always stops).
        min_contrast: Stop when the new mask stands out from the ring of pixels around it by less
            than this fraction of the contrast the object had on its key slice (0: never): a nucleus
            fading out of focus at its top and bottom still looks like a nucleus to the model. Only
            for objects whose key-slice contrast is at least `CONTRAST_FLOOR` of the slice's range.
        z_range: (first, last) slices the propagation may fill, inclusive; None for the whole stack.
        box_margin: Widening of the previous mask's bounding box on each side, as a fraction of its size.
        positive_points: Most points inside the previous mask ("points" mode).
        negative_points: Most points around the previous mask ("points" mode).
    """

    mode: str = DEFAULT_MODE
    min_iou: float = 0.5
    min_score: float = 0.5
    min_area: int = 16
    min_contrast: float = 0.5
    z_range: tuple[int, int] | None = None
    box_margin: float = 0.1
    positive_points: int = 3
    negative_points: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Unknown propagation mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        for name in ("min_iou", "min_score"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is an IoU between 0 and 1, not {getattr(self, name)}.")
        if not 0.0 <= self.min_contrast <= 1.0:
            raise ValueError(f"min_contrast is a fraction between 0 and 1, not {self.min_contrast}.")
        if self.min_area < 0 or self.box_margin < 0 or self.positive_points < 1 or self.negative_points < 0:
            raise ValueError(
                "min_area, box_margin and negative_points cannot be negative; positive_points is at least 1."
            )
        if self.z_range is not None and (len(self.z_range) != 2 or self.z_range[0] > self.z_range[1]):
            raise ValueError(f"z_range must be (first, last) slices with first <= last, not {self.z_range}.")


@dataclass(frozen=True)
class Stop:
    """Where and why an object's run ended before its limit.

    Attributes:
        object_id: The object.
        direction: +1 for a run going up in z, -1 going down.
        z: The slice where the object was found to end (left empty).
        reason: "empty", "small" (below min_area), "score" (below min_score), "iou" (below min_iou),
            "contrast" (below min_contrast) or "erased" (a slice the object is kept out of).
        value: The measured pixels, predicted IoU, IoU or contrast (a fraction of the key slice's).
    """

    object_id: int
    direction: int
    z: int
    reason: str
    value: float

    def describe(self) -> str:
        """Why, in words: "on slice 9, its IoU with the slice it came from was 0.30 only (min_iou)"."""
        why = {
            "empty": "no mask was found",
            "small": f"its mask had {self.value:.0f} pixels only (min_area)",
            "score": f"the model's predicted IoU was {self.value:.2f} only (min_score)",
            "iou": f"its IoU with the slice it came from was {self.value:.2f} only (min_iou)",
            "contrast": f"it stood out by {self.value:.0%} of its key slice's contrast only (min_contrast)",
            "erased": "it was erased there by hand, so it is kept out",
        }.get(self.reason, f"{self.reason} {self.value:g}")
        return f"on slice {self.z}, {why}"


@dataclass(frozen=True)
class Run:
    """A planned run: from a key slice `start` one slice at a time in `direction`, up to `limit`.

    Attributes:
        start: The key slice it starts from.
        direction: +1 or -1.
        limit: The last slice it may fill (inclusive); equal to `start` for a run with nothing to fill.
        partner: Index (in the plan) of the run filling the same gap from the other end, if any.
    """

    start: int
    direction: int
    limit: int
    partner: int | None = None


def plan_runs(
    key_slices: Iterable[int], z_range: tuple[int, int], walls: Iterable[int] = ()
) -> list[Run]:
    """The runs that extend an object from its key slices within `z_range` (inclusive).

    Key slices outside the range are ignored. Between two key slices a < b, the run from a fills
    a+1 .. a + (b-a)//2 and the run from b the rest; each is the other's partner. No run reaches or
    crosses a slice of `walls` (slices the object must stay out of; a key slice is never one).
    """
    low, high = z_range
    keys = {int(k) for k in key_slices if low <= k <= high}
    inside = sorted({int(w) for w in walls if low <= w <= high} - keys)
    if inside:  # plan each stretch between walls on its own
        runs: list[Run] = []
        for first, last in zip([low, *(w + 1 for w in inside)], [*(w - 1 for w in inside), high]):
            if first > last:
                continue
            offset = len(runs)
            for run in plan_runs(keys, (first, last)):
                partner = None if run.partner is None else run.partner + offset
                runs.append(Run(run.start, run.direction, run.limit, partner))
        return runs
    keys = sorted(keys)
    if not keys:
        return []
    runs = [Run(keys[0], -1, low)] if keys[0] > low else []
    for a, b in zip(keys, keys[1:]):
        if b - a > 1:
            middle = a + (b - a) // 2  # the run from a fills a+1 .. middle, the one from b the rest
            runs += [Run(a, +1, middle, len(runs) + 1), Run(b, -1, middle + 1, len(runs))]
    if keys[-1] < high:
        runs.append(Run(keys[-1], +1, high))
    return runs


class Chain:
    """A run in progress: the object's mask (and low-resolution logits) on the last slice it reached.

    `reference` is the object's contrast to its surroundings on the key slice the run starts from
    (`maskops.ring_contrast`), or None where the contrast rule does not apply.
    """

    def __init__(
        self,
        object_id: int,
        run: Run,
        mask: np.ndarray,
        low_res: np.ndarray | None,
        reference: float | None = None,
    ) -> None:
        self.object_id, self.direction, self.limit = object_id, run.direction, run.limit
        self.z, self.mask, self.low_res = run.start, mask, low_res
        self.reference = reference
        self.partner: Chain | None = None
        self.stopped = False

    @property
    def running(self) -> bool:
        return not self.stopped and self.z != self.limit

    @property
    def next_z(self) -> int:
        return self.z + self.direction

    def prompt(self, settings: PropagationSettings) -> SlicePrompt:
        return prompt_from_mask(
            settings.mode, self.mask, self.low_res, settings.box_margin,
            settings.positive_points, settings.negative_points,
        )

    def advance(self, mask: np.ndarray, output: SliceOutput) -> None:
        self.z, self.mask, self.low_res = self.next_z, mask, output.low_res

    def stop(self) -> None:
        """End here; the partner run (same gap, other end) may now fill up to this slice."""
        self.stopped = True
        partner = self.partner
        if partner is not None and not partner.stopped:
            partner.limit = self.next_z
            partner.partner = None


def start_chains(
    decoder: SliceDecoder,
    labels: np.ndarray,
    key_slices: dict[int, list[int]],
    z_range: tuple[int, int],
    settings: PropagationSettings,
    keep_out: Mapping[int, Iterable[int]] | None = None,
) -> list[Chain]:
    """The chains of every object's planned runs, started from its masks on its key slices.

    Args:
        decoder: Makes the mask inputs of the key slices ("box+mask" mode).
        labels: (Z, Y, X) labels holding the objects' key slices.
        key_slices: Object id -> the slices where it has pixels.
        z_range: (first, last) slices that may be filled.
        settings: The mode and its parameters.
        keep_out: Object id -> slices its runs may not reach (see `plan_runs`' walls).
    """
    keep_out = keep_out or {}
    chains: list[Chain] = []
    images: dict[int, tuple[np.ndarray, float]] = {}  # key slice -> intensities, their robust range
    for object_id, present in key_slices.items():
        plan = plan_runs(present, z_range, keep_out.get(object_id, ()))
        if not plan and not any(z_range[0] <= z <= z_range[1] for z in present):
            raise ValueError(
                f"Object {object_id} is not on any slice between {z_range[0]} and {z_range[1]}: "
                "annotate it on a slice inside the range to propagate it."
            )
        started = []
        for run in plan:
            mask = labels[run.start] == object_id
            low_res = decoder.logits_from_mask(mask) if settings.mode == "box+mask" else None
            reference = None
            if settings.min_contrast > 0:
                if run.start not in images:
                    image = decoder.intensities(run.start)
                    low, high = np.percentile(image, (1, 99))
                    images[run.start] = (image, float(high - low))
                image, spread = images[run.start]
                reference = ring_contrast(image, mask, labels[run.start] > 0)
                if reference is not None and abs(reference) <= CONTRAST_FLOOR * spread:
                    reference = None  # too faint to tell an object's end by
            started.append(Chain(object_id, run, mask, low_res, reference))
        for chain, run in zip(started, plan):
            chain.partner = None if run.partner is None else started[run.partner]
        chains += started
    return chains


def decide_slice(
    out: np.ndarray,
    z: int,
    group: list[Chain],
    outputs: list[SliceOutput],
    settings: PropagationSettings,
    image: np.ndarray | None = None,
) -> tuple[dict[int, np.ndarray], list[Stop]]:
    """Apply the overlap rule and the stop rules to one batch on slice z; write the masks that pass.

    The stop rules see each mask restricted to background pixels, without its specks (`main_part`);
    those that pass share contested pixels by the higher logit, and the rules are checked again on
    what each one keeps. `image`: slice z's intensities, for the contrast rule (None: not checked).
    """
    free = out[z] == 0
    stops: list[Stop] = []
    candidates = [
        (chain, output, main_part((output.logits > 0) & free)) for chain, output in zip(group, outputs)
    ]
    occupied = None  # for the contrast rule's rings: the slice's objects and the batch's masks
    if image is not None:
        occupied = np.logical_or.reduce([~free, *(mask for _, _, mask in candidates)])
    rules = _StopRules(settings, z, image, occupied)
    survivors = rules.apply(candidates, stops)
    if len(survivors) > 1:
        logits = [output.logits for _, output, _ in survivors]
        kept = share_by_logit([mask for _, _, mask in survivors], logits)
        shared = [(chain, output, mask) for (chain, output, _), mask in zip(survivors, kept)]
        survivors = rules.apply(shared, stops)
    written = {}
    for chain, output, mask in survivors:
        out[z][mask] = chain.object_id
        written[chain.object_id] = mask
        chain.advance(mask, output)
    return written, stops


def share_by_logit(masks: list[np.ndarray], logits: list[np.ndarray]) -> list[np.ndarray]:
    """Masks of one slice made disjoint: a pixel claimed by several goes to the highest logit there.

    Args:
        masks: (Y, X) bool masks.
        logits: (Y, X) float logits, one per mask.
    """
    if len(masks) < 2:
        return list(masks)
    contest = np.stack([np.where(mask, logit, -np.inf) for mask, logit in zip(masks, logits)])
    winner = np.argmax(contest, axis=0)
    return [mask & (winner == i) for i, mask in enumerate(masks)]


class _StopRules:
    """The stop rules on slice z; `occupied` pixels are left out of the rings around masks."""

    def __init__(
        self, settings: PropagationSettings, z: int, image: np.ndarray | None, occupied: np.ndarray | None
    ) -> None:
        self.settings, self.z, self.image, self.occupied = settings, z, image, occupied

    def apply(self, candidates: list, stops: list[Stop]) -> list:
        """The (chain, output, mask) candidates that go on; the others stop and are listed in `stops`."""
        survivors = []
        for chain, output, mask in candidates:
            stop = self._stop(chain, mask, output.score)
            if stop is None:
                survivors.append((chain, output, mask))
            else:
                stops.append(stop)
                chain.stop()
        return survivors

    def _stop(self, chain: Chain, mask: np.ndarray, score: float) -> Stop | None:
        settings, z = self.settings, self.z
        area = int(mask.sum())
        if area == 0:
            return Stop(chain.object_id, chain.direction, z, "empty", 0.0)
        if area < settings.min_area:
            return Stop(chain.object_id, chain.direction, z, "small", float(area))
        if settings.min_score > 0 and score < settings.min_score:
            return Stop(chain.object_id, chain.direction, z, "score", float(score))
        overlap = iou(mask, chain.mask)
        if overlap < settings.min_iou:
            return Stop(chain.object_id, chain.direction, z, "iou", overlap)
        if settings.min_contrast > 0 and chain.reference is not None and self.image is not None:
            contrast = ring_contrast(self.image, mask, self.occupied)
            fraction = None if contrast is None else contrast / chain.reference
            if fraction is not None and fraction < settings.min_contrast:
                return Stop(chain.object_id, chain.direction, z, "contrast", fraction)
        return None


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 for two empty masks)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
