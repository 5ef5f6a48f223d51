"""The widget and the layers the user handles around it: placing the image in the world, deleting or
renaming layers, several images, replaced labels, stacks that are channels (headless napari)."""

import numpy as np
import pytest
from conftest import preview_mask

from napari_sam._widget import CHECKPOINT_CHOICE


def _objects_of(viewer):
    return [layer for layer in viewer.layers if layer.name.startswith("SAM objects")]


def _loaded(viewer, widget, z):
    """Show slice z and compute the embeddings."""
    viewer.dims.set_current_step(0, z)
    widget.load(block=True)


def _committed(viewer, widget):
    """Embed slice 1 and commit the object clicked at (40, 40) there; the objects layer."""
    _loaded(viewer, widget, 1)
    widget.add_point((1, 40, 40))
    widget.commit()
    return widget.output_layer()


def _widget(viewer, checkpoint):
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=checkpoint)
    return widget


def test_the_sam_layers_and_new_objects_follow_a_pixel_size_set_after_loading(sam):
    viewer, widget = sam
    _loaded(viewer, widget, 2)
    widget.add_point((2, 70, 70))
    widget.commit()
    image = viewer.layers["nuclei"]
    image.scale, image.translate = (1.0, 0.5, 0.5), (0.0, 10.0, 20.0)  # the user sets the pixel size
    for layer in [*widget._prompt_layers.layers(), widget.output_layer()]:
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
    # A click at world (2, 30, 40) is pixel (2, 40, 40) of the image.
    widget.add_point((2, 30.0, 40.0))
    np.testing.assert_allclose(widget._prompt_layers.prompts(image, 2).points, [[40.0, 40.0]])
    widget.commit()
    assert int(widget.output_layer().data.max()) == 2


def test_a_deleted_prompt_layer_takes_its_prompts_with_it_and_comes_back_empty(sam, qtbot):
    viewer, widget = sam
    _loaded(viewer, widget, 2)
    widget.add_box((2, 5, 5), (2, 30, 30))
    boxed = preview_mask(widget, 2)
    assert boxed.any()
    viewer.layers.remove("SAM boxes")  # the user deletes the boxes to get rid of them
    qtbot.waitUntil(lambda: "SAM boxes" in viewer.layers, timeout=5_000)
    boxes = widget._prompt_layers.boxes
    assert boxes == viewer.layers["SAM boxes"] and len(boxes.data) == 0
    assert not preview_mask(widget, 2).any()  # the deleted box no longer shapes the preview
    assert "'SAM boxes' deleted" in widget._status.value
    widget._prompt_layers.points.add([2, 60, 60])  # as a click does, without the widget's help
    prompts = widget._prompt_layers.prompts(viewer.layers["nuclei"], 2)
    assert prompts.box is None and len(prompts.points) == 1  # the click alone prompts
    widget.commit()
    assert int(widget.output_layer().data.max()) == 1


def test_a_deleted_preview_comes_back_and_shows_the_next_mask(sam, qtbot):
    viewer, widget = sam
    _loaded(viewer, widget, 2)
    viewer.layers.remove("SAM preview")
    qtbot.waitUntil(lambda: "SAM preview" in viewer.layers, timeout=5_000)
    widget.add_point((2, 40, 40))
    assert preview_mask(widget, 2).any()
    assert viewer.layers["SAM preview"] == widget._prompt_layers.preview


def test_renamed_layers_stay_picked(make_napari_viewer, tiny_checkpoint, stack):
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="first")
    second = viewer.add_image(stack[:, ::-1].copy(), name="second")
    widget = _widget(viewer, tiny_checkpoint)
    widget._image.value = second
    _loaded(viewer, widget, 1)
    session = widget._session
    widget.add_point((1, 40, 40))
    widget.commit()
    objects = widget.output_layer()
    objects.name = "nuclei"  # a common first step after a few objects
    second.name = "field 2"
    assert widget._output.value is objects
    assert widget._image.value is second and widget._session is session  # embeddings kept
    widget.add_point((1, 60, 60))
    widget.commit()
    assert _objects_of(viewer) == [] and int(objects.data.max()) == 2  # no second objects layer


def test_each_image_gets_its_own_objects_layer_and_gets_it_back(make_napari_viewer, tiny_checkpoint, stack):
    viewer = make_napari_viewer()
    first = viewer.add_image(stack, name="A")
    second = viewer.add_image(stack[:, :80, :90].copy(), name="B")  # another size
    widget = _widget(viewer, tiny_checkpoint)
    widget._image.value = first
    _loaded(viewer, widget, 1)
    widget.add_point((1, 40, 40))
    widget.commit()
    objects_a = widget.output_layer()
    widget._image.value = second
    assert widget._output.value is None  # A's objects neither fit B nor belong to it
    widget.load(block=True)
    widget.add_point((1, 40, 40))
    widget.commit()
    objects_b = widget.output_layer()
    assert objects_b is not objects_a and objects_b.data.shape == second.data.shape
    assert int(objects_b.data.max()) == 1 and int(objects_a.data.max()) == 1
    widget._image.value = first
    assert widget._output.value is objects_a


def test_a_reopened_widget_commits_into_the_objects_layer_made_for_the_image(sam):
    viewer, widget = sam
    objects = _committed(viewer, widget)
    viewer.window.remove_dock_widget(widget.native)
    _, again = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    assert again._output.value is objects
    again.set_model(checkpoint=widget._checkpoint.value)
    again.load(block=True)
    again.add_point((1, 60, 60))
    again.commit()
    assert len(_objects_of(viewer)) == 1 and int(objects.data.max()) == 2


