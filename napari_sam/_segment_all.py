"""Segment all: automatic segmentation of the displayed slice or the whole stack, from the SAM widget.

Like a propagation (`_propagate.py`), it runs in a `thread_worker` with a `Predictor` of its own on
the widget's model and the widget's embeddings, computing the missing ones on the way. The engine
segments one slice at a time (`samcore.jobs.slice_labels`); through a stack, each slice's objects are
linked to those of the slice before (`samcore.linking.SliceLinker`), so that a nucleus keeps one id
across slices. Each slice is painted into the objects layer on the main thread as it arrives, as new
ids above the layer's largest and only into pixels that are still background then: existing objects
and edits made meanwhile are kept. The whole run is one undo step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._background import BackgroundJob

if TYPE_CHECKING:
    from samcore.automatic import AutoSettings

    from ._widget import SamWidget

SCOPES = {"slice": "displayed slice", "stack": "whole stack"}


def paint_new_objects(
    region: np.ndarray, objects: np.ndarray, known: dict[int, int], next_id: int, min_visible: float
) -> tuple[np.ndarray, int, int]:
    """Paint a slice's objects into the background pixels of one slice of the labels, as new objects.

    Args:
        region: (Y, X) labels of the slice, edited in place.
        objects: (Y, X) non-negative integer ids of the objects found on the slice, 0 background.
        known: Found id -> labels id of the objects painted on earlier slices; the new ones are added.
        next_id: The labels id the next new object gets.
        min_visible: An object that keeps less than this fraction of its pixels (the others belong
            to existing objects) is left out on this slice.

    Returns:
        The flat indices into `region` that were written, the next new id, and the number of
        objects left out because the labels' dtype holds no larger id.
    """
    objects = np.asarray(objects)
    free = region == 0
    area = np.bincount(objects.ravel())
    visible = np.bincount(objects[free], minlength=len(area))
    keep = (visible > 0) & (visible >= min_visible * area)
    keep[0] = False
    lookup = np.zeros(len(area), np.int64)
    largest, full = np.iinfo(region.dtype).max, 0
    for found in np.flatnonzero(keep).tolist():
        if found not in known:
            if next_id > largest:
                keep[found], full = False, full + 1
                continue
            known[found], next_id = next_id, next_id + 1
        lookup[found] = known[found]
    take = free & keep[objects]
    region[take] = lookup[objects[take]]
    return np.flatnonzero(take), next_id, full


class AutoSegmentation(BackgroundJob):
    """One widget's automatic segmentation (see `BackgroundJob`).

    Args:
        widget: The SAM widget it reports to (status label, cancel button, undo history).
    """

    progress_label = "SAM segment all"

    def __init__(self, widget: SamWidget) -> None:
        super().__init__(widget)
        self._slices: list[int] = []
        self._flat = False  # a 2D image, not a stack
        self._min_visible = 0.5
        self._known: dict[int, int] = {}  # ids of this run's objects -> their ids in the layer
        self._next_id = 1
        self._found = 0
        self._full = 0

    def start(self, scope: str, settings: AutoSettings | None = None, link_overlap: float = 0.5) -> bool:
        """Check the widget's state, then start segmenting; False (after a notification) if it cannot.

        Args:
            scope: "slice" (the displayed slice) or "stack" (every slice of a 3D stack).
            settings: Automatic segmentation parameters; default `AutoSettings.for_model(model)`.
            link_overlap: Least fraction of the smaller of two objects on adjacent slices that their
                overlap must cover for them to be one 3D object (see `samcore.linking`).
        """
        from samcore import Predictor
        from samcore.automatic import AutoSettings

        from ._widget import show_error, show_warning  # the widget's notifications (tests replace them)

        widget = self._widget
        try:
            image = widget.image_layer()
        except ValueError as error:
            show_error(str(error))
            return False
        session = widget._session
        if session is None or session.layer is not image:
            show_warning("SAM: compute embeddings first (this loads the model), then segment all.")
            return False
        problem = widget.view_problem(image) if scope == "slice" else None
        if problem is not None:  # "the displayed slice" means nothing there
            show_warning(f"SAM: {problem[1]}")
            return False
        z = widget._current_z(image)
        slices = list(range(session.view.n_slices)) if scope == "stack" and z is not None else [z or 0]
        if session.stale(slices):
            widget._forget_changed()
            show_warning(f"SAM: the data of '{image.name}' changed: compute embeddings again, then segment all.")
            return False
        try:
            layer = widget.output_layer()
        except ValueError as error:
            show_error(f"SAM: {error}")
            return False
        widget._embedding.pause()  # this run computes the embeddings it needs itself

        settings = settings or AutoSettings.for_model(session.predictor.model)
        self._layer, self._slices, self._flat = layer, slices, z is None
        self._min_visible, self._known, self._next_id = settings.min_visible, {}, 1
        self._found, self._full, self._painted, self._written = 0, 0, [], []
        # The session's views: those of the embeddings it stored.
        predictor = Predictor(session.predictor.model, views=session.predictor.views)
        self._launch(
            _segment, predictor, session.view, session.store, slices, settings, link_overlap, self._cancel,
            status=f"Segmenting all objects {self._where()}…",
        )
        return True

    def _where(self, finished: int | None = None) -> str:
        """Where the run segments, for messages: 'on slice 3', 'in 4/30 slices'…"""
        if len(self._slices) > 1:
            return f"in {len(self._slices) if finished is None else f'{finished}/{len(self._slices)}'} slices"
        return "in the image" if self._flat else f"on slice {self._slices[0]}"

    def _on_step(self, event: tuple) -> None:
        kind, position, payload = event
        if kind == "step":
            self._progress.total = len(self._slices) * payload.total
            self._progress.n = position * payload.total + payload.done
            self._progress.refresh()
            if len(self._slices) > 1:
                self._widget._status.value = f"Segmenting all: slice {position + 1}/{len(self._slices)}."
        elif self._layer is not None:
            self._paint(position, payload)

    def _paint(self, z: int, objects: np.ndarray) -> None:
        data = self._layer.data
        region = data if data.ndim == 2 else data[z]
        self._next_id = max(self._next_id, int(data.max()) + 1)  # above objects committed meanwhile too
        index, self._next_id, full = paint_new_objects(
            region, objects, self._known, self._next_id, self._min_visible
        )
        self._found = max(self._found, int(objects.max(initial=0)))  # the linker numbers objects 1, 2, …
        self._full += full
        if index.size:
            self._record(z * region.size + index)
            self._layer.refresh()

    def _on_done(self, finished: int) -> None:
        from ._widget import show_warning

        new = len(self._known)
        if finished < len(self._slices):
            self._widget._status.value = f"Cancelled: {new} new object(s) {self._where(finished)}."
            return
        self._widget._status.value = f"Segmented all: {new} new object(s) {self._where()}."
        if not self._found:
            show_warning(
                f"SAM: segment all found no object {self._where()}. On dim or noisy images, lower the "
                "segment-all thresholds in the widget (stability first) and try again."
            )
        elif not new and self._layer is not None:
            show_warning(
                f"SAM: segment all found {self._found} object(s) {self._where()}, all on existing objects of "
                f"'{self._layer.name}'; none was added."
            )

    def _undo_entry(self) -> tuple[int, str]:
        new = len(self._known)
        return min(self._known.values()), f"automatic segmentation ({new} object{'s' if new > 1 else ''})"

    def _before_reset(self) -> None:
        from ._widget import show_warning

        if self._full and self._layer is not None:
            show_warning(
                f"SAM: the labels layer '{self._layer.name}' ({self._layer.data.dtype}) holds no larger "
                f"object id; {self._full} object(s) were left out."
            )


def _segment(predictor, view, store, slices, settings, link_overlap, cancel):
    """Worker body: segment the slices in order, yielding each one's objects as linked 3D ids.

    A store with a folder (the widget's disk cache) keeps each slice's objects, as `napari-sam auto`
    does: a slice segmented before with the same settings and precision is taken from it, not
    segmented again (after a cancel, or with the objects undone).

    Yields ("step", k, Progress) within the k-th slice and ("slice", z, (Y, X) int32 ids) after it;
    returns the number of slices finished (fewer when cancelled).
    """
    from samcore.cancel import Cancelled, stopping_on
    from samcore.jobs import labels_key, slice_labels
    from samcore.linking import SliceLinker
    from samcore.progress import Progress

    linker = SliceLinker(link_overlap)
    settings = settings.resolved(predictor.model)
    store.use_labels(labels_key(settings, predictor.precision), tuple(view.data.shape[1:3]))
    for k, z in enumerate(slices):
        kept = store.get_labels(z)
        if kept is not None:
            yield ("step", k, Progress("slices", 1, 1, z))
            yield ("slice", z, linker.add(kept))
            continue
        job = slice_labels(predictor, view.rgb_slice(z), z, store, settings, cancel=cancel)
        while True:
            if cancel.is_set():
                job.close()
                return k
            try:
                with stopping_on(cancel):  # a batch of points stops within one point's decoding
                    step = next(job)
            except StopIteration as finished:
                labels, _ = finished.value
                break
            except Cancelled:  # within the slice's embedding or a batch of points
                return k
            yield ("step", k, step)
        store.put_labels(z, labels)
        yield ("slice", z, linker.add(labels))
    return len(slices)
