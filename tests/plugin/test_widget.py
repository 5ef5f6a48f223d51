"""The widget in a real napari viewer (headless under Xvfb), driven as a user or a script would."""

import numpy as np
import pytest
import torch
from conftest import preview_mask

from napari_sam._widget import REFOCUS_MS, SamWidget


def test_plugin_menu_opens_the_widget(sam):
    _, widget = sam
    assert isinstance(widget, SamWidget)
    assert widget._image.value.name == "nuclei"


def test_embeddings_cover_the_stack_and_follow_the_displayed_slice(sam):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    store = widget._session.store
    assert len(store) == 4
    widget._prompt_layers.points.add([2, 40, 40])
    assert torch.equal(widget._session.predictor.get_image_embedding(), store.get(2).features)
    viewer.dims.set_current_step(0, 1)
    widget._prompt_layers.points.add([1, 40, 40])
    assert torch.equal(widget._session.predictor.get_image_embedding(), store.get(1).features)


def test_click_previews_on_its_slice_only_and_negative_clicks_change_it(sam):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget._prompt_layers.points.add([2, 40, 40])
    first = preview_mask(widget, 2).copy()
    assert first.any()
    assert not any(preview_mask(widget, z).any() for z in (0, 1, 3))
    assert widget._candidate.value.startswith("candidate")
    widget.toggle_polarity()
    widget._prompt_layers.points.add([2, 60, 60])
    assert list(widget._prompt_layers.points.features["label"]) == [1, 0]
    assert widget._candidate.value.startswith("predicted IoU")  # two clicks: one mask


def test_clicks_after_a_commit_on_a_2d_image_and_selected_points_keep_their_colour(make_napari_viewer, tiny_checkpoint):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).random((96, 96)).astype(np.float32), name="plane")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    widget.load(block=True)
    for y, x in ((30, 30), (60, 60)):  # the second click came after the first was committed and cleared
        widget.add_point((y, x))
        assert len(widget._prompt_layers.points.data) == 1
        widget.commit()
    assert len(np.unique(widget.output_layer().data)) == 3
    widget.add_point((20, 70))
    positive = widget._prompt_layers.points.face_color[0].copy()
    widget._prompt_layers.points.selected_data = {0}
    widget.toggle_polarity()  # the next clicks are negative; the selected positive one stays as it was
    np.testing.assert_array_equal(widget._prompt_layers.points.face_color[0], positive)
    assert list(widget._prompt_layers.points.features["label"]) == [1]
    widget._prompt_layers.points.add([70, 20])  # a click in the viewer
    assert list(widget._prompt_layers.points.features["label"]) == [1, 0]
    assert not np.array_equal(widget._prompt_layers.points.face_color[1], positive)


def test_box_commit_undo_keep_other_objects(sam):
    viewer, widget = sam
    existing = np.zeros((4, 96, 96), np.uint32)
    existing[2, 10:30, 10:30] = 7
    objects = viewer.add_labels(existing.copy(), name="mine")
    widget._output.reset_choices()
    widget._output.value = objects
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget._prompt_layers.boxes.add_rectangles(np.array([[2, 5, 5], [2, 5, 80], [2, 80, 80], [2, 80, 5]]))
    preview = preview_mask(widget, 2).copy()
    assert preview.any()
    widget.commit()
    new = objects.data == 8
    assert new.any() and not new[[0, 1, 3]].any()
    assert (objects.data == 7).sum() == (existing == 7).sum()  # the other object is untouched
    np.testing.assert_array_equal(new[2], preview & (existing[2] == 0))
    assert len(widget._prompt_layers.boxes.data) == 0 and not preview_mask(widget, 2).any()
    widget.undo()
    np.testing.assert_array_equal(objects.data, existing)


