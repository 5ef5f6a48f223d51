"""Segment all from the widget: automatic objects added as new ids, linked through the stack, one undo.

The test models have random weights, so most tests replace the engine's per-slice segmentation
with known instance images and check what the widget does with them; the last one runs the engine.
"""

import time

import numpy as np
import samcore.jobs
from samcore.automatic import AutoSettings
from samcore.embeddings import EmbeddingStore
from samcore.progress import Progress

# Random weights give masks of low predicted IoU and stability: keep them, to test the mechanics.
PERMISSIVE = AutoSettings(
    points_per_side=4, min_predicted_iou=0.0, min_stability=0.0, min_area=4, box_nms_iou=1.0, min_visible=0.2
)


def found_objects() -> np.ndarray:
    """Per-slice instance images of the (4, 96, 96) stack, numbered on each slice on its own."""
    found = np.zeros((4, 96, 96), np.int32)
    for z in range(4):
        found[z, 30:60, 30:60] = 3 - z % 2  # one nucleus through the stack, numbered anew on each slice
    found[1:3, 70:90, 5:25] = 4  # a second one on slices 1 and 2
    found[0, 5:15, 70:90] = 1  # a third on slice 0 only
    found[3, 72:88, 62:88] = 6  # on slice 3, inside an existing object: left out
    return found


def existing_objects() -> np.ndarray:
    existing = np.zeros((4, 96, 96), np.uint32)
    existing[0, 0:20, 0:20] = 9
    existing[2, 40:50, 40:70] = 5  # covers part of the nucleus on slice 2
    existing[3, 70:90, 60:90] = 7
    return existing


def fake_engine(monkeypatch, found, delay=0.0):
    """Replace the engine's segmentation of one slice by `found[z]`, in two steps of `delay` seconds."""
    calls = []

    def slice_labels(predictor, rgb, z, store, settings, done=True, cancel=None):
        calls.append(z)
        for step in (1, 2):
            time.sleep(delay)
            yield Progress("masks", step, 2, z)
        return found[z].copy(), False

    monkeypatch.setattr(samcore.jobs, "slice_labels", slice_labels)
    return calls


def _objects(viewer, widget, existing):
    layer = viewer.add_labels(existing.copy(), name="mine")
    widget._output.reset_choices()
    widget._output.value = layer
    return layer


def test_stack_objects_are_new_linked_in_3d_and_one_undo_step(sam, monkeypatch, messages):
    viewer, widget = sam
    existing, found = existing_objects(), found_objects()
    objects = _objects(viewer, widget, existing)
    calls = fake_engine(monkeypatch, found)
    widget.load(block=True)
    widget._scope.value = "stack"
    widget.segment_all(block=True)  # what the button calls
    assert calls == [0, 1, 2, 3] and not widget._automatic.running and not widget._cancel_button.enabled
    labels = np.asarray(objects.data)
    assert labels.dtype == np.uint32
    taken = existing != 0
    np.testing.assert_array_equal(labels[taken], existing[taken])  # existing objects are untouched
    nucleus = labels[:, 30:60, 30:60][~taken[:, 30:60, 30:60]]
    second, third = labels[1:3, 70:90, 5:25], labels[0, 5:15, 70:90]
    assert len(np.unique(nucleus)) == 1 and len(np.unique(second)) == 1 and len(np.unique(third)) == 1
    new_ids = {int(nucleus[0]), int(second[0, 0, 0]), int(third[0, 0])}
    assert new_ids == {10, 11, 12}  # above the largest existing id, one per 3D object
    assert set(np.unique(labels)) == {0, 5, 7, 9} | new_ids  # the object inside 7 was left out
    assert not labels[(found == 0) & ~taken].any()
    assert widget._status.value == "Segmented all: 3 new object(s) in 4 slices."
    assert not messages["warning"] and not messages["error"]
    widget.undo()
    np.testing.assert_array_equal(objects.data, existing)
    assert widget._status.value == "Undid the automatic segmentation (3 objects)."


