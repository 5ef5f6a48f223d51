"""Zooming in on a small box from the SAM widget, without holding up the viewer.

A zoomed mask needs an embedding of the crop around the box (`samcore.zoom`): a fraction of a
second with the bundled model, many seconds with SAM's ViT-H on a CPU. The widget shows the whole
image's mask at once; this job embeds the crop in a `thread_worker` and, once it is done, the
widget draws the preview again, now from the crop. A box drawn meanwhile replaces the crop being
embedded, which is abandoned part-way (`samcore.cancel`), and is zoomed next.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ._background import reported

if TYPE_CHECKING:
    from samcore import Predictor
    from samcore.zoom import Window

    from ._widget import SamWidget


class ZoomJob:
    """Embeds one crop at a time for the widget's zoomed previews.

    Args:
        widget: The SAM widget whose preview is drawn again when a crop is ready.
    """

    def __init__(self, widget: SamWidget) -> None:
        self._widget = widget
        self._worker = None
        self._failed = False
        self._cancel = threading.Event()
        self._window: Window | None = None  # the crop being embedded
        self._superseded = False  # its box was replaced: draw the preview again when it stops

    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, predictor: Predictor, window: Window) -> None:
        """Embed the crop `window` of the predictor's image; the preview is drawn again after it."""
        if self._worker is not None:
            if window != self._window:  # another box: the crop in progress is of no use any more
                self._superseded = True
                self._cancel.set()
            return  # the preview is drawn again when it ends, and asks for the box then shown
        from napari.qt.threading import thread_worker

        self._cancel = threading.Event()
        worker = thread_worker(reported(_embed_crop), ignore_errors=True)(predictor, window, self._cancel)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker, self._failed, self._window, self._superseded = worker, False, window, False
        worker.start()

    def cancel(self) -> None:
        """Abandon the crop being embedded; the preview is not drawn again for it."""
        self._superseded = False
        self._cancel.set()

    def _on_error(self, error: Exception) -> None:
        from napari.utils.notifications import show_error

        self._failed = True
        message = f"Zooming in failed, so it is turned off: {error}"
        show_error(f"SAM: {message}")
        self._widget._zoom.value = False  # else every redraw would try again
        self._widget._status.value = message

    def _on_finished(self) -> None:
        self._worker, self._window = None, None
        if not self._failed and (self._superseded or not self._cancel.is_set()):
            self._widget.segment()


def _embed_crop(predictor: Predictor, window: Window, cancel: threading.Event):
    """Worker body: the predictor keeps the crop's embedding for its zoomed predictions."""
    from samcore.cancel import Cancelled

    yield window
    try:
        predictor.embed_crop(window, cancel)
    except Cancelled:
        pass  # the widget stopped it: nothing to keep
