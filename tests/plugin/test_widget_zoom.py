"""Zooming in on a small box from the widget: the preview is redrawn from the crop, in the background."""

import threading
import time

import numpy as np
import pytest

from samcore import Predictor


def embedded(make_napari_viewer, checkpoint, image, name):
    """A viewer with `image`, the widget opened from the plugin menu, its embedding ready."""
    viewer = make_napari_viewer()
    viewer.add_image(image, name=name)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=checkpoint)
    widget.load(block=True)
    return viewer, widget


@pytest.fixture
def wide(make_napari_viewer, tiny_checkpoint):
    """A 300x400 image, where a 12-pixel box is small enough to zoom in on, its embedding ready."""
    image = np.random.default_rng(2).integers(0, 255, (300, 400), dtype=np.uint8)
    return (*embedded(make_napari_viewer, tiny_checkpoint, image, "wide"), image)


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

    def broken(window, cancel=None):
        raise MemoryError("not enough memory for the crop")

    monkeypatch.setattr(widget._session.predictor, "embed_crop", broken)
    widget._zoom.value = True
    widget.add_box((120, 150), (131, 165))
    widget.wait()
    assert any("not enough memory" in message for message in errors)
    assert not widget._zoom.value and "Zooming in failed" in widget._status.value
    assert widget._candidates is not None  # the whole image's mask stays


def test_a_new_box_abandons_the_crop_of_the_last_one(wide, qtbot):
    """With SAM's ViT-H on a CPU a crop takes about a minute: a box drawn meanwhile must not wait for it."""
    _, widget, _ = wide
    widget._zoom.value = True
    predictor = widget._session.predictor
    started, ran = threading.Event(), []

    def crawl(module, inputs):  # every encoder block takes a while, as on a big model
        ran.append(module)
        started.set()
        time.sleep(0.3)

    blocks = predictor.model.image_encoder.blocks
    handles = [block.register_forward_pre_hook(crawl) for block in blocks]
    try:
        widget.add_box((120, 150), (131, 165))
        qtbot.waitUntil(started.is_set, timeout=30_000)
        widget.clear()
        widget.add_box((40, 60), (52, 74))  # another small box while the first crop is embedded
        zoomed = lambda: not widget._zoom_job.running and widget._candidate.value.endswith("zoomed in")  # noqa: E731
        qtbot.waitUntil(zoomed, timeout=30_000)
    finally:
        for handle in handles:
            handle.remove()
    assert len(ran) == 1 + len(blocks)  # the first crop stopped after its first block, the second ran whole
    assert predictor.has_crop(predictor.zoom_window(np.array([60, 40, 74, 52]), None))


def test_a_click_on_a_large_image_is_redrawn_from_the_crop_around_it(make_napari_viewer, tiny_checkpoint):
    image = np.random.default_rng(4).integers(0, 255, (300, 600), dtype=np.uint8)  # over twice 256 px
    _, widget = embedded(make_napari_viewer, tiny_checkpoint, image, "large")
    widget._zoom.value = True
    widget.add_point((150, 420))
    assert widget._candidate.value.endswith("zooming in…")  # the whole image's mask meanwhile
    widget.wait()
    assert widget._candidate.value.startswith("candidate 1/3")
    assert widget._candidate.value.endswith("zoomed in")
    used = widget._session.predictor
    reference = Predictor(used.model, precision=used.precision, zoom=True)
    reference.set_image(image)
    masks, scores, _ = reference.predict(np.array([[420.0, 150.0]]), np.array([1]))
    window = reference.zoom_window(None, np.array([[420.0, 150.0]]))
    shown = np.asarray(widget._prompt_layers.preview.data) > 0
    assert (shown != masks[np.argmax(scores)]).sum() <= 0.01 * masks[np.argmax(scores)].sum() + 5
    rows, cols = window.slices
    outside = np.ones(image.shape, bool)
    outside[rows, cols] = False
    assert not shown[outside].any()


def test_a_zoomed_click_refines_the_candidate_shown_and_the_next_on_n(make_napari_viewer, tiny_checkpoint):
    image = np.random.default_rng(5).integers(0, 255, (300, 600), dtype=np.uint8)
    _, widget = embedded(make_napari_viewer, tiny_checkpoint, image, "large")
    widget._zoom.value = True
    widget._refine.value = True
    widget.add_point((150, 420))
    widget.wait()
    assert widget._candidate.value.endswith("zoomed in")
    # The reference: the crop's three candidates, then the one shown decoded again with its own logits.
    used = widget._session.predictor
    reference = Predictor(used.model, precision=used.precision, zoom=True)
    reference.set_image(image)
    click, label = np.array([[420.0, 150.0]]), np.array([1])
    decoder = reference.crop_decoder(reference.zoom_window(None, click))
    scores, low_res = decoder.predict_logits(click, label, refine=False)

    def refined(index, own):  # the best through the single-mask output, the next through its own
        _, again = decoder.predict_logits(
            click, label, mask_input=low_res[index][None], multimask_output=own, refine=False
        )
        return decoder.masks_from_logits(again[[index if own else 0]])[0]

    order = np.argsort(-scores, kind="stable")
    for rank, index in enumerate(order[:2]):
        shown = np.asarray(widget._prompt_layers.preview.data) > 0
        expected = refined(index, own=rank > 0)
        assert (shown != expected).sum() <= 0.01 * expected.sum() + 5
        assert (shown != decoder.masks_from_logits(low_res[index][None])[0]).sum() > 0 or expected.sum() == 0
        widget.next_candidate()
