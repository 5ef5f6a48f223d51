"""The widget's state across failures, RGB images, settings, layers and background jobs (headless napari)."""

import numpy as np
import pytest
import torch
from samcore import build_sam

from conftest import BOX, preview_mask

from napari_sam._candidates import Candidates
from napari_sam._widget import CHECKPOINT_CHOICE


def test_a_model_that_cannot_be_downloaded_is_reported_and_the_widget_stays_usable(sam, messages, qtbot):
    from samcore import download, zoo

    _, widget = sam
    widget.set_model("vit_b_lm")
    widget.load()  # offline (the `private_folders` fixture): samcore's error is a RuntimeError
    qtbot.waitUntil(lambda: not widget._embedding.running, timeout=10_000)
    where = str(download.cached_path(zoo.get_entry("vit_b_lm")))
    assert any(where in message and "network access is disabled" in message for message in messages["error"])
    assert "Could not download the model 'vit_b_lm'" in widget._status.value
    assert not widget._cancel_button.enabled
    widget._model.value = CHECKPOINT_CHOICE  # the user picks weights on disk: it works at once
    widget.load(block=True)
    assert len(widget._session.store) == 4


@pytest.mark.parametrize("shape", [(64, 64, 3), (3, 64, 64, 3)], ids=["2D RGB", "RGB stack"])
def test_rgb_images_are_segmented_like_grayscale_ones(make_napari_viewer, tiny_checkpoint, messages, shape):
    viewer = make_napari_viewer()
    image = viewer.add_image(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8), rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    widget.load(block=True)
    assert not messages["error"]
    spatial = shape[:-1]
    assert widget._prompt_layers.preview.data.shape == spatial
    assert len(widget._session.store) == (1 if len(spatial) == 2 else spatial[0])
    point = (30, 30) if len(spatial) == 2 else (1, 30, 30)
    if len(spatial) == 3:
        viewer.dims.set_current_step(0, 1)
    widget.add_point(point)
    assert widget._candidates is not None
    widget.commit()
    labels = widget.output_layer().data
    assert labels.shape == spatial
    assert (labels[1] if len(spatial) == 3 else labels).any()
    assert image.rgb


@pytest.mark.parametrize("kind", ["dask", "multiscale"])
def test_lazy_and_pyramid_images_are_segmented_at_full_resolution(
    make_napari_viewer, tiny_checkpoint, stack, kind
):
    import dask.array as da

    viewer = make_napari_viewer()
    if kind == "dask":  # a stack opened lazily from disk: read one slice at a time
        viewer.add_image(da.from_array(stack, chunks=(1, *stack.shape[1:])))
    else:  # numpy reads a pyramid as its coarsest level
        viewer.add_image([stack, stack[:, ::2, ::2]], multiscale=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    widget.load(block=True)
    view = widget._session.view
    assert view.data.shape == stack.shape
    assert isinstance(view.data, da.Array) == (kind == "dask")
    viewer.dims.set_current_step(0, 1)
    widget.add_point((1, 40, 60))  # beyond the coarse level's 48 columns
    assert widget._candidates is not None and widget._candidates.shown.shape == stack.shape[1:]


def test_thresholds_and_refine_follow_the_model_only_when_it_changes(sam):
    viewer, widget = sam
    widget.set_model("default")  # shown before anything loads: the registry's values
    assert (widget._min_iou.value, widget._min_stability.value, widget._refine.value) == (0.4, 0.8, True)
    widget.set_model("vit_b")
    assert (widget._min_iou.value, widget._min_stability.value, widget._refine.value) == (0.88, 0.95, False)
    widget._model.value = CHECKPOINT_CHOICE
    widget.load(block=True)
    widget._min_iou.value, widget._min_stability.value, widget._refine.value = 0.5, 0.6, True
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)  # Compute embeddings again: the same model
    assert (widget._min_iou.value, widget._min_stability.value, widget._refine.value) == (0.5, 0.6, True)


def commit_one(viewer, widget, z=1):
    viewer.dims.set_current_step(0, z)
    widget.load(block=True)
    widget.add_point((z, 40, 40))
    widget.commit()
    return widget.output_layer()