def test_painting_with_the_brush_prompts_with_its_box_and_mask(sam):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    brush = widget._prompt_layers.brush
    brush.selected_label, brush.brush_size = 1, 9
    with brush.block_history():  # one stroke: napari reports it once, when the mouse is released
        for y, x in ((40, 30), (40, 36), (42, 42)):
            brush.paint((2, y, x), 1)
    painted = np.asarray(brush.data[2]) > 0
    ys, xs = np.nonzero(painted)
    predictor = widget._session.predictor
    expected, _, _ = predictor.predict(
        box=np.array([xs.min(), ys.min(), xs.max(), ys.max()]),
        mask_input=predictor.logits_from_mask(painted),
        multimask_output=False,
    )
    np.testing.assert_array_equal(preview_mask(widget, 2), expected[0])
    assert not any(preview_mask(widget, z).any() for z in (0, 1, 3))
    assert widget._candidate.value.startswith("predicted IoU")  # one mask, nothing to cycle
    widget._prompt_layers.boxes.add_rectangles(np.array([[2, 10, 10], [2, 10, 60], [2, 60, 60], [2, 60, 10]]))
    expected, _, _ = predictor.predict(  # a drawn box replaces the painting's box
        box=np.array([10, 10, 60, 60]), mask_input=predictor.logits_from_mask(painted), multimask_output=False
    )
    np.testing.assert_array_equal(preview_mask(widget, 2), expected[0])
    widget.commit()
    assert not brush.data.any() and len(widget._prompt_layers.boxes.data) == 0
    assert (widget.output_layer().data[2] == 1).sum() == expected[0].sum()


def test_an_ellipse_or_polygon_prompts_with_its_bounding_box_and_a_line_is_pointed_out(sam):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    boxes = widget._prompt_layers.boxes
    boxes.add_lines(np.array([[2, 10, 10], [2, 50, 50]]))
    assert not preview_mask(widget, 2).any()
    assert widget._status.value == "Lines are not prompts: draw a rectangle around the object."
    boxes.add_ellipses(np.array([[2, 30, 20], [2, 30, 70], [2, 60, 70], [2, 60, 20]]))  # y 30-60, x 20-70
    expected, _, _ = widget._session.predictor.predict(box=np.array([20, 30, 70, 60]), multimask_output=False)
    assert expected[0].any()
    np.testing.assert_array_equal(preview_mask(widget, 2), expected[0])
    boxes.data = []
    boxes.add_polygons(np.array([[2, 30, 45], [2, 45, 70], [2, 60, 40], [2, 40, 20]]))  # a lasso around it
    np.testing.assert_array_equal(preview_mask(widget, 2), expected[0])


def test_a_scripted_painting_must_match_the_slices(sam):
    viewer, widget = sam
    widget.load(block=True)
    mask = np.zeros((96, 96), bool)
    mask[30:50, 30:50] = True
    widget.paint(mask, z=1)
    assert (np.asarray(widget._prompt_layers.brush.data[1]) > 0).sum() == mask.sum()
    with np.testing.assert_raises_regex(ValueError, "slices are"):
        widget.paint(mask[:50], z=1)


def test_next_candidate_cycles_the_three_masks(sam):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 0)
    line = widget._candidate.native
    assert line.isHidden()  # no room taken while there is nothing to say
    widget.load(block=True)
    widget._prompt_layers.points.add([0, 50, 50])
    assert widget._candidate.value.startswith("candidate 1/3") and not line.isHidden()
    seen = set()
    for _ in range(3):
        seen.add(widget._candidates.index)
        widget.next_candidate()
    assert seen == {0, 1, 2}
    widget.clear()
    assert widget._candidate.value == "" and line.isHidden()


def test_cancel_stops_the_worker_and_keeps_what_was_computed(make_napari_viewer, tiny_checkpoint):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((40, 64, 64)).astype(np.float32), name="big")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget._model.value = "checkpoint file…"
    widget._checkpoint.value = str(tiny_checkpoint)
    widget.load()
    from qtpy.QtCore import QCoreApplication

    while widget._session is None or len(widget._session.store) < 2:
        QCoreApplication.processEvents()
    widget.cancel()
    assert not widget._embedding.running
    done = len(widget._session.store)
    assert 2 <= done < 40
    assert "Stopped" in widget._status.value


def test_4d_image_is_refused_with_a_message(make_napari_viewer, messages):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 3, 32, 32), np.uint8), name="timelapse")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    names = [layer.name for layer in viewer.layers]
    widget.load()
    assert messages["error"] and "4 dimensions" in messages["error"][0]
    assert [layer.name for layer in viewer.layers] == names


