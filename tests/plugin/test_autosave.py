"""Autosave: the objects layer is on disk after every commit, undo, job and brush stroke, and opens again."""

import numpy as np
import pytest
from conftest import BOX, commit_box
from qtpy.QtCore import QCoreApplication
from test_propagate import one_object_embedded

from napari_sam._autosave import SUFFIX, painted_rows, read_objects, touched_rows


def saved(widget, folder):
    """The one autosaved array in `folder`, once every write asked for is on disk."""
    QCoreApplication.processEvents()  # a brush stroke is written once napari has painted it
    widget._autosave.flush()
    files = sorted(folder.glob("*" + SUFFIX))
    assert len(files) == 1
    return files[0], read_objects(files[0])


def test_rows_touched_by_flat_indices_and_by_paint_atoms():
    assert touched_rows(np.array([0, 5, 99, 100, 250]), (3, 10, 10)).tolist() == [0, 1, 2]
    assert touched_rows(np.array([3, 17]), (4, 5)).tolist() == [0, 3]  # rows of a 2D image
    atoms = [((np.array([2, 2, 3]), np.array([0, 1, 1]), np.array([5, 5, 5])), np.zeros(3), 7)]
    assert painted_rows(atoms, (4, 10, 10)).tolist() == [2, 3]
    box = ((slice(1, 3), slice(0, 4), slice(2, 9)), None, np.zeros(3), 7)  # a stroke's box
    assert painted_rows([box], (4, 10, 10)).tolist() == [1, 2]
    assert painted_rows([object()], (4, 10, 10)) is None  # an edit of another kind: write it all


def test_commit_undo_and_brush_strokes_are_on_disk(sam, private_folders, messages):
    viewer, widget = sam
    objects = commit_box(viewer, widget)
    path, on_disk = saved(widget, private_folders)
    assert path.name == "nuclei - SAM objects" + SUFFIX
    assert (on_disk == 1).sum() > 20
    np.testing.assert_array_equal(on_disk, objects.data)
    assert any(str(path) in message for message in messages["info"])  # the user is told where, once
    objects.selected_label, objects.brush_size = 7, 5
    objects.paint((0, 40, 40), 7)  # by hand, on another slice
    _, on_disk = saved(widget, private_folders)
    assert (on_disk[0] == 7).sum() > 5
    np.testing.assert_array_equal(on_disk, objects.data)
    widget.undo()
    _, on_disk = saved(widget, private_folders)
    assert not (on_disk == 1).any() and (on_disk[0] == 7).any()
    assert sum(str(path) in message for message in messages["info"]) == 1
    viewer.window.remove_dock_widget(widget.native)  # closing the widget ends the autosave
    objects.paint((3, 40, 40), 8)
    _, on_disk = saved(widget, private_folders)
    assert (objects.data == 8).any() and not (on_disk == 8).any()


def test_napari_undo_and_redo_in_the_objects_layer_are_on_disk(sam, private_folders):
    viewer, widget = sam
    objects = commit_box(viewer, widget)
    objects.selected_label, objects.brush_size = 7, 5
    objects.paint((0, 40, 40), 7)
    _, on_disk = saved(widget, private_folders)
    assert (on_disk[0] == 7).any()
    objects.undo()  # napari's Ctrl-Z: the stroke is undone
    _, on_disk = saved(widget, private_folders)
    assert not (objects.data == 7).any()
    np.testing.assert_array_equal(on_disk, objects.data)
    objects.redo()  # and Ctrl-Shift-Z: it is back
    _, on_disk = saved(widget, private_folders)
    assert (objects.data == 7).any()
    np.testing.assert_array_equal(on_disk, objects.data)
    viewer.window.remove_dock_widget(widget.native)  # closed: napari's own undo again, not saved
    objects.undo()
    _, on_disk = saved(widget, private_folders)
    assert not (objects.data == 7).any() and (on_disk[0] == 7).any()


def test_a_propagation_is_on_disk_and_the_folder_opens_as_labels(sam, private_folders):
    viewer, widget = sam
    objects, _ = one_object_embedded(viewer, widget)
    widget.propagate(block=True)
    assert ((objects.data == 5).sum(axis=(1, 2)) > 0).sum() > 1
    path, on_disk = saved(widget, private_folders)
    np.testing.assert_array_equal(on_disk, objects.data)  # the user's own object 5 too
    layers = viewer.open(str(path), plugin="napari-sam")
    assert layers[0].__class__.__name__ == "Labels" and layers[0].name.startswith("mine (nuclei, autosaved ")
    np.testing.assert_array_equal(layers[0].data, objects.data)


