"""What the widget does when the user works around it: hand edits, replaced data, lazy layers, closing it,
cancelling a slow embedding."""

import threading
import time

import dask.array as da
import numpy as np
from conftest import BOX, commit_box, preview_mask
from test_propagate import _objects, one_object_embedded

from napari_sam._candidates import Candidates


def test_undo_keeps_what_the_user_painted_after_the_commit(sam):
    viewer, widget = sam
    objects = commit_box(viewer, widget)
    committed = objects.data == 1
    assert committed.sum() > 20
    ys, xs = np.nonzero(committed[2])
    objects.selected_label, objects.brush_size = 7, 5
    objects.paint((2, int(ys.mean()), int(xs.mean())), 7)  # a hand correction over the new object
    painted = objects.data == 7
    assert painted.any()
    widget.undo()
    np.testing.assert_array_equal(objects.data == 7, painted)  # the hand edit stays
    assert not (objects.data == 1).any()  # the rest of the object is gone
    assert f"{(painted & committed).sum()} of its pixels" in widget._status.value


def test_undo_of_a_propagation_keeps_later_hand_edits(sam):
    viewer, widget = sam
    objects, existing = one_object_embedded(viewer, widget)  # propagated with any mask, into the user's layer
    widget.propagate(block=True)
    propagated = (objects.data == 5) & (existing == 0)
    assert propagated.sum() > 10
    edited = np.zeros_like(propagated)
    edited.reshape(-1)[np.flatnonzero(propagated)[:10]] = True
    objects.data[edited] = 9  # the user relabels part of a propagated object by hand
    widget.undo()
    assert (objects.data[edited] == 9).all()
    np.testing.assert_array_equal(objects.data[~edited], existing[~edited])


def test_replacing_the_image_data_drops_its_embeddings(sam):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    image = widget._image.value
    old = widget._session.store.get(2).features.clone()
    image.data = np.ascontiguousarray(image.data[:, ::-1])  # same shape, other pixels
    assert widget._session is None
    assert "changed: compute embeddings again" in widget._status.value
    widget.load(block=True)
    assert not np.allclose(widget._session.store.get(2).features.numpy(), old.numpy())


def _own_copy(viewer, widget):
    """The image layer, holding a copy of the shared test stack that a test may edit in place."""
    image = widget._image.value
    image.data = image.data.copy()
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    return image


def test_editing_the_displayed_slice_in_place_drops_its_embeddings(sam):
    viewer, widget = sam
    image = _own_copy(viewer, widget)
    widget._prompt_layers.boxes.add_rectangles(BOX)
    assert preview_mask(widget, 2).any()
    old = widget._session.store.get(2).features.clone()
    image.data[2] = image.data[2][::-1].copy()  # same array, no data event
    image.refresh()
    widget._prompt_layers.points.add([2, 40, 40])  # the next prompt notices the new pixels
    assert widget._session is None
    assert "changed: compute embeddings again" in widget._status.value
    assert not preview_mask(widget, 2).any()  # nothing decoded from the old slice's embedding
    widget.load(block=True)
    assert not np.allclose(widget._session.store.get(2).features.numpy(), old.numpy())


def test_moving_to_a_slice_edited_in_place_drops_the_embeddings(sam):
    viewer, widget = sam
    image = _own_copy(viewer, widget)
    image.data[0] = 0
    viewer.dims.set_current_step(0, 1)  # an unedited slice: the session is kept
    assert widget._session is not None
    viewer.dims.set_current_step(0, 0)
    assert widget._session is None
    assert "changed: compute embeddings again" in widget._status.value


def test_propagation_refuses_a_stack_edited_in_place_and_leaves_the_labels(sam, messages):
    viewer, widget = sam
    existing = np.zeros((4, 96, 96), np.uint32)
    existing[2, 30:60, 30:60] = 5
    objects = _objects(viewer, widget, existing)
    image = _own_copy(viewer, widget)
    image.data[3] = image.data[3] // 2  # a slice the user is not looking at
    widget.propagate(block=True)
    assert any("changed: compute embeddings again, then propagate" in m for m in messages["warning"])
    assert widget._session is None
    np.testing.assert_array_equal(objects.data, existing)