def test_displayed_slice_only_and_ids_above_objects_painted_since(sam, monkeypatch):
    viewer, widget = sam
    existing, found = existing_objects(), found_objects()
    objects = _objects(viewer, widget, existing)
    calls = fake_engine(monkeypatch, found)
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget.segment_all("slice", block=True)
    assert calls == [2]
    labels = np.asarray(objects.data)
    np.testing.assert_array_equal(labels[[0, 1, 3]], existing[[0, 1, 3]])
    assert set(np.unique(labels[2])) == {0, 5, 10, 11}
    objects.data[1, 0:5, 0:5] = 20  # an object painted by hand meanwhile
    viewer.dims.set_current_step(0, 0)
    widget.segment_all("slice", block=True)
    assert calls == [2, 0]
    assert set(np.unique(objects.data[0])) == {0, 9, 21, 22}
    widget.undo()
    widget.undo()
    expected = existing.copy()
    expected[1, 0:5, 0:5] = 20
    np.testing.assert_array_equal(objects.data, expected)


def test_a_slice_edited_in_place_is_not_segmented_from_its_old_embedding(sam, monkeypatch, messages):
    viewer, widget = sam
    existing, found = existing_objects(), found_objects()
    objects = _objects(viewer, widget, existing)
    calls = fake_engine(monkeypatch, found)
    image = widget._image.value
    image.data = image.data.copy()  # the test's own pixels, to edit
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    image.data[2, :10] = 0
    widget.segment_all("slice", block=True)
    assert calls == [] and widget._session is None
    assert any("changed: compute embeddings again, then segment all" in m for m in messages["warning"])
    np.testing.assert_array_equal(objects.data, existing)


def test_cancel_stops_and_keeps_the_finished_slices(sam, monkeypatch, qtbot, messages):
    viewer, widget = sam
    existing, found = existing_objects(), found_objects()
    objects = _objects(viewer, widget, existing)
    fake_engine(monkeypatch, found, delay=0.3)
    widget.load(block=True)
    widget.segment_all("stack")
    assert widget._automatic.running and widget._cancel_button.enabled
    widget.segment_all("stack")
    assert messages["info"][-1] == "SAM: segment all is already running."
    widget.propagate()
    assert "segment all is running" in messages["info"][-1] and not widget._propagation.running
    qtbot.waitUntil(lambda: (np.asarray(objects.data[0]) > 9).any(), timeout=30_000)
    widget.cancel()
    assert not widget._automatic.running and not widget._cancel_button.enabled
    assert widget._status.value.startswith("Cancelled") and "/4 slices" in widget._status.value
    labels = np.asarray(objects.data)
    assert (labels[0] > 9).any() and not (labels[3] > 9).any()
    widget.undo()
    np.testing.assert_array_equal(objects.data, existing)


def test_refusals_and_nothing_found_are_told(make_napari_viewer, tiny_checkpoint, monkeypatch, messages):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.segment_all()
    assert "Open an image first" in messages["error"][-1]

    widget._image.value = viewer.add_image(np.zeros((48, 48), np.float32), name="flat")  # 2D: one slice
    widget._model.value = "checkpoint file…"
    widget._checkpoint.value = str(tiny_checkpoint)
    widget.segment_all("stack")
    assert "compute embeddings first" in messages["warning"][-1]
    assert [layer.name for layer in viewer.layers] == ["flat"]

    widget.load(block=True)
    fake_engine(monkeypatch, np.zeros((1, 48, 48), np.int32))
    widget.segment_all("stack", block=True)
    assert messages["warning"][-1].startswith("SAM: segment all found no object in the image. On dim")
    assert not widget._history
    objects = viewer.layers["SAM objects"]  # created for the result, where none was chosen
    assert objects.data.shape == (48, 48)

    found = np.zeros((1, 48, 48), np.int32)
    found[0, 10:30, 10:30] = 2
    fake_engine(monkeypatch, found)
    objects.data[5:35, 5:35] = 1
    widget.segment_all(block=True)
    assert "found 1 object(s) in the image, all on existing objects" in messages["warning"][-1]
    objects.data[...] = 0
    widget.segment_all(block=True)
    assert set(np.unique(objects.data)) == {0, 1} and (objects.data[10:30, 10:30] == 1).all()