def test_objects_erased_by_hand_stay_kept_out_in_the_autosave_and_a_layer_opened_from_it(
    sam, private_folders, qtbot
):
    viewer, widget = sam
    objects, _ = one_object_embedded(viewer, widget)
    widget.propagate(block=True)
    assert (objects.data[3] == 5).any()
    viewer.dims.set_current_step(0, 3)
    objects.brush_size = 200
    objects.paint((3, 48, 48), 0)  # the eraser over slice 3
    qtbot.waitUntil(lambda: widget.erased_slices(objects) == {5: [3]}, timeout=5_000)
    path, on_disk = saved(widget, private_folders)
    assert not (on_disk[3] == 5).any()
    restored = viewer.open(str(path), plugin="napari-sam")[0]
    assert widget.erased_slices(restored) == {5: [3]}
    # After a crash, the objects come back from the autosave: propagating again keeps out of slice 3.
    viewer.layers.remove(objects)
    widget._output.value = restored
    viewer.dims.set_current_step(0, 2)
    widget.propagate(block=True)
    assert not (restored.data[3] == 5).any()
    assert "on slice 3, it was erased there by hand, so it is kept out" in widget._status.value


@pytest.mark.parametrize("when", ["before the widget", "after the widget"])
def test_objects_opened_from_an_autosave_are_picked_for_their_image(
    make_napari_viewer, tiny_checkpoint, stack, private_folders, when
):
    from napari_sam._autosave import Autosave, Session

    earlier = np.zeros(stack.shape, np.uint32)
    earlier[2, 10:20, 10:20], earlier[0, 60:70, 60:70] = 1, 2  # two objects from a session that crashed
    autosave = Autosave(private_folders, Session())
    path, _, _ = autosave.save(earlier, "nuclei", "SAM objects")
    autosave.flush()
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="nuclei")
    viewer.add_image(stack[:, :50], name="other")
    open_it = lambda: viewer.open(str(path), plugin="napari-sam")[0]  # noqa: E731
    restored = open_it() if when == "before the widget" else None
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    widget._image.value = viewer.layers["nuclei"]
    if restored is None:
        restored = open_it()
    assert widget._output.value == restored
    widget._image.value = viewer.layers["other"]
    assert widget._output.value is None  # not its objects
    widget._image.value = viewer.layers["nuclei"]
    commit_box(viewer, widget)
    assert widget.output_layer() == restored
    assert set(np.unique(restored.data)) == {0, 1, 2, 3}  # the new object gets the next id


def test_unticked_nothing_is_written(sam, private_folders):
    viewer, widget = sam
    widget._autosave_box.value = False
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget._prompt_layers.boxes.add_rectangles(BOX)
    widget.commit()
    widget._autosave.flush()
    assert (widget.output_layer().data == 1).any() and not private_folders.exists()


def test_a_failed_write_is_told_and_the_objects_stay(sam, private_folders, messages):
    viewer, widget = sam
    private_folders.write_text("a file where the folder should be")
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget._prompt_layers.boxes.add_rectangles(BOX)
    widget.commit()
    widget._autosave.flush()
    objects = widget.output_layer()
    objects.paint((0, 40, 40), 7)  # the next change reports the failure
    QCoreApplication.processEvents()
    assert any("autosave failed" in message for message in messages["warning"])
    assert (objects.data == 1).any() and (objects.data == 7).any()


@pytest.mark.parametrize("name", ["exp1/cell A", "a:b"])
def test_layer_names_stay_inside_the_folder(sam, private_folders, name):
    viewer, widget = sam
    viewer.layers["nuclei"].name = name
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget._prompt_layers.boxes.add_rectangles(BOX)
    widget.commit()
    path, _ = saved(widget, private_folders)
    assert path.parent == private_folders


def test_a_2d_image_is_saved_by_rows(make_napari_viewer, tiny_checkpoint, stack, private_folders):
    viewer = make_napari_viewer()
    viewer.add_image(np.concatenate([stack[2], stack[1]]), name="tall")  # (192, 96): two row chunks
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    widget.load(block=True)
    widget._prompt_layers.boxes.add_rectangles(BOX[:, 1:])
    widget.commit()
    objects = widget.output_layer()
    objects.paint((150, 40), 9)
    _, on_disk = saved(widget, private_folders)
    assert (on_disk == 9).any() and (on_disk == 1).any()
    np.testing.assert_array_equal(on_disk, objects.data)