def test_broken_checkpoint_is_reported_and_labels_stay(sam, tmp_path, messages):
    viewer, widget = sam
    objects = viewer.add_labels(np.full((4, 96, 96), 3, np.uint32), name="mine")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    widget._checkpoint.value = str(broken)
    widget.load(block=True)
    assert messages["error"] and "broken.pth" in messages["error"][0]
    assert (objects.data == 3).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_is_reported_and_labels_stay(sam, messages):
    viewer, widget = sam
    objects = viewer.add_labels(np.full((4, 96, 96), 3, np.uint32), name="mine")
    widget._device.value = "cuda"
    widget.load(block=True)
    assert messages["error"] and "No NVIDIA GPU" in messages["error"][0]
    assert widget._session is None
    assert (objects.data == 3).all()


def test_an_objects_layer_of_another_shape_is_refused_and_kept(sam, messages):
    viewer, widget = sam
    other = viewer.add_labels(np.full((4, 50, 50), 5, np.uint32), name="other image's labels")
    widget._output.reset_choices()
    widget._output.value = other
    viewer.dims.set_current_step(0, 1)
    widget.load(block=True)
    widget._prompt_layers.points.add([1, 40, 40])
    preview = preview_mask(widget, 1).copy()
    widget.commit()
    assert messages["error"] and "shape (4, 50, 50)" in messages["error"][0]
    assert (other.data == 5).all()
    np.testing.assert_array_equal(preview_mask(widget, 1), preview)  # the prompt is still there to commit
    assert len(widget._prompt_layers.points.data) == 1


def test_click_outside_the_image_warns_and_keeps_the_preview(sam, messages):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 0)
    widget.load(block=True)
    widget._prompt_layers.points.add([0, 50, 50])
    before = preview_mask(widget, 0).copy()
    widget._prompt_layers.points.add([0, 50, 500])
    assert messages["warning"] and "outside" in messages["warning"][0]
    np.testing.assert_array_equal(preview_mask(widget, 0), before)


def test_commit_without_a_preview_says_what_to_do(sam, messages):
    _, widget = sam
    widget.load(block=True)
    widget.commit()
    assert messages["warning"] and "nothing to commit" in messages["warning"][0]


def test_moving_to_a_slice_without_embedding_computes_it_next(
    make_napari_viewer, tiny_checkpoint, monkeypatch
):
    import time

    from qtpy.QtCore import QCoreApplication

    from samcore import Predictor

    embed_rgb_batch = Predictor.embed_rgb_batch

    def slowed(self, *args, **kwargs):  # the tiny model would embed all 30 slices before the slider rests
        time.sleep(0.03)
        return embed_rgb_batch(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "embed_rgb_batch", slowed)
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).random((30, 64, 64)).astype(np.float32), name="stack")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget._model.value = "checkpoint file…"
    widget._checkpoint.value = str(tiny_checkpoint)
    viewer.dims.set_current_step(0, 0)
    widget.load()
    while widget._session is None or len(widget._session.store) < 1:
        QCoreApplication.processEvents()
    viewer.dims.set_current_step(0, 29)
    while 29 not in widget._session.store:
        QCoreApplication.processEvents()
    assert len(widget._session.store) < 25  # the far slice came before the ones in between
    widget.cancel()


def test_changing_the_model_drops_the_embeddings(sam, tmp_path):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 0)
    widget.load(block=True)
    widget._prompt_layers.points.add([0, 50, 50])
    assert preview_mask(widget, 0).any()
    widget._model.value = "vit_b"
    assert widget._session is None and not preview_mask(widget, 0).any()


def test_disk_cache_is_reused_when_the_stack_is_opened_again(sam, tmp_path, monkeypatch):
    from samcore.predictor import Predictor

    viewer, widget = sam
    widget._cache_dir.value = str(tmp_path)
    widget.load(block=True)
    first = widget._session.store.get(1).features
    widget._forget("reopen")

    calls = []
    original = Predictor.embed_rgb_batch  # every embedding goes through it

    def counted(self, images, cancel=None, crop=False):
        calls.extend([1] * len(images))
        return original(self, images, cancel, crop)

    monkeypatch.setattr(Predictor, "embed_rgb_batch", counted)
    widget.load(block=True)
    assert calls == []  # every slice came from the zarr folder
    assert len(widget._session.store) == 4
    torch.testing.assert_close(widget._session.store.get(1).features, first)
    assert len(list(tmp_path.glob("*.zarr"))) == 1