def test_undo_steps_back_in_the_objects_of_the_image_picked(sam, stack, messages):
    viewer, widget = sam
    viewer.add_image(stack.copy(), name="other")
    first = {}
    for name in ("nuclei", "other"):
        widget._image.value = viewer.layers[name]
        _loaded(viewer, widget, 1)
        widget.add_point((1, 40, 40))
        widget.commit()
        first[name] = widget.output_layer()
    assert first["nuclei"] is not first["other"]
    widget._image.value = viewer.layers["nuclei"]
    assert widget._output.value is first["nuclei"]
    widget.undo()
    assert not first["nuclei"].data.any() and first["other"].data.any()  # this image's object, not the last
    assert widget._status.value == "Removed object 1."
    widget.undo()
    assert messages["info"][-1] == f"SAM: nothing to undo in '{first['nuclei'].name}'."
    assert first["other"].data.any()
    widget._image.value = viewer.layers["other"]
    widget.undo()
    assert not first["other"].data.any()


def test_undo_of_an_object_erased_by_hand_says_nothing_was_left(sam):
    viewer, widget = sam
    objects = _committed(viewer, widget)
    objects.data[objects.data == 1] = 0  # erased by hand
    widget.undo()
    assert widget._status.value == "Nothing of object 1 was left to undo: all its pixels were edited since."
    assert not objects.data.any()


def test_undo_leaves_labels_alone_that_replaced_the_ones_it_wrote_to(sam, messages):
    viewer, widget = sam
    objects = _committed(viewer, widget)
    curated = np.zeros_like(objects.data)
    curated[1, 30:50, 30:50] = 1  # labels loaded into the same layer
    objects.data = curated
    widget.undo()
    np.testing.assert_array_equal(objects.data[1, 30:50, 30:50], 1)
    assert (objects.data == 1).sum() == 400
    assert any("replaced" in message for message in messages["warning"])
    assert "Nothing undone" in widget._status.value
    widget.undo()  # and the history of the old array is gone
    assert messages["info"][-1] == "SAM: nothing to undo in 'SAM objects'."


@pytest.mark.parametrize("channels", [2, 5])  # 3 and 4: napari opens them as RGB(A)
def test_channels_opened_as_a_stack_are_refused_with_how_to_open_them(
    make_napari_viewer, tiny_checkpoint, messages, channels
):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((48, 64, channels)), name="two dyes")
    widget = _widget(viewer, tiny_checkpoint)
    widget.load()
    assert widget._session is None and not widget._embedding.running
    assert any("channel_axis" in message and "(48, 64" in message for message in messages["error"])


def test_the_status_line_says_why_prompts_give_nothing_only_while_they_do(sam):
    viewer, widget = sam
    _loaded(viewer, widget, 2)
    ready = widget._status.value
    widget._prompt_layers.boxes.add_lines(np.array([[2, 10, 10], [2, 50, 50]]))
    assert widget._status.value.startswith("Lines are not prompts")
    widget.clear()
    assert widget._status.value == ready
    widget._prompt_layers.boxes.add_lines(np.array([[2, 10, 10], [2, 50, 50]]))
    widget.add_point((2, 40, 40))  # the line stays, but the click gives a mask
    assert widget._status.value == ready


def test_a_commit_that_cannot_be_made_says_why_in_the_status_line(sam, messages):
    viewer, widget = sam
    viewer.add_labels(np.zeros((4, 50, 50), np.uint16), name="other")
    widget._output.value = viewer.layers["other"]
    _loaded(viewer, widget, 2)
    widget.add_point((2, 40, 40))
    widget.commit()
    assert "has shape (4, 50, 50)" in messages["error"][-1] and "none for a new one" in messages["error"][-1]
    assert widget._status.value.startswith("The objects layer 'other' has shape")
    assert widget._model.value == CHECKPOINT_CHOICE


def test_layers_the_widget_makes_anew_for_another_image_are_not_taken_for_deleted_ones(
    make_napari_viewer, tiny_checkpoint, stack, qtbot
):
    viewer = make_napari_viewer()
    first = viewer.add_image(stack, name="A")
    second = viewer.add_image(stack[:, :80, :90].copy(), name="B")  # another size: a new preview and brush
    widget = _widget(viewer, tiny_checkpoint)
    widget._image.value = first
    widget.load(block=True)
    taken_for_deleted = []
    restore = widget._restore_prompt_layers
    widget._restore_prompt_layers = lambda: (taken_for_deleted.extend(widget._deleted_own), restore())
    widget._image.value = second
    widget.load(block=True)
    qtbot.wait(50)
    assert widget._prompt_layers.preview.data.shape == second.data.shape
    assert taken_for_deleted == []
    assert "deleted" not in widget._status.value


def test_picking_an_image_that_another_hides_says_which_and_what_to_do(sam):
    viewer, widget = sam
    nuclei = viewer.layers["nuclei"]
    cover = viewer.add_image(np.zeros((4, 96, 96), np.float32), name="cover")
    widget._image.value = cover
    assert "lies under" not in widget._status.value  # the image on top
    widget._image.value = nuclei
    status = widget._status.value
    assert "'nuclei' lies under 'cover', which hides it: hide 'cover' or move 'nuclei' above it" in status
    for harmless in ({"blending": "additive"}, {"visible": False}, {"opacity": 0.3}, {"translate": (0, 200, 0)}):
        widget._image.value = cover
        saved = {name: getattr(cover, name) for name in harmless}
        for name, value in harmless.items():
            setattr(cover, name, value)
        widget._image.value = nuclei
        assert "lies under" not in widget._status.value, harmless
        for name, value in saved.items():
            setattr(cover, name, value)
    assert viewer.layers.index(nuclei) < viewer.layers.index(cover)  # the user's order is left alone
