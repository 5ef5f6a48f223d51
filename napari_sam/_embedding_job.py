"""Computing an image's embeddings for the SAM widget, displayed slice first, in the background.

Loading the weights and embedding every slice run in a `thread_worker` with a napari progress
bar. The first thing the worker hands back is the `Session` (model, predictor, stack view and
embedding store of one image layer); each slice embedded after that is reported, and the widget
draws its preview again when the displayed slice's embedding arrives. Jobs that compute the
embeddings they need themselves (propagation, segment all) pause this one; it resumes after them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ._background import reported
from ._prompts import pixel_data

if TYPE_CHECKING:
    from napari.layers import Image

    from ._widget import SamWidget

# (registry name, None) or (None, checkpoint path): where the model's weights come from.
ModelSource = tuple[str | None, str | None]


class Session:
    """What belongs to one image layer and one model: the predictor, stack view and embeddings.

    Args:
        layer: The image layer.
        model_source: The model's (registry name, checkpoint path), one of them None.
        settings: (device, views), views None for the model's own number.
        predictor: The `samcore.Predictor` on the model.
        view: The layer's `samcore.embeddings.StackView`.
        store: The layer's `samcore.embeddings.EmbeddingStore`.
        model_name: The model's name for the status line.
    """

    def __init__(self, layer, model_source, settings, predictor, view, store, model_name: str) -> None:
        self.layer, self.model_source = layer, model_source
        self.settings = settings
        self.predictor, self.view, self.store, self.model_name = predictor, view, store, model_name
        self.source = layer.data  # the array embedded: a layer whose .data is replaced needs new embeddings
        self.created = time.time()  # a checkpoint file written after this is another model
        # The pixels embedded, slice by slice: data edited in place (layer.data[...] = ...) keeps the
        # array and sends no event, so each slice's checksum is compared before its embedding is used.
        self.fingerprints = [view.fingerprint(z) for z in range(view.n_slices)]
        self._current: tuple[int, bool] | None = None  # the slice set in the predictor, and if with pixels

    def matches(self, layer, model_source, settings, z: int = 0) -> bool:
        """Whether this session serves `layer` with this model and settings (slice z's pixels checked)."""
        same = (layer, model_source, settings) == (self.layer, self.model_source, self.settings)
        return same and not self.stale([z])

    def stale(self, slices: Iterable[int] | None = None) -> bool:
        """Whether the layer's data was replaced, or the pixels of `slices` (None: all) edited in place,
        since the session began."""
        if self.layer.data is not self.source:
            return True
        slices = range(self.view.n_slices) if slices is None else slices
        return any(self.view.fingerprint(z) != self.fingerprints[z] for z in slices)

    def use(self, z: int, embedding, pixels: bool = False) -> None:
        """Make slice z current in the predictor, with its pixels if asked (to zoom in on boxes)."""
        if self._current != (z, pixels) and self._current != (z, True):
            image = self.view.rgb_slice(z) if pixels else None
            self.predictor.set_embedding(embedding, image=image)
            self._current = (z, pixels)


class EmbeddingJob:
    """One widget's embedding worker: started, cancelled, paused for other jobs and resumed.

    Args:
        widget: The SAM widget it reports to (session, status label, progress, preview).
    """

    def __init__(self, widget: SamWidget) -> None:
        self._widget = widget
        self.worker = None
        self.layer: Image | None = None  # the image the worker computes
        self._failed = False  # the worker reported an error, which stays in the status line
        self._progress = None
        self._paused = False  # stopped for a propagation or segment all; resumed after it
        self._stop = threading.Event()  # set to abandon the slice being embedded
        self._model_name = ""  # the named model being loaded, for the download's status line
        self._downloading = threading.Event()  # set by the worker while it downloads the weights
        self._download_seen = False  # this run reported download progress
        self._after = ""  # the summary of the job these embeddings resumed after, kept in the status line
        self._loading = False  # the worker is loading the model (it has not reported its session yet)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, layer: Image, model_source: ModelSource, settings) -> None:
        """Embed the slices of `layer` without an embedding, nearest to the displayed slice first.

        `settings` is (device, views), views None for the model's own number. The widget's session
        is reused if it belongs to the same layer, model and settings; otherwise the worker loads
        the model and makes a new one.
        """
        from napari.qt.threading import thread_worker
        from napari.utils import progress

        widget = self._widget
        session = widget._session
        center = widget._current_z(layer) or 0
        if session is not None and not session.matches(layer, model_source, settings, center):
            session = None
        # Errors go to _on_error (a notification), not back into the event loop.
        self._stop, self._downloading, self._download_seen = threading.Event(), threading.Event(), False
        self._after = ""
        # A model another kept session loaded already is used again, not loaded a second time.
        loaded = None if session is not None else widget._loaded_model(model_source, settings[0])
        worker = thread_worker(reported(_compute), ignore_errors=True)(
            session, layer, model_source, settings, widget._embedding_cache(), center, self._stop,
            self._downloading, loaded,
        )
        self._progress = progress(total=0, desc="SAM embeddings")
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker, self.layer, self._failed = worker, layer, False
        self._loading = session is None  # until the worker reports the session: the model loads first
        name, checkpoint = model_source
        self._model_name = name or (f"'{Path(checkpoint).name}'" if checkpoint else "the default model")
        widget._cancel_button.enabled = True
        widget._status.value = "Loading the model…" if session is None else "Computing embeddings…"
        worker.start()

    def quit(self) -> None:
        """Ask the worker to stop; the slice it is embedding, or the download, is abandoned (the widget
        waits for it)."""
        if self.worker is not None:
            self._stop.set()
            if not self._downloading.is_set():  # a download stops at its next chunk and deletes its part
                self.worker.quit()
                if self._loading:  # reading weights cannot be interrupted: say why Cancel takes a moment
                    name = self._model_name
                    self._widget._status.value = (
                        f"Stopping once the weights of {name} are read (that cannot be interrupted)…"
                    )

    def pause(self) -> None:
        """Stop for a job that computes the embeddings it needs itself; see `resume`."""
        if self.worker is not None:
            self.quit()
            self._widget.wait()
            self._paused = True

    def resume(self, cancelled: bool) -> None:
        """After a job that paused the embeddings: compute the missing ones, unless it was cancelled."""
        paused, self._paused = self._paused, False
        widget = self._widget
        session = widget._session
        if not paused or widget._busy() or session is None:
            return
        done, total = len(session.store), session.view.n_slices
        if done == total:
            return
        if cancelled:  # Cancel stops everything: say what is left
            widget._status.value += f" Embeddings stopped at {done}/{total} slices: press Compute embeddings."
        else:
            summary = widget._status.value  # what the job found: the user still reads it
            self.start(session.layer, session.model_source, session.settings)
            self._after = summary + " "

    def _on_progress(self, event: tuple) -> None:
        widget = self._widget
        kind, payload = event
        if kind == "download":
            if self.worker is not None:  # not one that arrives after the stopped job's last word
                self._show_download(payload)
        elif kind == "session":
            self._loading = False
            widget._session = payload
            bar = self._progress  # napari's bar may run queued events, this job's end among them
            if self._download_seen:
                bar.set_description("SAM embeddings")
            bar.total, bar.n = payload.view.n_slices, len(payload.store)
            bar.refresh()
            widget._on_session(payload)
        elif kind == "slice":
            session = widget._session
            if self.worker is not None:  # a slice reported after the worker stopped keeps "Stopped: …"
                done, total = len(session.store), session.view.n_slices
                widget._status.value = f"{self._after}Computing embeddings: {done}/{total} slices…"
            if payload == widget._current_z(session.layer) or session.view.n_slices == 1:
                widget.segment()
            # Last: napari's bar may run queued events, and the job's end among them must have the last word.
            self._progress.update(1)

    def _show_download(self, step) -> None:
        """A chunk of the model's weights arrived: MB in the status line and the progress bar."""
        mb = 1024 * 1024
        if step.total and step.done >= step.total:
            status = f"Checking the downloaded weights of {self._model_name}…"
        else:
            of = f" of {step.total / mb:.0f}" if step.total else ""
            status = f"Downloading {self._model_name}: {step.done / mb:.0f}{of} MB (once; Cancel stops it)…"
        self._widget._status.value = status
        # Last: napari's bar may run queued events, and the job's end among them must have the last word.
        bar = self._progress
        if not self._download_seen:
            self._download_seen = True
            bar.set_description(f"SAM: downloading {self._model_name}")
        bar.total, bar.n = -(-step.total // mb), step.done // mb
        bar.refresh()

    def _on_done(self, session: Session | None) -> None:
        if session is not None:  # None: stopped while downloading (see `_on_finished`)
            ready = f"Embeddings ready ({len(session.store)}/{session.view.n_slices} slices)."
            self._widget._status.value = self._after + ready

    def _on_error(self, error: Exception) -> None:
        self._failed = True
        self._widget._on_error(error)

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.worker = None
        widget = self._widget
        widget._cancel_button.enabled = widget._busy()
        widget._prepare.start()  # the displayed slice's decoding, now that the cores are free
        session, failed, self._failed = widget._session, self._failed, False
        if not failed and session is None and self._download_seen:
            widget._status.value = (
                f"Download of {self._model_name} stopped; nothing was kept. Compute embeddings starts it again."
            )
        elif not failed and session is not None and len(session.store) < session.view.n_slices:
            widget._status.value = (
                f"Stopped: {len(session.store)}/{session.view.n_slices} slices have embeddings."
            )


def _compute(session, layer, model_source, settings, cache_dir, center, stop, downloading, loaded=None):
    """Worker body: load the model (if needed, downloading its weights first, with progress) and embed
    every slice, nearest to `center` first. Returns the session, or None if stopped while downloading.

    `downloading` is set while the weights download: the job then stops through `stop` alone, at the
    next chunk, so that the part downloaded is deleted there and then.

    `settings` is (device, views), views None for the model's own number. Setting the event `stop`
    abandons the slice being embedded. `loaded`: the model, if another session has it loaded.
    """
    from samcore import Predictor, load_model
    from samcore.download import fetch_job
    from samcore.embeddings import (
        EmbeddingStore, StackView, embed_slices, model_key, nearest_first, stack_key, store_path,
    )
    from samcore.zoo import get_entry

    if session is None:
        name, checkpoint = model_source
        device, views = settings
        if loaded is None and checkpoint is None:  # weights from the cache folder; downloaded if missing
            download = fetch_job(get_entry(name), progress=False)
            downloading.set()
            try:
                for step in download:
                    if stop.is_set():
                        download.close()  # deletes the part downloaded
                        return None
                    yield ("download", step)
            finally:
                downloading.clear()
            if stop.is_set():  # stopped while the weights were checked
                return None
        model = load_model(name, checkpoint, device) if loaded is None else loaded
        view = StackView.of(pixel_data(layer), rgb=layer.rgb)
        predictor = Predictor(model, views=views)
        if cache_dir is None:  # the key names and checks a disk cache: hashing every pixel of a
            # lazy stack would read all of it from disk before the first slice is embedded
            key, path = "in memory", None
        else:
            key = stack_key(view, model_key(model), predictor.views)
            path = store_path(cache_dir, layer.name, key)
        store = EmbeddingStore(key, view.n_slices, path)
        label = name or Path(checkpoint).name
        session = Session(layer, model_source, settings, predictor, view, store, label)
    yield ("session", session)
    order = nearest_first(center, session.view.n_slices)
    for z in embed_slices(session.predictor, session.view, session.store, order, cancel=stop):
        yield ("slice", z)
    return session