def test_a_lazy_labels_layer_is_refused_and_left_as_it_was(sam, messages):
    viewer, widget = sam
    lazy = viewer.add_labels(da.zeros((4, 96, 96), dtype=np.uint32, chunks=(1, 96, 96)), name="on disk")
    widget._output.reset_choices()
    widget._output.value = lazy
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget._prompt_layers.boxes.add_rectangles(BOX)
    assert preview_mask(widget, 2).any()
    widget.commit()
    assert any("not an array in memory" in message for message in messages["error"])
    assert isinstance(lazy.data, da.Array) and not lazy.data.any().compute()
    assert preview_mask(widget, 2).any()  # the preview is kept, to commit elsewhere


def test_a_strided_labels_layer_is_copied_before_objects_are_added(sam, messages):
    viewer, widget = sam
    base = np.zeros((96, 96, 4), np.uint32)
    mine = viewer.add_labels(base.transpose(2, 0, 1), name="transposed")  # a strided view of `base`
    widget._output.reset_choices()
    widget._output.value = mine
    objects = commit_box(viewer, widget)
    assert objects is mine and (mine.data == 1).any()
    assert mine.data.flags.c_contiguous
    assert not base.any()  # the user's own array is left as it was
    assert any("copied" in message for message in messages["info"])


def test_closing_the_dock_stops_the_embeddings_and_gives_the_keys_back(
    make_napari_viewer, tiny_checkpoint, qtbot
):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((40, 64, 64)).astype(np.float32), name="big")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    widget.load()
    qtbot.waitUntil(lambda: widget._session is not None and len(widget._session.store) >= 1, timeout=60_000)
    layers = widget._prompt_layers.layers()
    assert any(_sam_keys(layer) for layer in layers) and _sam_keys(viewer)
    viewer.window.remove_dock_widget(widget.native)
    assert not widget._busy()
    assert len(widget._session.store if widget._session else []) < 40
    assert not _sam_keys(viewer) and not any(_sam_keys(layer) for layer in layers)


def test_the_sam_layers_keep_napari_s_own_keys(sam):
    viewer, widget = sam
    widget.load(block=True)
    layers = widget._prompt_layers
    assert {"S", "P"}.isdisjoint(_sam_keys(layers.points))  # select and add points
    assert {"S", "P", "T", "Shift+P"}.isdisjoint(_sam_keys(layers.boxes))  # select, polygon, path
    assert "P" not in _sam_keys(layers.brush)  # paint
    for layer in (layers.points, layers.boxes, layers.brush):
        assert {"C", "U", "N", "Shift+C"} <= _sam_keys(layer).keys()
    assert _sam_keys(viewer)["Shift+P"] == "sam_propagate"
    assert _sam_keys(layers.points)["Shift+P"] == "sam_propagate"


def _sam_keys(owner) -> dict[str, str]:
    """The keys of `owner` (viewer or layer) bound to the SAM widget, with their handlers' names."""
    return {
        str(key): handler.__name__
        for key, handler in owner.keymap.items()
        if getattr(handler, "sam_widget", None) is not None
    }


def test_candidates_are_shown_and_numbered_best_first():
    scores, logits = np.array([0.2, 0.9, 0.5]), np.zeros((3, 4, 4), np.float32)
    candidates = Candidates(scores, logits, lambda low_res: low_res > 0)
    shown = [candidates.index]
    assert candidates.describe(False).startswith("candidate 1/3 (best), predicted IoU 0.90")
    while candidates.next() and len(shown) < 3:
        shown.append(candidates.index)
    assert shown == [1, 2, 0]
    assert candidates.describe(False).startswith("candidate 1/3 (best)")  # back round to the best


