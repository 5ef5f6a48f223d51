"""Propagate objects through a (Z, Y, X) stack, slice after slice, from their annotated slices.

An object's *key slices* are the slices where it already has pixels in the labels (a committed
object, a preview, or several annotations of the same object). From them the object is extended:

* beyond its lowest and highest key slice, down and up, each slice prompted from the previous
  slice's result (see `samcore.mask_prompts` for the prompting modes), until the object ends or
  the z range does;
* between two key slices a < b, from both ends: the run from a fills the
  lower half of the slices in between (the middle one too when their number is odd), the run
  from b the upper half, and the two halves join in the middle. A run that stops early leaves
  its remaining slices to the other run, which then goes on past the middle.

The object ends (its run stops, and the slice where it stops stays empty) when the new mask is
empty or smaller than `min_area` pixels, when the model's predicted IoU is below `min_score`, when
its IoU with the previous slice's mask is below `min_iou`, or when it stands out from its
surroundings by less than `min_contrast` of the object's contrast on its key slice.

Overlaps: a propagated mask only fills pixels that are background when its slice is decided, so
existing objects, and pixels an earlier step of the run gave to another object, are never
overwritten. Objects decided in the same step on the same slice (one batch of the decoder) share
contested pixels by the higher mask logit.

Order: each step decides one slice for every run that needs it next, in one decoder batch. Steps
alternate between the runs going up and those going down; going up, the lowest slice any run needs
comes first (going down, the highest), so runs that started on different slices meet and then share
each slice's decoding. Where objects overlap, the order decides which of them a pixel goes to.

Long work is the generator `propagate_iter`, which yields a `PropagationProgress` after every
embedding computed and every slice decided (with the pixels it wrote, so a viewer can show them as
they come) and honours a cancel event between steps; closing the generator stops it too.
`propagate` runs it to the end.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from .cancel import Cancelled
from .embeddings import EmbeddingStore, StackView, model_key, stack_key
from .predictor import Predictor
from .progress import Progress, run
from .propagation_runs import Chain, PropagationSettings, Run, Stop, decide_slice, iou, plan_runs, start_chains
from .slice_decoder import SliceDecoder, StackDecoder

__all__ = [
    "PropagationProgress", "PropagationResult", "PropagationSettings", "Run", "Stop",
    "check_z_range", "iou", "plan_runs", "propagate", "propagate_iter",
]


@dataclass(frozen=True)
class PropagationProgress(Progress):
    """One step of a propagation: stage "embedding" (slice z's embedding was computed) or
    "propagation" (slice z was decided); `done` counts the object-slices decided so far, `total`
    adds those the running runs may still fill.

    Attributes:
        written: Object id -> (Y, X) bool pixels of slice z newly given to that object.
        stops: Runs that ended at this step.
    """

    written: Mapping[int, np.ndarray] = field(default_factory=dict)
    stops: tuple[Stop, ...] = ()


@dataclass(frozen=True)
class PropagationResult:
    """The outcome of a propagation.

    Attributes:
        labels: (Z, Y, X) the input labels plus every propagated pixel (a new array).
        filled: Object id -> the slices this run filled, sorted.
        stops: Where runs ended before their limit.
        cancelled: The run was cancelled; what was filled until then is kept.
    """

    labels: np.ndarray
    filled: Mapping[int, tuple[int, ...]]
    stops: tuple[Stop, ...]
    cancelled: bool


def propagate_iter(
    decoder: SliceDecoder,
    labels: np.ndarray,
    object_ids: Iterable[int] | None = None,
    settings: PropagationSettings | None = None,
    cancel: threading.Event | None = None,
    keep_out: Mapping[int, Iterable[int]] | None = None,
) -> Generator[PropagationProgress, None, PropagationResult]:
    """Propagate objects through the stack, one step at a time.

    Args:
        decoder: The model on the stack (a `StackDecoder`, or any `SliceDecoder`).
        labels: (Z, Y, X) integer labels of the stack; every slice where an object has pixels is one
            of its key slices. Not modified.
        object_ids: The objects to propagate; default every object in `labels`.
        settings: Mode and stop rules; default `PropagationSettings()`.
        cancel: Set it to stop after the current step; the result keeps what was filled. To stop
            within an embedding too, give the `StackDecoder` the same event.
        keep_out: Object id -> slices it must not be propagated into or across (where the user
            erased it); each run ends before them, with a `Stop` of reason "erased". A slice where
            the object has pixels is one of its key slices and is never kept out.

    Yields:
        A `PropagationProgress` after each embedding computed and each slice decided.

    Returns:
        The `PropagationResult` (the generator's return value; `samcore.progress.run` drives the
        generator to its end and returns it).

    Raises:
        ValueError, TypeError: Labels, object ids or settings that do not fit the stack; raised by
            this call, before any step.
    """
    settings = settings or PropagationSettings()
    labels = _check_labels(labels, decoder.shape)
    z_range = check_z_range(settings.z_range, labels.shape[0])
    ids = _object_ids(labels, object_ids)
    key_slices = _slices_of(labels, ids)
    walls = _check_keep_out(keep_out, ids, labels.shape[0], z_range, key_slices)
    chains = start_chains(decoder, labels, key_slices, z_range, settings, walls)
    return _steps(decoder, labels.copy(), ids, chains, settings, cancel, (key_slices, walls))


def _steps(
    decoder: SliceDecoder,
    out: np.ndarray,
    ids: list[int],
    chains: list[Chain],
    settings: PropagationSettings,
    cancel: threading.Event | None,
    kept_out: tuple[dict[int, list[int]], dict[int, list[int]]] = ({}, {}),
) -> Generator[PropagationProgress, None, PropagationResult]:
    """Decide one slice per step, for every running chain that needs it (see `_next_slice`).

    `kept_out` is (key slices, walls) by object: the walls an object reached are told as stops.
    """
    filled: dict[int, list[int]] = {object_id: [] for object_id in ids}
    stops: list[Stop] = []

    done = 0
    direction = +1
    while any(chain.running for chain in chains):
        z, direction = _next_slice(chains, direction)
        group = [chain for chain in chains if chain.running and chain.next_z == z]
        if cancel is not None and cancel.is_set():
            return _result(out, filled, stops + _walls_reached(filled, *kept_out), cancelled=True)
        try:
            if not decoder.has_embedding(z):
                decoder.embed(z)
                yield PropagationProgress("embedding", done, done + _remaining(chains), z)
                if cancel is not None and cancel.is_set():
                    return _result(out, filled, stops + _walls_reached(filled, *kept_out), cancelled=True)
            outputs = decoder.decode(z, [chain.prompt(settings) for chain in group])
        except Cancelled:  # the decoder's own cancel event stopped an embedding (a zoomed crop too) or a batch
            return _result(out, filled, stops + _walls_reached(filled, *kept_out), cancelled=True)
        contrast = settings.min_contrast > 0 and any(chain.reference is not None for chain in group)
        image = decoder.intensities(z) if contrast else None
        written, new_stops = decide_slice(out, z, group, outputs, settings, image)
        for object_id in written:
            filled[object_id].append(z)
        done += len(written)
        stops += new_stops
        total = done + _remaining(chains)
        yield PropagationProgress("propagation", done, total, z, written, tuple(new_stops))
    return _result(out, filled, stops + _walls_reached(filled, *kept_out), cancelled=False)


def _next_slice(chains: list[Chain], direction: int) -> tuple[int, int]:
    """The slice to decide next, and the direction to favour after it.

    Steps alternate between the runs going up and those going down (while both remain). Going up,
    the lowest slice any upward run needs comes first: a run waits for those below it to catch up,
    and from there on they share every slice, so each slice is decoded once for all of them (one
    batch, one image context) rather than once per run. Going down, the highest comes first.
    """
    wanted = {+1: [], -1: []}
    for chain in chains:
        if chain.running:
            wanted[chain.direction].append(chain.next_z)
    if not wanted[direction]:
        direction = -direction
    z = min(wanted[direction]) if direction > 0 else max(wanted[direction])
    return z, -direction if wanted[-direction] else direction


def propagate(
    predictor: Predictor,
    image: np.ndarray | StackView,
    labels: np.ndarray,
    object_ids: Iterable[int] | None = None,
    *,
    settings: PropagationSettings | None = None,
    store: EmbeddingStore | None = None,
    cancel: threading.Event | None = None,
    keep_out: Mapping[int, Iterable[int]] | None = None,
    **options: Any,
) -> PropagationResult:
    """Propagate objects through a stack and return the filled labels (see `propagate_iter`).

    Args:
        predictor: The predictor of the model to use.
        image: (Z, Y, X) stack, or a `StackView` of it.
        labels: (Z, Y, X) integer labels with the objects on their key slices.
        object_ids: The objects to propagate; default every object in `labels`.
        settings: Mode and stop rules; `options` (e.g. ``mode="points"``) replace some of its fields.
        store: Embeddings of the stack already computed (missing ones are computed and kept there);
            one made for another stack, model or views setting is refused.
        cancel: Set it from another thread to stop early.
        keep_out: Object id -> slices it must stay out of (see `propagate_iter`).

    Returns:
        The `PropagationResult`.
    """
    known = {f.name for f in fields(PropagationSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"Unknown propagation options {unknown}; known: {sorted(known)}.")
    settings = replace(settings or PropagationSettings(), **options)
    if store is not None:
        image = image if isinstance(image, StackView) else StackView.of(image)
        if store.key != stack_key(image, model_key(predictor.model), predictor.views):
            raise ValueError(
                "The embedding store belongs to another image, model or views setting: give the store made "
                "for this stack with this predictor, or none."
            )
    decoder = StackDecoder(predictor, image, store, cancel=cancel)
    return run(propagate_iter(decoder, labels, object_ids, settings, cancel, keep_out))


def _walls_reached(
    filled: dict[int, list[int]], key_slices: dict[int, list[int]], walls: dict[int, list[int]]
) -> list[Stop]:
    """A stop of reason "erased" at each wall next to a slice its object holds (a key slice or filled)."""
    stops = []
    for object_id, object_walls in walls.items():
        held = set(key_slices.get(object_id, ())) | set(filled.get(object_id, ()))
        for wall in object_walls:
            for direction in (+1, -1):
                if wall - direction in held:
                    stops.append(Stop(object_id, direction, wall, "erased", 0.0))
    return stops


def _remaining(chains: list[Chain]) -> int:
    return sum(abs(chain.limit - chain.z) for chain in chains if chain.running)


def _result(
    out: np.ndarray, filled: dict[int, list[int]], stops: list[Stop], cancelled: bool
) -> PropagationResult:
    return PropagationResult(out, {k: tuple(sorted(v)) for k, v in filled.items()}, tuple(stops), cancelled)


# -- input checks ----------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"Labels must be integers (0 for background), not {labels.dtype}.")
    if labels.shape != tuple(shape):
        raise ValueError(
            f"The labels have shape {labels.shape}, but the stack has shape {tuple(shape)} (Z, Y, X)."
        )
    return labels


def check_z_range(z_range: tuple[int, int] | None, depth: int) -> tuple[int, int]:
    """(first, last) slices of a stack of `depth` slices that a propagation may fill (None: all)."""
    if z_range is None:
        return 0, depth - 1
    first, last = int(z_range[0]), int(z_range[1])
    if first > last:
        raise ValueError(f"The z range {first}-{last} is empty: give the first slice, then the last.")
    if first < 0 or last >= depth:
        raise ValueError(f"The z range {first}-{last} is outside the stack's {depth} slices (0 to {depth - 1}).")
    return first, last


def _check_keep_out(
    keep_out: Mapping[int, Iterable[int]] | None,
    ids: list[int],
    depth: int,
    z_range: tuple[int, int],
    key_slices: dict[int, list[int]],
) -> dict[int, list[int]]:
    """The walls of each object propagated: its kept-out slices in `z_range`, less its key slices."""
    if keep_out is None:
        return {}
    if not isinstance(keep_out, Mapping):
        raise TypeError(
            "keep_out maps object ids to the slices each one must stay out of, e.g. {3: [12, 13]}."
        )
    walls = {}
    for object_id, slices in keep_out.items():
        chosen = []
        for z in slices:
            if int(z) != z or not 0 <= z < depth:
                raise ValueError(
                    f"keep_out slice {z!r} of object {object_id} is outside the stack's {depth} slices."
                )
            if z_range[0] <= z <= z_range[1] and int(z) not in key_slices.get(object_id, ()):
                chosen.append(int(z))
        if object_id in ids and chosen:
            walls[int(object_id)] = sorted(set(chosen))
    return walls


def _object_ids(labels: np.ndarray, object_ids: Iterable[int] | None) -> list[int]:
    present = object_ids_in(labels)
    if object_ids is None:
        if not present:
            raise ValueError("The labels hold no object to propagate: annotate one on a slice first.")
        return present
    ids = []
    for object_id in object_ids:
        if int(object_id) != object_id or object_id <= 0:
            raise ValueError(f"Object ids are positive integers, not {object_id!r}.")
        if int(object_id) not in present:
            raise ValueError(f"Object {object_id} is not in the labels: annotate it on a slice first.")
        if int(object_id) not in ids:
            ids.append(int(object_id))
    return ids


def object_ids_in(labels: np.ndarray) -> list[int]:
    """The objects in `labels`, sorted: its positive values (0 is background; negative values are not
    objects and are left alone). Only labelled pixels are sorted: many times faster on mostly background."""
    labels = np.asarray(labels)
    return [int(i) for i in np.unique(labels[labels > 0])]


def _slices_of(labels: np.ndarray, object_ids: list[int]) -> dict[int, list[int]]:
    wanted = np.asarray(object_ids)
    slices: dict[int, list[int]] = {object_id: [] for object_id in object_ids}
    for z in range(labels.shape[0]):
        for object_id in np.intersect1d(object_ids_in(labels[z]), wanted):
            slices[int(object_id)].append(z)
    return slices
