"""Zooming in on a small box from the widget: the preview is redrawn from the crop, in the background."""

import numpy as np
import pytest

from samcore import Predictor


@pytest.fixture
def wide(make_napari_viewer, tiny_checkpoint):
    """A 300x400 image, where a 12-pixel box is small enough to zoom in on, its embedding ready."""
    viewer = make_napari_viewer()
    image = np.random.default_rng(2).integers(0, 255, (300, 400), dtype=np.uint8)
    viewer.add_image(image, name="wide")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    widget.load(block=True)
    return viewer, widget, image


def test_the_preview_of_a_small_box_is_redrawn_from_the_crop_around_it(wide):
    _, widget, image = wide
    assert not widget._zoom.value  # a weight file: SAM's way
    widget._zoom.value = True
    widget.add_box((120, 150), (131, 165))  # (y, x) corners
    widget.wait()
    box = np.array([150, 120, 165, 131])
    used = widget._session.predictor
    reference = Predictor(used.model, precision=used.precision, zoom=True)
    reference.set_image(image)
    zoomed = reference.predict(box=box, multimask_output=False)[0][0]
    whole = reference.predict(box=box, multimask_output=False, zoom=False)[0][0]
    apart = (zoomed != whole).sum()
    assert apart > 1000
    # The embeddings were computed in other threads than the reference's: a few pixels may differ.
    shown = np.asarray(widget._prompt_layers.preview.data) > 0
    assert widget._candidate.value.endswith("zoomed in"), widget._candidate.value
    assert (shown != zoomed).sum() < 0.01 * apart, ((shown != zoomed).sum(), apart)
    widget._zoom.value = False  # unticked: the whole image's mask again
    assert ((np.asarray(widget._prompt_layers.preview.data) > 0) != whole).sum() < 0.01 * apart


def test_a_failed_zoom_is_reported_and_turned_off(wide, monkeypatch):
    from napari.utils import notifications

    _, widget, _ = wide
    errors = []
    monkeypatch.setattr(notifications, "show_error", errors.append)

    def broken(window):
        raise MemoryError("not enough memory for the crop")

    monkeypatch.setattr(widget._session.predictor, "embed_crop", broken)
    widget._zoom.value = True
    widget.add_box((120, 150), (131, 165))
    widget.wait()
    assert any("not enough memory" in message for message in errors)
    assert not widget._zoom.value and "Zooming in failed" in widget._status.value
    assert widget._candidates is not None  # the whole image's mask stays
