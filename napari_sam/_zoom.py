"""Zooming in on a small box from the SAM widget, without holding up the viewer.

A zoomed mask needs an embedding of the crop around the box (`samcore.zoom`): a fraction of a
second with the bundled model, many seconds with SAM's ViT-H on a CPU. The widget shows the whole
image's mask at once; this job embeds the crop in a `thread_worker` and, once it is done, the
widget draws the preview again, now from the crop. A box drawn meanwhile is zoomed next.
"""

from __future__ import annotations

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

    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, predictor: Predictor, window: Window) -> None:
        """Embed the crop `window` of the predictor's image; the preview is drawn again after it."""
        if self._worker is not None:
            return  # the preview is drawn again when it ends, and asks for the box then shown
        from napari.qt.threading import thread_worker

        worker = thread_worker(reported(_embed_crop), ignore_errors=True)(predictor, window)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker, self._failed = worker, False
        worker.start()

    def _on_error(self, error: Exception) -> None:
        from napari.utils.notifications import show_error

        self._failed = True
        message = f"Zooming in failed, so it is turned off: {error}"
        show_error(f"SAM: {message}")
        self._widget._zoom.value = False  # else every redraw would try again
        self._widget._status.value = message

    def _on_finished(self) -> None:
        self._worker = None
        if not self._failed:
            self._widget.segment()


def _embed_crop(predictor: Predictor, window: Window):
    """Worker body: the predictor keeps the crop's embedding for its zoomed predictions."""
    yield window
    predictor.embed_crop(window)