def test_after_a_commit_the_next_click_still_adds_a_point(sam):
    viewer, widget = sam
    commit_one(viewer, widget)
    assert viewer.layers.selection.active.name == "SAM points"


def test_undo_and_commit_are_refused_while_a_propagation_paints(sam, messages, qtbot):
    viewer, widget = sam
    objects = commit_one(viewer, widget)
    before = np.array(objects.data)
    widget.propagate()
    widget.undo()  # the worker runs until its end is handled here, on the main thread
    assert any("propagation is running" in message for message in messages["warning"])
    np.testing.assert_array_equal(objects.data[1], before[1])
    qtbot.waitUntil(lambda: not widget._busy(), timeout=20_000)
    widget.propagate()
    widget.load()  # Compute embeddings cancels the propagation, and says so
    assert any("propagation cancelled" in message for message in messages["info"])
    qtbot.waitUntil(lambda: not widget._busy(), timeout=20_000)


def test_a_propagation_cancelled_by_the_image_deleted_says_so(sam, messages, qtbot):
    viewer, widget = sam
    commit_one(viewer, widget)
    widget.propagate()
    viewer.layers.remove(viewer.layers["nuclei"])  # as napari closing does
    qtbot.waitUntil(lambda: not widget._busy(), timeout=20_000)
    assert any(
        "propagation cancelled (the image 'nuclei' was deleted)" in message for message in messages["info"]
    )


def test_deleting_the_image_stops_its_embeddings(sam, qtbot):
    viewer, widget = sam
    widget.load()
    viewer.layers.remove("nuclei")
    assert not widget._embedding.running and widget._session is None
    assert "deleted" in widget._status.value


def test_deleting_the_objects_layer_during_segment_all_stops_painting_into_it(sam, messages, qtbot):
    viewer, widget = sam
    objects = commit_one(viewer, widget)
    widget.segment_all("stack")
    viewer.layers.remove(objects)
    qtbot.waitUntil(lambda: not widget._busy(), timeout=60_000)
    assert objects.data.max() == 1  # only the committed object: nothing painted after the deletion
    assert not widget._history
    widget.undo()
    assert any("nothing to undo" in message for message in messages["info"])


def test_an_empty_mask_is_not_committed(sam, messages):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 1)
    widget.load(block=True)
    widget.add_point((1, 40, 40))
    no_pixel = np.full((1, 256, 256), -5.0, np.float32)  # SAM found no pixel
    widget._candidates = Candidates(np.array([0.5]), no_pixel, widget._session.predictor)
    widget.commit()
    assert any("empty" in message for message in messages["warning"])
    assert "SAM objects" not in viewer.layers


def test_the_objects_choice_leaves_out_the_preview_and_the_brush(sam):
    viewer, widget = sam
    commit_one(viewer, widget)
    viewer.add_labels(np.zeros((4, 96, 96), np.uint32), name="mine")
    names = [name for name, _ in widget._objects_choices()]
    assert names == ["SAM objects", "mine"]
    widget._output.reset_choices()
    assert [getattr(layer, "name", None) for layer in widget._output.choices] == [None, "SAM objects", "mine"]


def test_a_click_without_embedding_says_to_compute_them(sam, qtbot):
    viewer, widget = sam
    widget.load()
    qtbot.waitUntil(lambda: widget._session is not None and len(widget._session.store) >= 1, timeout=10_000)
    widget.cancel()
    missing = next(z for z in range(4) if z not in widget._session.store)
    viewer.dims.set_current_step(0, missing)
    widget.add_point((missing, 40, 40))
    assert "press Compute embeddings" in widget._status.value


@pytest.mark.parametrize("setting", ["views", "device"])
def test_changing_views_or_device_drops_the_embeddings(sam, setting):
    _, widget = sam
    widget.load(block=True)
    if setting == "views":
        widget.set_model(views=1)
    else:
        widget.set_model(device="cpu")
    assert widget._session is None
    assert "compute embeddings again" in widget._status.value