def test_a_new_session_keeps_the_earlier_autosave_beside(tmp_path):
    from napari_sam._autosave import KEEP_EARLIER, Autosave, Session

    labels = np.zeros((2, 8, 8), np.uint32)
    other = Autosave(tmp_path, Session())
    other_path, _, _ = other.save(labels, "cells [1]", "SAM objects (2)")  # another layer's, never pruned
    other.flush()
    for session in range(KEEP_EARLIER + 2):  # napari started again and again, after a crash each time
        labels[0, 0, 0] = session + 1
        autosave = Autosave(tmp_path, Session())
        path, first, earlier = autosave.save(labels, "cells [1]", "SAM objects")
        assert first and earlier == (session > 0)
        autosave.flush()
        assert autosave.errors() == []
        with_time = path.parent / f"{path.name[: -len(SUFFIX)]} (2026-01-0{session + 1}T10-00-00){SUFFIX}"
        if session:  # what the last session left was renamed (here: named as if saved on another day)
            earlier = sorted(tmp_path.glob(f"cells ?1? - SAM objects (20*){SUFFIX}"))
            assert read_objects(earlier[-1])[0, 0, 0] == session
            earlier[-1].rename(with_time)
    earlier = sorted(tmp_path.glob(f"cells ?1? - SAM objects (20*){SUFFIX}"))
    assert len(earlier) == KEEP_EARLIER and other_path.exists()
    assert [read_objects(p)[0, 0, 0] for p in earlier] == list(range(2, KEEP_EARLIER + 2))  # the oldest went
    assert read_objects(path)[0, 0, 0] == KEEP_EARLIER + 2


def test_autosaves_of_an_earlier_session_are_pointed_out_once(sam, private_folders, messages):
    from napari_sam._autosave import Autosave, Session

    viewer, widget = sam
    crashed = Autosave(private_folders, Session())  # what a session that crashed left
    crashed.save(np.ones((4, 96, 96), np.uint32), "nuclei", "SAM objects")
    crashed.save(np.ones((4, 96, 96), np.uint32), "other image", "SAM objects")
    crashed.flush()
    widget.load(block=True)
    told = [message for message in messages["info"] if "autosave(s)" in message]
    assert len(told) == 1 and "1 autosave(s) of objects drawn on 'nuclei'" in told[0]
    assert "'nuclei - SAM objects.sam.zarr'" in told[0]
    widget.load(block=True)
    assert len([message for message in messages["info"] if "autosave(s)" in message]) == 1


def _on_disk(widget, folder, name):
    QCoreApplication.processEvents()
    widget._autosave.flush()
    path = folder / (name + SUFFIX)
    return read_objects(path) if path.exists() else None


def test_strokes_in_the_objects_layer_are_on_disk_after_the_widget_is_reopened(sam, private_folders):
    viewer, widget = sam
    objects = commit_box(viewer, widget)
    viewer.window.remove_dock_widget(widget.native)
    _, reopened = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    assert reopened._output.value is objects
    objects.selected_label, objects.brush_size = 9, 5
    objects.paint((0, 40, 40), 9)  # by hand, before SAM writes anything in this widget
    on_disk = _on_disk(reopened, private_folders, "nuclei - SAM objects")
    assert (objects.data == 9).any()
    np.testing.assert_array_equal(on_disk, objects.data)


def test_a_widget_opened_again_goes_on_with_the_same_autosave(sam, private_folders, messages):
    viewer, widget = sam
    objects = commit_box(viewer, widget)
    viewer.window.remove_dock_widget(widget.native)
    _, reopened = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    reopened.set_model(checkpoint=widget._checkpoint.value)
    reopened.load(block=True)
    assert not [message for message in messages["info"] if "autosave(s)" in message]  # it is not a crash's
    objects.selected_label, objects.brush_size = 9, 5
    objects.paint((0, 40, 40), 9)
    on_disk = _on_disk(reopened, private_folders, "nuclei - SAM objects")
    np.testing.assert_array_equal(on_disk, objects.data)
    assert [path.name for path in private_folders.glob("*" + SUFFIX)] == ["nuclei - SAM objects" + SUFFIX]


def test_a_stroke_in_one_images_objects_is_saved_under_that_image_with_another_picked(
    sam, stack, private_folders
):
    viewer, widget = sam
    viewer.add_image(stack.copy(), name="other")
    widget._image.value = viewer.layers["nuclei"]
    objects = commit_box(viewer, widget)
    widget._image.value = viewer.layers["other"]
    objects.selected_label, objects.brush_size = 9, 5
    objects.paint((0, 40, 40), 9)
    on_disk = _on_disk(widget, private_folders, "nuclei - SAM objects")
    np.testing.assert_array_equal(on_disk, objects.data)
    assert _on_disk(widget, private_folders, "other - SAM objects") is None