def test_real_engine_on_the_stack_computes_missing_embeddings_and_keeps_objects(sam, messages):
    viewer, widget = sam
    existing = existing_objects()
    objects = _objects(viewer, widget, existing)
    widget.auto_settings = PERMISSIVE
    widget.load(block=True)
    session = widget._session
    computed = session.store
    session.store = EmbeddingStore(computed.key, 4)  # only slice 1 computed so far
    session.store.put(1, computed.get(1))
    widget.segment_all("stack", block=True)
    assert len(session.store) == 4  # the missing embeddings were computed on the way
    labels = np.asarray(objects.data)
    assert labels.shape == (4, 96, 96) and labels.dtype == np.uint32
    taken = existing != 0
    np.testing.assert_array_equal(labels[taken], existing[taken])
    assert set(np.unique(labels[~taken])) <= {0} | set(range(10, int(labels.max()) + 1))
    assert widget._status.value.startswith("Segmented all:")
    assert labels.max() > 9  # these settings keep some masks of the random-weight model
    assert not messages["error"]
    widget.undo()
    np.testing.assert_array_equal(objects.data, existing)


def test_the_threshold_boxes_follow_the_model_and_feed_segment_all(sam, monkeypatch):
    viewer, widget = sam
    seen = []

    def slice_labels(predictor, rgb, z, store, settings, done=True, cancel=None):
        seen.append(settings)
        return np.zeros(rgb.shape[:2], np.int32), False
        yield  # a job that finishes at once

    monkeypatch.setattr(samcore.jobs, "slice_labels", slice_labels)
    widget.load(block=True)  # test weights carry no thresholds of their own: SAM's
    assert (widget._min_iou.value, widget._min_stability.value) == (0.88, 0.95)
    widget._min_iou.value, widget._min_stability.value = 0.3, 0.6
    widget.segment_all("slice", block=True)
    assert (seen[-1].min_predicted_iou, seen[-1].min_stability) == (0.3, 0.6)
    assert seen[-1].points_per_side == AutoSettings().points_per_side
    widget.auto_settings = PERMISSIVE  # a script's settings win
    widget.segment_all("slice", block=True)
    assert seen[-1] == PERMISSIVE
    widget.set_model("default")
    widget.load(block=True)
    bundled = AutoSettings.for_model(widget._session.predictor.model)
    assert (widget._min_iou.value, widget._min_stability.value) == (
        bundled.min_predicted_iou, bundled.min_stability
    ) != (0.88, 0.95)


def test_cancel_stops_the_real_engine_within_a_batch_of_points(sam, monkeypatch, qtbot):
    from samcore.modeling import fast_decoder

    viewer, widget = sam
    objects = _objects(viewer, widget, existing_objects())
    widget.auto_settings = AutoSettings(points_per_side=8, points_per_batch=64, min_predicted_iou=0.0)
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    decoded, decode_one = [], fast_decoder.decode_one

    def slow(*args):  # a prompt's decoding as long as a large model's on a slow CPU
        decoded.append(1)
        time.sleep(0.05)
        return decode_one(*args)

    monkeypatch.setattr(fast_decoder, "decode_one", slow)
    widget.segment_all("slice")
    qtbot.waitUntil(lambda: len(decoded) >= 3, timeout=30_000)
    widget.cancel()  # returns once the worker has stopped
    assert not widget._automatic.running
    assert len(decoded) < 10  # of the batch's 64 points: stopped within one prompt, not at the batch's end
    assert widget._status.value.startswith("Cancelled")
    np.testing.assert_array_equal(objects.data, existing_objects())


def test_with_a_disk_cache_a_second_run_takes_each_slices_objects_from_it(
    sam, monkeypatch, tmp_path, messages
):
    viewer, widget = sam
    existing, found = existing_objects(), found_objects()
    objects = _objects(viewer, widget, existing)
    calls = fake_engine(monkeypatch, found)
    widget._cache_dir.value = str(tmp_path)
    widget.load(block=True)
    widget.segment_all("stack", block=True)
    first = np.asarray(objects.data).copy()
    assert calls == [0, 1, 2, 3] and (first > 9).any()
    widget.undo()
    widget.segment_all("stack", block=True)  # the same settings: nothing is segmented again
    assert calls == [0, 1, 2, 3]
    np.testing.assert_array_equal(objects.data, first)
    assert widget._status.value == "Segmented all: 3 new object(s) in 4 slices."
    widget.undo()
    widget._min_stability.value = round(widget._min_stability.value - 0.1, 2)  # other settings: all again
    widget.segment_all("stack", block=True)
    assert calls == [0, 1, 2, 3] * 2
    np.testing.assert_array_equal(objects.data, first)