def test_scripted_clicks_and_boxes_are_in_world_coordinates(make_napari_viewer, tiny_checkpoint, stack):
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="nuclei", scale=(4, 0.5, 0.5), translate=(10, 100, 200))
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    widget.load(block=True)
    viewer.dims.set_point(0, 10 + 2 * 4)
    widget.add_point((18, 120, 220))  # slice 2, pixel (40, 40)
    np.testing.assert_allclose(widget._prompt_layers.points.data, [[2, 40, 40]])
    assert widget._candidates is not None
    widget.add_box((18, 105, 205), (18, 125, 225))
    np.testing.assert_allclose(widget._prompt_layers.boxes.data[0][[0, 2]], [[2, 10, 10], [2, 50, 50]])


@pytest.mark.parametrize(
    "placed", [{"scale": (3, 1, 1)}, {"translate": (10, 0, 0)}], ids=["z scale", "z offset"]
)
def test_on_a_stack_placed_in_the_world_the_slice_shown_stays_and_is_committed_to(
    make_napari_viewer, tiny_checkpoint, stack, placed
):
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="nuclei", **placed)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)  # the SAM layers are made: the slider stays where it was
    assert widget._current_z(viewer.layers["nuclei"]) == 2
    widget._prompt_layers.boxes.add_rectangles(BOX)
    widget.commit()  # the objects layer is made: the same
    assert widget._current_z(viewer.layers["nuclei"]) == 2
    objects = np.asarray(widget.output_layer().data)
    assert objects[2].any() and not np.delete(objects, 2, axis=0).any()
    assert widget._status.value == "Committed object 1."


def test_a_weight_file_trained_here_shows_its_own_settings_once_loaded(sam, tmp_path):
    viewer, widget = sam
    torch.manual_seed(0)
    path = tmp_path / "micro_v1.pt"
    torch.save(build_sam("micro_v1").state_dict(), path)
    path.with_suffix(".json").write_text('{"auto_thresholds": [0.25, 0.7]}')  # as calibration writes
    widget.set_model(checkpoint=path)
    assert (widget._min_iou.value, widget._min_stability.value) == (0.88, 0.95)  # unknown until loaded
    widget.load(block=True)
    assert (widget._min_iou.value, widget._min_stability.value) == (0.25, 0.7)
    assert widget._refine.value and widget._zoom.value and widget._session.predictor.views == 2


def test_a_side_view_says_how_to_get_back_to_slices_and_decodes_nothing_until_then(sam, messages):
    viewer, widget = sam
    widget.load(block=True)
    viewer.dims.set_current_step(0, 1)
    viewer.dims.order = (2, 0, 1)  # Z and Y on screen, the slider through X
    assert widget._status.value == "Side view (Z, Y): show Y and X to prompt on a slice."

    def advice():
        return [m for m in messages["info"] if "side view of 'nuclei' (axes Z, Y)" in m]

    assert not advice()  # looking is fine; the advice comes with a prompt
    widget.add_point((1, 40, 50))
    widget.add_point((1, 42, 52))
    assert widget._candidates is None
    assert not np.asarray(widget._prompt_layers.preview.data).any()
    assert len(advice()) == 1  # once, not at every click
    viewer.dims.order = (0, 1, 2)
    assert widget._status.value == "Y-X slices shown again: prompts on slice 1."
    assert widget._candidates is not None  # the clicks placed meanwhile are decoded now
    assert np.asarray(widget._prompt_layers.preview.data[1]).any()


def test_in_3d_view_prompts_wait_and_displayed_slice_actions_are_refused(sam, messages):
    from test_propagate import one_object_embedded

    viewer, widget = sam
    objects, existing = one_object_embedded(viewer, widget)  # object 5 on slice 2, displayed
    viewer.dims.ndisplay = 3
    assert widget._status.value == "3D view: switch to 2D to prompt on a slice."
    widget.add_point((2, 20, 20))
    assert widget._candidates is None
    widget.segment_all("slice", block=True)
    widget.propagate(block=True)
    refusals = [m for m in messages["warning"] if "the viewer is in 3D" in m]
    assert len(refusals) == 2
    np.testing.assert_array_equal(objects.data, existing)
    widget.propagate([5], block=True)  # named objects need no displayed slice
    assert np.count_nonzero(np.asarray(objects.data).any(axis=(1, 2))) > 1
    viewer.dims.ndisplay = 2
    assert widget._candidates is not None  # the click placed in 3D is decoded now


