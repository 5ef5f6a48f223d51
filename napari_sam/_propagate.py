"""Propagating the objects of the displayed slice through a (Z, Y, X) stack, from the SAM widget.

The engine's `propagate_iter` runs in a `thread_worker` with a `Predictor` of its own on the
widget's model (decoding changes a predictor's current image, and the widget keeps decoding
clicks meanwhile) and the widget's embeddings, computing the missing ones on the way. Each slice
it decides is painted into the objects layer on the main thread as it arrives, only into pixels
that are still background then, so edits made meanwhile are kept. The whole run is one undo step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._background import BackgroundJob
from ._prompts import spatial_ndim

if TYPE_CHECKING:
    from collections.abc import Iterable

    from samcore.propagation import PropagationSettings

    from ._widget import SamWidget


def paint(labels: np.ndarray, z: int, written: dict[int, np.ndarray]) -> np.ndarray:
    """Write each object's (Y, X) bool pixels into slice z of (Z, Y, X) labels, where still 0.

    Returns:
        The flat indices into `labels` that were written.
    """
    region = labels[z]
    offset = z * region.size
    index = []
    for object_id, mask in written.items():
        take = np.asarray(mask, bool) & (region == 0)
        region[take] = object_id
        index.append(offset + np.flatnonzero(take))
    return np.concatenate(index) if index else np.zeros(0, np.intp)


class Propagation(BackgroundJob):
    """One widget's propagation of objects through the stack (see `BackgroundJob`).

    Args:
        widget: The SAM widget it reports to (status label, cancel button, undo history).
    """

    progress_label = "SAM propagation"

    def __init__(self, widget: SamWidget) -> None:
        super().__init__(widget)
        self._ids: list[int] = []

    def start(self, object_ids: Iterable[int] | None = None, settings: PropagationSettings | None = None) -> bool:
        """Check the widget's state, then start propagating; False (after a notification) if it cannot."""
        from samcore import Predictor
        from samcore.propagation import object_ids_in, propagate_iter
        from samcore.slice_decoder import StackDecoder

        # The widget's notifications (tests replace them).
        from ._widget import editable, show_error, show_warning

        widget = self._widget
        try:
            image = widget.image_layer()
        except ValueError as error:
            show_error(str(error))
            return False
        if spatial_ndim(image) != 3:
            show_warning(f"SAM: propagation needs a 3D (Z, Y, X) stack; '{image.name}' is a 2D image.")
            return False
        session = widget._session
        if session is None or session.layer is not image:
            show_warning("SAM: compute embeddings first (this loads the model), then propagate.")
            return False
        if session.stale():
            widget._forget_changed()
            show_warning(f"SAM: the data of '{image.name}' changed: compute embeddings again, then propagate.")
            return False
        problem = widget.view_problem(image) if object_ids is None else None
        if problem is not None:  # "the objects on the displayed slice" means nothing there
            show_warning(f"SAM: {problem[1]}")
            return False
        layer, z = widget._output.value, widget._current_z(image)
        if layer is None or layer not in widget._viewer.layers or layer.data.shape != session.view.data.shape[:3]:
            show_warning("SAM: no objects to propagate; commit an object on this slice first.")
            return False
        try:
            editable(layer)
        except ValueError as error:
            show_error(f"SAM: {error}")
            return False
        labels = np.array(layer.data)  # a snapshot: the user may edit the layer meanwhile
        ids = object_ids_in(labels[z]) if object_ids is None else [int(i) for i in object_ids]
        if not ids:
            show_warning(f"SAM: slice {z} of '{layer.name}' holds no object; commit one on it first.")
            return False
        # The session's views: those of the embeddings it stored.
        predictor = Predictor(session.predictor.model, views=session.predictor.views)
        # Not zoomed in, whatever the zoom box says: on the real nuclei3d stack, zoomed slices made
        # propagation worse (README, 3D), and three to four times slower.
        decoder = StackDecoder(predictor, session.view, session.store, cancel=self._cancel)
        try:
            erased = widget.erased_slices(layer)
            job = propagate_iter(decoder, labels, ids, settings, self._cancel, keep_out=erased)
        except (ValueError, TypeError) as error:
            show_error(f"SAM: {error}")
            return False

        widget._embedding.pause()  # the propagation computes the embeddings it needs itself
        self._layer, self._painted, self._written, self._ids = layer, [], [], ids
        plural = "s" if len(ids) > 1 else ""
        self._launch(_drive, job, status=f"Propagating object{plural} {', '.join(map(str, ids))}…")
        return True

    def _on_step(self, step) -> None:
        self._progress.total = step.total
        self._progress.n = step.done
        self._progress.refresh()
        if step.written and self._layer is not None:
            self._record(paint(self._layer.data, step.z, step.written))
            self._layer.refresh()
        self._widget._status.value = f"Propagating: slice {step.z}, {step.done}/{step.total} object-slices."

    def _on_done(self, result) -> None:
        filled = sum(len(slices) for slices in result.filled.values())
        word = "Cancelled" if result.cancelled else "Propagated"
        status = f"{word}: {filled} object-slices filled for {len(self._ids)} object(s)."
        if not result.cancelled:  # say why an object went nowhere: the settings, or a slice to prompt on
            for object_id in self._ids:
                if not result.filled.get(object_id):
                    stops = [stop.describe() for stop in result.stops if stop.object_id == object_id]
                    if stops:
                        status += f" Object {object_id} stayed where it was: {'; '.join(stops)}."
            kept_out = sorted(  # of objects that spread elsewhere (the others' stops are told above)
                {(stop.object_id, stop.z) for stop in result.stops
                 if stop.reason == "erased" and result.filled.get(stop.object_id)}
            )
            if kept_out:
                where = ", ".join(f"object {object_id} from slice {z}" for object_id, z in kept_out)
                status += f" Kept out of slices where you erased them: {where}."
        self._widget._status.value = status

    def _undo_entry(self) -> tuple[int, str]:
        plural = "s" if len(self._ids) > 1 else ""
        return self._ids[0], f"propagation of object{plural} {', '.join(map(str, self._ids))}"


def _drive(job):
    """Worker body: run the propagation generator, passing its steps on."""
    return (yield from job)
