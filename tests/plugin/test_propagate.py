"""Propagation from the widget: objects of the displayed slice spread through the stack."""

import numpy as np
import pytest
from samcore.propagation import PropagationSettings

# Random weights predict nothing meaningful: stop only on empty masks, to test the mechanics.
ANY_MASK = PropagationSettings(min_iou=0.0, min_score=0.0, min_area=0)


def _objects(viewer, widget, existing):
    layer = viewer.add_labels(existing.copy(), name="mine")
    widget._output.reset_choices()
    widget._output.value = layer
    widget.propagation_settings = ANY_MASK
    return layer


def one_object_embedded(viewer, widget):
    """Object 5 committed on slice 2 of a labels layer of the user's, slice 2 displayed, embeddings ready.

    Returns:
        The labels layer and a copy of what it held.
    """
    existing = np.zeros((4, 96, 96), np.uint32)
    existing[2, 30:60, 30:60] = 5
    objects = _objects(viewer, widget, existing)
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    return objects, existing


def test_propagation_fills_background_only_and_is_one_undo_step(sam):
    viewer, widget = sam
    existing = np.zeros((4, 96, 96), np.uint32)
    existing[2, 30:60, 30:60] = 5  # on the displayed slice: propagated
    existing[0, 0:20, 0:20] = 9  # elsewhere: kept, not propagated
    existing[3, 40:50, :] = 7
    objects = _objects(viewer, widget, existing)
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget.propagate(block=True)
    assert not widget._propagation.running and not widget._embedding.running
    labels = np.asarray(objects.data)
    np.testing.assert_array_equal(labels[2], existing[2])  # the key slice is untouched
    taken = existing != 0
    np.testing.assert_array_equal(labels[taken], existing[taken])  # other objects are untouched
    assert set(np.unique(labels[~taken])) <= {0, 5}
    assert (labels[[0, 1, 3]] == 5).any()
    assert widget._status.value.startswith("Propagated")
    widget.undo()
    np.testing.assert_array_equal(objects.data, existing)
    assert "propagation of object 5" in widget._status.value


def test_cancel_stops_the_propagation_and_keeps_what_was_filled(make_napari_viewer, tiny_checkpoint, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((30, 64, 64)).astype(np.float32), name="big")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget._model.value = "checkpoint file…"
    widget._checkpoint.value = str(tiny_checkpoint)
    existing = np.zeros((30, 64, 64), np.uint32)
    existing[15, 16:48, 16:48] = 1
    objects = _objects(viewer, widget, existing)
    viewer.dims.set_current_step(0, 15)
    widget.load()
    qtbot.waitUntil(lambda: widget._session is not None and 15 in widget._session.store, timeout=60_000)
    widget.propagate()  # stops the embeddings; the propagation computes those it needs
    assert widget._propagation.running and widget._cancel_button.enabled
    qtbot.waitUntil(lambda: "Propagating:" in widget._status.value, timeout=60_000)
    widget.cancel()
    assert not widget._propagation.running and not widget._cancel_button.enabled
    assert widget._status.value.startswith("Cancelled")
    filled = [z for z in range(30) if (np.asarray(objects.data[z]) == 1).any()]
    assert 15 in filled and len(filled) < 30


def test_an_object_that_goes_nowhere_is_told_why(sam):
    viewer, widget = sam
    objects, existing = one_object_embedded(viewer, widget)
    widget.propagation_settings = PropagationSettings(min_iou=0.0, min_score=0.0, min_area=96 * 96 + 1)
    widget.propagate(block=True)
    np.testing.assert_array_equal(objects.data, existing)
    assert widget._status.value.startswith(
        "Propagated: 0 object-slices filled for 1 object(s). Object 5 stayed"
    )
    assert "on slice 3, " in widget._status.value and "on slice 1, " in widget._status.value
    assert "(min_area)" in widget._status.value or "no mask was found" in widget._status.value


def test_2d_image_and_empty_slice_are_refused_with_a_message(sam, make_napari_viewer, messages):
    viewer, widget = sam
    _objects(viewer, widget, np.zeros((4, 96, 96), np.uint32))
    viewer.dims.set_current_step(0, 1)
    widget.load(block=True)
    widget.propagate()
    assert not widget._propagation.running
    assert messages["warning"] and "holds no object" in messages["warning"][-1]

    flat = viewer.add_image(np.zeros((32, 32), np.float32), name="flat")
    widget._image.value = flat
    widget.propagate()
    assert not widget._propagation.running
    assert "3D (Z, Y, X)" in messages["warning"][-1]


def test_embeddings_paused_for_a_propagation_resume_after_it(
    make_napari_viewer, tiny_checkpoint, qtbot, monkeypatch
):
    import time

    from samcore import Predictor

    embed_rgb_batch = Predictor.embed_rgb_batch  # every embedding goes through it

    def slowed(self, *args, **kwargs):  # the tiny model embeds all 12 slices before the test looks
        time.sleep(0.1)
        return embed_rgb_batch(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "embed_rgb_batch", slowed)
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).random((12, 64, 64)).astype(np.float32), name="stack")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget._model.value = "checkpoint file…"
    widget._checkpoint.value = str(tiny_checkpoint)
    existing = np.zeros((12, 64, 64), np.uint32)
    existing[6, 20:40, 20:40] = 3
    widget.propagation_settings = PropagationSettings(min_iou=0.0, min_score=0.0, min_area=0, z_range=(5, 7))
    objects = viewer.add_labels(existing.copy(), name="mine")
    widget._output.reset_choices()
    widget._output.value = objects
    viewer.dims.set_current_step(0, 6)
    widget.load()
    qtbot.waitUntil(lambda: widget._session is not None and 6 in widget._session.store, timeout=60_000)
    assert len(widget._session.store) < 12
    widget.propagate()
    assert widget._propagation.running and not widget._embedding.running  # the embeddings wait meanwhile
    qtbot.waitUntil(lambda: not widget._propagation.running, timeout=60_000)
    # ... and continue afterwards: the propagation alone embeds only slices 5 to 7.
    qtbot.waitUntil(lambda: len(widget._session.store) == 12, timeout=60_000)
    widget.wait()  # the resumed worker ends before the viewer closes
    qtbot.waitUntil(lambda: widget._status.value.endswith("Embeddings ready (12/12 slices)."), timeout=10_000)
    assert widget._status.value.startswith("Propagated: ")  # what the propagation found is still told


