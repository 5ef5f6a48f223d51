"""The widget's long jobs on labels (propagation, segment all): shared running, cancelling and undo.

A job runs its engine generator in a `thread_worker` with a napari progress bar; the widget's Cancel
sets its event, and the engine stops between steps. Subclasses paint into `_layer` as steps arrive
and record the flat indices they wrote in `_painted`; when the worker ends, those pixels (background
before the job) become one undo step, and embeddings the job paused resume unless it was cancelled.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

import numpy as np

from ._annotations import Commit

if TYPE_CHECKING:
    from napari.layers import Labels

    from ._widget import SamWidget


class JobError(Exception):
    """An error of a worker body, passed on so that it reaches the widget's error handler.

    superqt's workers take a RuntimeError raised in their body for a deleted worker and report
    nothing (neither `errored` nor `finished`); samcore's download errors are RuntimeErrors.
    """


def reported(body: Callable[..., Generator]) -> Callable[..., Generator]:
    """Wrap a worker's generator function so that every error it raises reaches `errored`."""

    @functools.wraps(body)
    def run(*args, **kwargs):
        try:
            return (yield from body(*args, **kwargs))
        except RuntimeError as error:
            raise JobError(str(error)) from error

    return run


class BackgroundJob:
    """One widget's job: its worker, cancel event, progress bar and painted pixels.

    Args:
        widget: The SAM widget it reports to (status label, cancel button, undo history).
    """

    progress_label = ""

    def __init__(self, widget: SamWidget) -> None:
        self._widget = widget
        self._worker = None
        self._cancel = threading.Event()
        self._progress = None
        self._layer: Labels | None = None
        self._painted: list[np.ndarray] = []
        self._written: list[np.ndarray] = []  # the values written at `_painted`, for undo

    def _record(self, index: np.ndarray) -> None:
        """Keep the flat indices just painted into `_layer`, and what was painted there."""
        self._painted.append(index)
        self._written.append(self._layer.data.reshape(-1)[index])  # indexing with an array copies
        self._widget._autosave_objects(self._layer, index)

    @property
    def running(self) -> bool:
        return self._worker is not None

    def cancel(self) -> None:
        """Stop after the current step; what was painted is kept."""
        if self._worker is not None:
            self._cancel.set()

    def forget_layer(self, layer: Labels) -> None:
        """The labels layer was deleted: stop painting into it, cancel the run, record no undo step."""
        if self._worker is not None and self._layer is not None and layer == self._layer:
            self._cancel.set()
            self._layer, self._painted, self._written = None, [], []

    def _launch(self, body, *args, status: str) -> None:
        """Run `body(*args)` in a worker; its yields go to `_on_step`, its return value to `_on_done`."""
        from napari.qt.threading import thread_worker
        from napari.utils import progress

        self._cancel.clear()
        worker = thread_worker(reported(body), ignore_errors=True)(*args)
        self._progress = progress(total=0, desc=self.progress_label)
        worker.yielded.connect(self._on_step)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._widget._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._widget._cancel_button.enabled = True
        self._widget._status.value = status
        worker.start()

    def _on_step(self, step) -> None:
        raise NotImplementedError

    def _on_done(self, result) -> None:
        raise NotImplementedError

    def _undo_entry(self) -> tuple[int, str]:
        """The object id and the note of the undo step recording this run."""
        raise NotImplementedError

    def _before_reset(self) -> None:
        """Last reports of a finished run, while its layer and counts are still set."""

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        index = np.concatenate(self._painted) if self._painted else np.zeros(0, np.intp)
        if index.size and self._layer is not None:
            object_id, note = self._undo_entry()
            previous = np.zeros(index.size, self._layer.data.dtype)  # only background was painted
            written = np.concatenate(self._written)
            step = Commit(object_id, index, previous, note, written)
            self._widget._history.append((self._layer, self._layer.data, step))
        self._before_reset()
        self._worker, self._layer, self._painted, self._written = None, None, [], []
        self._widget._cancel_button.enabled = self._widget._busy()
        self._widget._embedding.resume(cancelled=self._cancel.is_set())
        self._widget._prepare.start()  # the displayed slice's decoding, once no work is left