def test_a_2d_image_has_no_side_view_to_refuse(make_napari_viewer, tiny_checkpoint, messages):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    widget.load(block=True)
    viewer.dims.order = (1, 0)  # transposed, still Y and X
    assert widget.view_problem(widget._session.layer) is None
    widget.add_point((30, 30))
    assert widget._candidates is not None
    assert not any("view" in m for m in messages["info"])


def test_going_back_to_an_image_takes_up_its_embeddings_and_the_model_is_loaded_once(
    sam, stack, messages, monkeypatch
):
    import napari_sam._widget

    monkeypatch.setattr(napari_sam._widget, "KEEP_EARLIER", 2)  # three other images are enough to see it
    KEEP_EARLIER = 2
    viewer, widget = sam
    nuclei = viewer.layers["nuclei"]
    widget.load(block=True)
    first = widget._session
    model = first.predictor.model
    encoded = []
    model.image_encoder.register_forward_hook(lambda *args: encoded.append(1))
    others = [viewer.add_image(stack[:, ::-1].copy(), name=f"other {i}") for i in range(KEEP_EARLIER + 1)]
    widget._image.value = others[0]
    assert widget._session is None
    assert widget._status.value.startswith("Image changed: compute embeddings for it.")
    assert "'other 0' lies under 'other 2', which hides it" in widget._status.value  # added above it
    widget.load(block=True)
    assert widget._session.predictor.model is model  # not loaded again
    assert len(encoded) == 4  # the new image's slices only
    widget._image.value = nuclei  # back: its embeddings are taken up, nothing is computed
    widget.wait()
    assert widget._session is first and len(encoded) == 4
    assert widget._status.value == "Embeddings ready (4/4 slices)."
    assert sum("'nuclei' is taken as a stack" in m for m in messages["info"]) == 1  # not again
    viewer.dims.set_current_step(0, 1)
    widget.add_point((1, 40, 40))
    assert widget._candidates is not None
    for other in others[1:]:  # kept: nuclei, other 0; then nuclei, other 1 (other 0, the oldest, let go)
        widget._image.value = other
        widget.load(block=True)
    assert KEEP_EARLIER == 2 and [session.layer for session in widget._earlier] == [nuclei, others[1]]
    viewer.layers.remove(others[1])
    assert [session.layer for session in widget._earlier] == [nuclei]
    widget.set_model("default")  # another model: the kept embeddings are of no use
    assert widget._earlier == [] and not messages["error"]