def test_switching_from_a_stack_to_a_2d_image_gives_2d_prompts(sam):
    viewer, widget = sam
    widget.load(block=True)
    flat = viewer.add_image(np.random.default_rng(2).random((64, 80)).astype(np.float32), name="flat", scale=(0.5, 0.5))
    widget._image.value = flat
    widget.load(block=True)
    assert widget._prompt_layers.points.ndim == 2 and tuple(widget._prompt_layers.points.scale) == (0.5, 0.5)
    widget._prompt_layers.points.add([10, 20])  # world coordinates: pixel (20, 40)
    assert (np.asarray(widget._prompt_layers.preview.data) > 0).any()
    assert widget._prompt_layers.preview.data.shape == (64, 80)


def test_the_refine_box_follows_the_model_and_decides_the_preview(sam):
    viewer, widget = sam
    viewer.dims.set_current_step(0, 1)
    widget.load(block=True)
    assert widget._refine.value is False  # test weights: one pass, as segment-anything
    widget._prompt_layers.points.add([1, 40, 40])
    one_pass = [widget._candidates.mask(i).copy() for i in range(3)]
    predictor = widget._session.predictor
    click = {"point_coords": np.array([[40.0, 40.0]]), "point_labels": np.array([1])}
    first, scores, low_res = predictor.predict(**click, refine=False)
    widget._refine.value = True  # the preview is decoded again at once
    # A click's candidates are refined as they are shown: the best one first, through the single-mask
    # output; the others on N, each through its own output.
    best = int(np.argmax(scores))
    assert widget._candidates.index == best
    shown = set()
    for _ in range(3):
        shown.add(widget._candidates.index)
        for i in range(3):
            if i in shown:
                own = i != best
                again, _, _ = predictor.predict(**click, mask_input=low_res[i][None], multimask_output=own)
                np.testing.assert_array_equal(widget._candidates.mask(i), again[i if own else 0])
            else:
                np.testing.assert_array_equal(widget._candidates.mask(i), first[i])
        widget.next_candidate()
    assert shown == {0, 1, 2}
    assert any(not np.array_equal(widget._candidates.mask(i), one_pass[i]) for i in range(3))
    widget._prompt_layers.points.add([1, 60, 20])  # two clicks: one mask, refined in the same call
    two = {"point_coords": np.array([[40.0, 40.0], [20.0, 60.0]]), "point_labels": np.array([1, 1])}
    expected, _, _ = predictor.predict(**two, multimask_output=False, refine=True)
    np.testing.assert_array_equal(widget._candidates.mask(0), expected[0])
    widget.set_model("default")
    widget.load(block=True)
    assert widget._refine.value is True  # the bundled model's own choice


def slowly_embedded_stack(viewer_factory, checkpoint, monkeypatch, slices: int, seconds: float):
    """A viewer with a random stack and the widget, whose encoder takes `seconds` a slice; the widget
    and the list of slices embedded so far, in order."""
    import time

    from samcore.embeddings import EmbeddingStore

    viewer = viewer_factory()
    viewer.add_image(np.random.default_rng(3).integers(0, 255, (slices, 64, 64), dtype=np.uint8), name="long")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=checkpoint)
    order, put = [], EmbeddingStore.put

    def slow_put(store, z, *args, **kwargs):
        time.sleep(seconds)
        order.append(z)
        return put(store, z, *args, **kwargs)

    monkeypatch.setattr(EmbeddingStore, "put", slow_put)
    return viewer, widget, order


def test_scrolling_while_embeddings_run_restarts_them_once_at_the_slice_where_the_slider_rests(
    make_napari_viewer, tiny_checkpoint, qtbot, monkeypatch
):
    # A slow encoder: 150 ms a slice, under 2 while the slider rests.
    viewer, widget, order = slowly_embedded_stack(make_napari_viewer, tiny_checkpoint, monkeypatch, 12, 0.15)
    starts = []
    start = widget._embedding.start
    monkeypatch.setattr(widget._embedding, "start", lambda *args: (starts.append(1), start(*args)))
    widget.load()  # from the displayed (middle) slice outwards
    qtbot.waitUntil(lambda: len(order) >= 2, timeout=10_000)
    for z in (3, 5, 7, 9, 10):  # a scroll: no restart at each step
        viewer.dims.set_current_step(0, z)
    assert len(starts) == 1
    qtbot.waitUntil(lambda: 10 in order, timeout=10_000)
    assert len(starts) == 2  # once the slider rested
    widget.wait()
    assert sorted(order) == list(range(12))
    assert order.index(10) < order.index(9)  # from the middle outwards, 9 would have come first


