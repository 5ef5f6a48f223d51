"""A named model whose weights are not cached yet: the widget shows the download and Cancel stops it."""

import hashlib
import time
import urllib.request

import pytest

from samcore import download, zoo
from samcore.zoo import ModelEntry

CHUNK = 256 * 1024


@pytest.fixture
def remote_model(tiny_checkpoint, tmp_path, monkeypatch):
    """A registry model 'tiny_remote' served slowly from a local file, and an empty cache folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(download.CACHE_ENV_VAR, str(cache))
    payload = tiny_checkpoint.read_bytes()
    entry = ModelEntry(
        name="tiny_remote", architecture="vit_test", url=tiny_checkpoint.as_uri(),
        hash=f"sha256:{hashlib.sha256(payload).hexdigest()}", filename="tiny_remote.pt",
        description="test weights", source="tests", licence="none",
    )
    monkeypatch.setitem(zoo.MODELS, entry.name, entry)
    monkeypatch.setattr(download, "_DOWNLOAD_CHUNK", CHUNK)
    chunks = []

    class Slow:  # a connection of a few hundred kB/s
        def __init__(self, request, **kwargs):
            self._response = urllib.request.urlopen(request.full_url)
            self.headers = self._response.headers

        def read(self, size):
            time.sleep(0.02)
            chunks.append(size)
            return self._response.read(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._response.close()

    monkeypatch.setattr(download, "_open_url", Slow)
    return cache, entry, len(payload), chunks


def _widget(make_napari_viewer, stack):
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model("tiny_remote")
    return widget


def test_the_download_is_shown_and_then_embedded(make_napari_viewer, stack, remote_model, qtbot):
    cache, entry, size, chunks = remote_model
    widget = _widget(make_napari_viewer, stack)
    widget.load()
    qtbot.waitUntil(lambda: widget._status.value.startswith("Downloading tiny_remote: "), timeout=30_000)
    assert widget._status.value.endswith(f" of {size / 2**20:.0f} MB (once; Cancel stops it)…")
    widget.wait()
    assert size > 20 * CHUNK and len(chunks) > 20
    assert widget._status.value.startswith("Embeddings ready (4/4")
    assert (cache / entry.filename).read_bytes() == entry_bytes(entry)


def test_cancel_stops_the_download_and_keeps_nothing(make_napari_viewer, stack, remote_model, qtbot):
    cache, _, size, chunks = remote_model
    widget = _widget(make_napari_viewer, stack)
    widget.load()
    qtbot.waitUntil(lambda: len(chunks) >= 3, timeout=30_000)
    start = time.perf_counter()
    widget.cancel()
    assert time.perf_counter() - start < 2.0  # one chunk, not the rest of the file
    assert not widget._embedding.running and widget._session is None
    assert len(chunks) < size // CHUNK
    assert widget._status.value.startswith("Download of tiny_remote stopped; nothing was kept.")
    assert [path.name for path in cache.iterdir()] == []  # no partial file left behind
    widget.load(block=True)  # starts again, to the end
    assert widget._status.value.startswith("Embeddings ready (4/4")


def entry_bytes(entry):
    return urllib.request.urlopen(entry.url).read()