def test_the_images_kept_in_memory_are_the_newest_that_fit_its_budget(sam, stack, monkeypatch):
    import napari_sam._widget

    viewer, widget = sam
    others = [viewer.add_image(stack * (i + 2), name=f"other {i}") for i in range(3)]
    images = [viewer.layers["nuclei"], *others]
    sessions = []
    for image in images:
        widget._image.value = image
        widget.load(block=True)
        sessions.append(widget._session)
    widget._image.value = images[0]  # back to the first: taken up, the other three kept
    widget.wait()
    assert widget._session is sessions[0] and [s.layer for s in widget._earlier] == images[1:]
    one = sessions[1].store.memory_bytes
    assert one == sum(s.store.memory_bytes for s in sessions) / 4 > 0
    monkeypatch.setattr(napari_sam._widget, "KEEP_EARLIER_BYTES", int(2.5 * one))  # room for two
    widget._image.value = images[3]
    widget.wait()
    assert [s.layer for s in widget._earlier] == [images[2], images[0]]  # the newest two fit
    monkeypatch.setattr(napari_sam._widget, "KEEP_EARLIER_BYTES", one // 2)  # room for none
    widget._image.value = images[1]
    widget.load(block=True)
    widget._image.value = images[2]
    assert [s.layer for s in widget._earlier] == [images[1]]  # the newest is kept whatever its size


def test_a_checkpoint_file_written_since_it_was_loaded_is_loaded_again(sam, stack, tiny_checkpoint, tmp_path):
    import os
    import shutil
    import time

    viewer, widget = sam
    weights = shutil.copy(tiny_checkpoint, tmp_path / "finetune.pth")
    widget.set_model(checkpoint=weights)
    widget.load(block=True)
    model = widget._session.predictor.model
    widget._image.value = viewer.add_image(stack[:, ::-1].copy(), name="second")
    widget.load(block=True)
    assert widget._session.predictor.model is model
    later = time.time() + 60
    os.utime(weights, (later, later))  # the user trained further and saved over the file
    widget._image.value = viewer.add_image(stack[:, :, ::-1].copy(), name="third")
    widget.load(block=True)
    assert widget._session.predictor.model is not model


def test_a_long_message_wraps_and_does_not_widen_the_dock(sam):
    _, widget = sam
    widget._status.value = "The objects layer 'SAM objects' has shape (12, 256, 256), the image (8, 9). " * 4
    widget._candidate.value = "candidate 1/3 (best), predicted IoU 0.97, zooming in… " * 4
    for line in (widget._status.native, widget._candidate.native):
        assert line.fontMetrics().horizontalAdvance(line.text()) > 1200
        assert line.sizeHint().width() < 600 and line.minimumSizeHint().width() < 600
        assert line.heightForWidth(300) > line.fontMetrics().height() * 3


def test_prompts_not_committed_stay_with_their_image_and_come_back_to_it(sam, stack, messages):
    viewer, widget = sam
    nuclei = viewer.layers["nuclei"]
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget.add_point((2, 40, 40))
    widget.add_point((2, 60, 20), positive=False)
    widget._prompt_layers.boxes.add_rectangles(BOX)
    stroke = np.zeros(stack.shape[1:], bool)
    stroke[40:44, 30:50] = True
    widget.paint(stroke, z=2)
    layers = widget._prompt_layers
    colours = layers.points.face_color.copy()
    assert preview_mask(widget, 2).any()

    other = viewer.add_image(stack[:, ::-1].copy(), name="other")
    widget._image.value = other
    assert len(layers.points.data) == 0 and len(layers.boxes.data) == 0  # nothing of 'nuclei' prompts 'other'
    assert not layers.brush.data.any()
    names = [layer.name for layer in viewer.layers]  # 'other' came last: it would hide the prompts
    assert names.index("other") < min(names.index(layer.name) for layer in layers.layers())
    assert widget._status.value == (
        "Image changed: compute embeddings for it. The 4 prompts not committed on 'nuclei' are kept for it: "
        "they come back when you pick it again."
    )
    widget.load(block=True)
    assert not preview_mask(widget, 2).any()  # no prompt on 'other' yet
    widget.add_point((2, 30, 30))

    widget._image.value = nuclei
    widget.wait()
    assert layers.points.data.tolist() == [[2, 40, 40], [2, 60, 20]]
    assert layers.points.features["label"].tolist() == [1, 0]
    np.testing.assert_array_equal(layers.points.face_color, colours)  # a negative click still looks negative
    assert len(layers.boxes.data) == 1
    np.testing.assert_array_equal(layers.brush.data[2] > 0, stroke)
    assert not layers.brush.data[[0, 1, 3]].any()
    assert preview_mask(widget, 2).any()  # the embeddings were taken up, and the prompts decoded again

    widget._image.value = other  # its one click comes back too
    assert layers.points.data.tolist() == [[2, 30, 30]]
    viewer.layers.remove(nuclei)  # what was kept for a deleted image goes with it
    assert layers.aside_for(nuclei) == 0
    assert not messages["error"]


def test_the_help_lines_up_the_keys_and_their_actions_in_two_columns(sam):
    from qtpy.QtCore import Qt
    from qtpy.QtGui import QTextDocument

    from napari_sam._widget import KEYS

    _, widget = sam
    label = widget._help.native
    assert label.textFormat() == Qt.RichText
    document = QTextDocument()
    document.setHtml(label.text())
    document.setTextWidth(400)
    layout = document.documentLayout()
    lefts = {}
    block = document.begin()
    while block.isValid():
        lefts[block.text().replace("\xa0", "").strip()] = layout.blockBoundingRect(block).left()
        block = block.next()
    actions = [action for _, action in KEYS.values()]
    assert set(actions) <= set(lefts)
    assert len({lefts[action] for action in actions}) == 1  # every action starts at the same x
    keys = [key.upper() if len(key) == 1 else key for key in KEYS]
    assert set(keys) <= set(lefts) and all(lefts[key] < lefts[actions[0]] for key in keys)