def test_a_slice_change_redraws_the_preview_only_when_it_held_a_mask(sam, monkeypatch):
    viewer, widget = sam
    widget.load(block=True)
    preview = widget._prompt_layers.preview
    redraws = []
    refresh = preview.refresh
    monkeypatch.setattr(preview, "refresh", lambda *args, **kwargs: (redraws.append(1), refresh(*args, **kwargs)))
    for z in (1, 2, 3):
        viewer.dims.set_current_step(0, z)
    assert not redraws  # nothing drawn, nothing to clear: napari re-slices the layer anyway
    widget.add_point((3, 40, 40))
    assert preview_mask(widget, 3).any()
    drawn = len(redraws)
    viewer.dims.set_current_step(0, 2)  # the click's mask goes with its slice
    assert not np.asarray(preview.data).any() and len(redraws) == drawn + 1
    viewer.dims.set_current_step(0, 1)
    assert len(redraws) == drawn + 1


def test_the_slice_where_the_slider_rests_is_made_ready_for_its_first_click(sam, qtbot, monkeypatch):
    import samcore.predictor as predictor_module

    viewer, widget = sam
    widget.load(block=True)
    qtbot.wait(2 * REFOCUS_MS)  # the timer started by the displayed slice's embedding, if pending
    predictor = widget._session.predictor
    prepared, contexts = [], []
    prepare = predictor.prepare_decoding

    def recorded() -> None:
        prepared.append(widget._current_z(widget._session.layer))
        prepare()

    monkeypatch.setattr(predictor, "prepare_decoding", recorded)

    class CountedContext(predictor_module.ImageContext):
        def __init__(self, *args, **kwargs) -> None:
            contexts.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "ImageContext", CountedContext)
    for z in (1, 2, 3):  # a scroll
        viewer.dims.set_current_step(0, z)
    qtbot.waitUntil(lambda: bool(prepared), timeout=5_000)
    qtbot.wait(2 * REFOCUS_MS)
    assert prepared == [3]  # once, where the slider rested
    assert torch.equal(predictor.get_image_embedding(), widget._session.store.get(3).features)
    made = len(contexts)
    assert made == predictor.views
    widget.add_point((3, 40, 40))
    assert preview_mask(widget, 3).any()
    assert len(contexts) == made  # the click decoded with the contexts made before it


def test_a_2d_image_is_made_ready_to_decode_when_its_embedding_arrives(
    make_napari_viewer, tiny_checkpoint, qtbot
):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).random((96, 96)).astype(np.float32), name="plane")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget.set_model(checkpoint=tiny_checkpoint)
    widget.load(block=True)
    predictor = widget._session.predictor
    # No click yet, and the contexts are made once the timer started by the embedding has run.
    qtbot.waitUntil(lambda: predictor._context is not None, timeout=5_000)
    assert not len(widget._prompt_layers.points.data)


def test_decoding_is_made_ready_only_once_the_background_work_is_done(
    make_napari_viewer, tiny_checkpoint, qtbot, monkeypatch
):
    # A slow encoder, so that the job outlasts the slider's rest.
    viewer, widget, _ = slowly_embedded_stack(make_napari_viewer, tiny_checkpoint, monkeypatch, 8, 0.2)
    widget.load()
    qtbot.waitUntil(lambda: widget._session is not None and len(widget._session.store) >= 2, timeout=10_000)
    shown = widget._current_z(widget._session.layer)
    viewer.dims.set_current_step(0, next(z for z in range(8) if z in widget._session.store and z != shown))
    qtbot.wait(2 * REFOCUS_MS)
    assert widget._embedding.running
    predictor = widget._session.predictor
    assert predictor._context is None  # not made while the worker has the cores
    qtbot.waitUntil(lambda: not widget._embedding.running, timeout=10_000)
    qtbot.waitUntil(lambda: predictor._context is not None, timeout=5_000)