def test_a_propagation_refused_leaves_the_embeddings_running(
    make_napari_viewer, tiny_checkpoint, qtbot, messages
):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).random((40, 96, 96)).astype(np.float32), name="stack")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    objects = viewer.add_labels(np.zeros((40, 96, 96), np.uint32), name="mine")
    widget._output.reset_choices()
    widget._output.value = objects
    widget.load()
    qtbot.waitUntil(lambda: widget._session is not None and len(widget._session.store) > 0, timeout=60_000)
    assert widget._embedding.running  # 40 slices: still at work
    widget.propagate()  # nothing committed on the slice shown
    assert any("holds no object" in message for message in messages["warning"])
    assert widget._embedding.running
    qtbot.waitUntil(lambda: len(widget._session.store) == 40, timeout=120_000)
    widget.wait()

    def ready() -> None:  # on a timeout, the status line it holds instead is told
        assert widget._status.value.startswith("Embeddings ready"), widget._status.value

    qtbot.waitUntil(ready, timeout=10_000)


def test_the_views_menu_makes_new_embeddings_that_propagation_uses(sam, messages):
    viewer, widget = sam
    objects, _ = one_object_embedded(viewer, widget)
    one_view = widget._session
    assert one_view.predictor.views == 1  # test weights: one view, as segment-anything
    widget.set_model(views=2)
    widget.load(block=True)
    session = widget._session
    assert session is not one_view and session.predictor.views == 2
    assert session.store is not one_view.store and session.store.get(2).views == 2
    widget.propagate(block=True)  # decodes the session's two-view embeddings
    assert not messages["error"] and (np.asarray(objects.data)[[1, 3]] == 5).any()
    with pytest.raises(ValueError, match="views must be one of 0, 1, 2, 4"):
        widget.set_model(views=3)


def test_propagation_decodes_whole_slices_even_with_zoom_ticked(make_napari_viewer, tiny_checkpoint):
    viewer = make_napari_viewer()
    stack = np.random.default_rng(6).integers(0, 255, (3, 300, 400), dtype=np.uint8)
    viewer.add_image(stack, name="wide")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    existing = np.zeros(stack.shape, np.uint32)
    existing[1, 120:132, 150:166] = 3  # a 12 x 16 px object: small enough to zoom in on
    _objects(viewer, widget, existing)
    viewer.dims.set_current_step(0, 1)
    widget.load(block=True)  # every slice's embedding: the encoder runs again only for crops
    widget._zoom.value = True  # for the preview; propagation stays on whole slices (fast, better on nuclei3d)
    encoder = widget._session.predictor.model.image_encoder
    calls = []
    hook = encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        widget.propagate(block=True)
    finally:
        hook.remove()
    assert widget._status.value.startswith("Propagated")
    assert not calls


def test_unticking_fade_turns_the_contrast_rule_off_and_keeps_the_other_settings(sam, monkeypatch):
    import samcore.propagation

    viewer, widget = sam
    one_object_embedded(viewer, widget)
    used = []
    real = samcore.propagation.propagate_iter

    def spy(decoder, labels, object_ids=None, settings=None, cancel=None, keep_out=None):
        used.append(settings)
        return real(decoder, labels, object_ids, settings, cancel, keep_out)

    monkeypatch.setattr(samcore.propagation, "propagate_iter", spy)
    assert widget._fade.value  # ticked by default: the engine's rule applies
    widget.propagate(block=True)
    assert used[-1] is ANY_MASK and ANY_MASK.min_contrast > 0
    widget._fade.value = False
    widget.propagate(block=True)
    assert used[-1].min_contrast == 0
    assert (used[-1].min_iou, used[-1].min_score, used[-1].min_area) == (0.0, 0.0, 0)
    widget.propagation_settings = None  # the engine's defaults, less the contrast rule
    widget.propagate(block=True)
    assert used[-1] == PropagationSettings(min_contrast=0.0)


def test_a_slice_erased_by_hand_is_not_filled_again_by_the_next_propagation(sam, qtbot):
    viewer, widget = sam
    objects, _ = one_object_embedded(viewer, widget)
    widget.propagate(block=True)
    assert (objects.data[3] == 5).any()
    viewer.dims.set_current_step(0, 3)
    objects.brush_size = 200  # the eraser over the whole slice: object 5 does not go on to slice 3
    objects.paint((3, 48, 48), 0)
    qtbot.waitUntil(lambda: widget.erased_slices(objects) == {5: [3]}, timeout=5_000)
    assert not (objects.data[3] == 5).any()

    viewer.dims.set_current_step(0, 2)
    widget.propagate(block=True)
    assert not (objects.data[3] == 5).any()  # not grown back
    assert widget._status.value.endswith(
        "Object 5 stayed where it was: on slice 3, it was erased there by hand, so it is kept out."
    )
    objects.paint((3, 48, 48), 5)  # painted back by hand: slice 3 holds it again, and is no wall
    qtbot.waitUntil(lambda: widget.erased_slices(objects) == {5: [3]}, timeout=5_000)
    widget.propagate(block=True)
    assert (objects.data[3] == 5).all()