def test_a_click_before_any_embedding_says_what_to_do(sam, messages):
    viewer, widget = sam
    widget._prompt_layers_for(widget._image.value)
    widget.add_point((2, 40, 40))
    assert widget._status.value == "No embeddings yet: press Compute embeddings."
    widget.commit()
    assert any("no embeddings yet" in message for message in messages["warning"])


def test_deleting_the_image_says_so_when_the_picker_moves_to_another(sam):
    viewer, widget = sam
    viewer.add_image(np.zeros((4, 96, 96), np.float32), name="other")
    widget._image.value = viewer.layers["nuclei"]
    widget.load(block=True)
    viewer.layers.remove("nuclei")
    assert widget._image.value.name == "other" and widget._session is None
    assert "'nuclei' was deleted" in widget._status.value


def test_a_widget_opened_again_takes_over_the_layers_of_the_closed_one(sam):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget.add_point((2, 40, 40))
    assert preview_mask(widget, 2).any()
    layers = widget._prompt_layers.layers()
    viewer.window.remove_dock_widget(widget.native)
    assert not preview_mask(widget, 2).any()  # the closed widget's preview is cleared
    _, again = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    assert again is not widget
    again.set_model(checkpoint=widget._checkpoint.value)
    again.load(block=True)
    assert [layer.name for layer in again._prompt_layers.layers()] == [layer.name for layer in layers]
    assert sum(layer.name.startswith("SAM ") for layer in viewer.layers) == 4  # no second set
    closed_status = widget._status.value
    again.add_point((2, 60, 60))  # the old click and this one, decoded by the new widget only
    assert preview_mask(again, 2).any() and again._candidates is not None
    assert widget._status.value == closed_status  # the closed widget no longer hears the layers


def test_cancel_while_the_weights_are_read_says_why_it_takes_a_moment(sam, monkeypatch, qtbot):
    import samcore

    viewer, widget = sam
    reading = threading.Event()
    load_model = samcore.load_model

    def slow_reading(*args, **kwargs):  # ViT-H's 2.5 GB take seconds to read, and torch cannot be stopped
        reading.set()
        time.sleep(0.5)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(samcore, "load_model", slow_reading)
    widget.load()
    qtbot.waitUntil(reading.is_set, timeout=10_000)
    told = []
    widget._embedding.quit()
    told.append(widget._status.value)
    widget.wait()
    assert told == ["Stopping once the weights of 'tiny.pth' are read (that cannot be interrupted)…"]
    assert widget._status.value == "Stopped: 0/4 slices have embeddings."


def test_cancel_abandons_the_slice_being_embedded(sam, monkeypatch, qtbot):
    """Cancel does not wait for the slice in progress (about a minute with ViT-H on a laptop CPU)."""
    import samcore

    viewer, widget = sam
    started, ran = threading.Event(), []
    load_model = samcore.load_model

    def slow_model(*args, **kwargs):
        model = load_model(*args, **kwargs)

        def crawl(module, inputs):  # every encoder block takes a while, as on a big model
            ran.append(module)
            started.set()
            time.sleep(0.3)

        for block in model.image_encoder.blocks:
            block.register_forward_pre_hook(crawl)
        return model

    monkeypatch.setattr(samcore, "load_model", slow_model)
    widget.load()
    qtbot.waitUntil(started.is_set, timeout=60_000)
    widget.cancel()  # during the first slice's first block
    blocks = len(widget._session.predictor.model.image_encoder.blocks)
    assert blocks > 1 and len(ran) == 1  # no later block of that slice ran
    assert len(widget._session.store) == 0
    assert widget._status.value.startswith("Stopped: 0/4 slices")
    widget.load(block=True)  # computing again works, and the abandoned slice is computed whole
    assert len(widget._session.store) == 4


def test_a_short_stack_may_be_channels_but_a_single_slice_is_not(sam, messages, stack):
    viewer, widget = sam
    for slices, noticed in ((1, False), (3, True)):
        messages["info"].clear()
        widget._image.value = viewer.add_image(stack[:slices], name=f"{slices} slices")
        widget.load(block=True)
        said = any("If they are channels" in message for message in messages["info"])
        assert said == noticed, slices
