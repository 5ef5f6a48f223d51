"""Predictor behaviour on microscopy input: dtypes, sizes, embeddings reused, bad prompts."""

import numpy as np
import pytest
import torch

from samcore import ImageEmbedding, Predictor, build_sam
from samcore.embeddings import model_key


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return Predictor(build_sam("vit_test"), precision="fp32")


def test_uint16_grayscale_is_embedded_like_its_rgb_conversion(predictor):
    from samcore.preprocess import to_rgb_uint8

    image = np.random.default_rng(0).integers(0, 236, size=(120, 90)).astype(np.uint16)
    direct = predictor.embed(image)
    via_rgb = predictor.embed(to_rgb_uint8(image))
    torch.testing.assert_close(direct.features, via_rgb.features)
    assert direct.original_size == (120, 90) and direct.input_size == (256, 192)


@pytest.mark.parametrize("shape", [(7, 5), (40, 300), (1500, 2100), (64, 64, 2), (64, 64, 4)])
def test_any_size_and_channel_count_gives_masks_of_the_image_shape(predictor, shape):
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    predictor.set_image(image)
    height, width = shape[:2]
    masks, scores, low_res = predictor.predict(point_coords=np.array([[width / 2, height / 2]]), point_labels=np.array([1]))
    assert masks.shape == (3, height, width) and masks.dtype == bool
    assert scores.shape == (3,) and low_res.shape == (3, 64, 64)


def test_nan_and_inf_do_not_poison_the_embedding(predictor):
    image = np.random.default_rng(2).random((50, 60))
    image[10:20, 10:20] = np.nan
    image[0, 0] = np.inf
    assert torch.isfinite(predictor.embed(image).features).all()


def test_precomputed_embedding_gives_the_same_masks(predictor):
    image = np.random.default_rng(3).integers(0, 255, size=(80, 100, 3), dtype=np.uint8)
    prompt = {"box": np.array([10, 10, 60, 50])}
    predictor.set_image(image)
    expected = predictor.predict(**prompt)[0]
    stored = ImageEmbedding(predictor.get_image_embedding().clone(), predictor.original_size, predictor.input_size)
    predictor.reset_image()
    predictor.set_embedding(stored)
    np.testing.assert_array_equal(predictor.predict(**prompt)[0], expected)


def test_the_features_alone_are_refused_with_a_pointer_to_embed(predictor):
    predictor.set_image(np.zeros((40, 50), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"predictor.embed\(image\)"):
        predictor.set_embedding(predictor.get_image_embedding())


def test_embedding_from_another_model_is_refused(predictor):
    foreign = ImageEmbedding(torch.zeros(1, 256, 64, 64), (512, 512), (1024, 1024))
    with pytest.raises(ValueError, match="another model"):
        predictor.set_embedding(foreign)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"point_coords": np.array([[500.0, 5.0]]), "point_labels": np.array([1])}, "outside"),
        ({"point_coords": np.array([[5.0, 5.0]])}, "point_labels"),
        ({"point_coords": np.array([5.0, 5.0]), "point_labels": np.array([1])}, r"\(N, 2\)"),
        ({"point_coords": np.array([[5.0, 5.0]]), "point_labels": np.array([1, 0])}, "one label per point"),
        ({"point_coords": np.array([[5.0, 5.0]]), "point_labels": np.array([7])}, "Point labels are 1"),
        ({"point_coords": np.array([[5.0, 5.0]]), "point_labels": np.array([0.5])}, "Point labels are 1"),
        ({"point_coords": np.array([[5.0, 5.0]]), "point_labels": np.array(["on"])}, "Point labels are 1"),
        ({"box": np.array([40, 40, 10, 10])}, "inverted"),
        ({"box": np.array([400, 400, 500, 500])}, "outside"),
        ({"box": np.array([1, 2, 3])}, "4 finite numbers"),
        ({"mask_input": np.zeros((1, 10, 10))}, "low-resolution logits"),
    ],
)
def test_bad_prompts_raise_clear_errors(predictor, prompt, message):
    predictor.set_image(np.zeros((60, 80), dtype=np.uint8))
    with pytest.raises(ValueError, match=message):
        predictor.predict(**prompt)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_mask_input_that_is_not_finite_is_refused(predictor, bad):
    predictor.set_image(np.zeros((60, 80), dtype=np.uint8))
    logits = np.zeros((1, *predictor.model.prompt_encoder.mask_input_size), np.float32)
    predictor.predict(box=np.array([1, 1, 9, 9]), mask_input=logits)  # finite logits are taken
    logits[0, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        predictor.predict(box=np.array([1, 1, 9, 9]), mask_input=logits)


def test_predict_before_an_image_is_set_says_what_to_do():
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(build_sam("vit_test")).predict(box=np.array([0, 0, 5, 5]))


@pytest.mark.parametrize("shape", [(4, 64, 64, 3), (0, 10), (10, 64, 64)])
def test_bad_image_shapes_are_refused(predictor, shape):
    with pytest.raises(ValueError):
        predictor.set_image(np.zeros(shape, dtype=np.uint8))


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        Predictor(build_sam("vit_test"), precision="int4")


def test_bf16_path_runs_and_stays_close_to_fp32(monkeypatch):
    from samcore import precision

    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 1.0)  # runs bf16 on any CPU, if slowly
    torch.manual_seed(0)
    model = build_sam("vit_test")
    image = np.random.default_rng(4).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    fp32 = Predictor(model, precision="fp32").embed(image).features
    bf16 = Predictor(model, precision="bf16").embed(image).features
    assert bf16.dtype == torch.float32
    assert ((bf16 - fp32).norm() / fp32.norm()) < 0.05


def test_auto_precision_follows_the_measured_bf16_speed_of_the_cpu(monkeypatch):
    from samcore import precision

    speedup = precision.cpu_bf16_speedup()
    assert np.isfinite(speedup) and speedup > 0
    model = build_sam("vit_test")
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.6)  # bf16 slower, as on some Xeons
    assert Predictor(model).precision == "fp32"
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 2.4)  # bf16 faster, as on Zen 4
    assert Predictor(model).precision == "bf16"
    assert Predictor(model, precision="fp32").precision == "fp32"  # an explicit choice is kept
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.6)
    assert Predictor(model, precision="bf16").precision == "bf16"  # slower, but not emulated: as asked


def test_bf16_on_a_cpu_without_bf16_instructions_warns_and_uses_fp32(monkeypatch):
    from samcore import precision

    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.0125)  # as measured on an AVX2-only EPYC
    with pytest.warns(UserWarning, match="bf16.*80 times slower than fp32.*using fp32") as caught:
        predictor = Predictor(build_sam("vit_test"), precision="bf16")
    assert predictor.precision == "fp32"
    assert caught[0].filename == __file__  # points at the user's line, not the library's


@pytest.mark.parametrize("bf16_slowdown, large_timed", [(40.0, False), (0.5, True), (3.0, True)])
def test_the_cpu_speed_probe_skips_the_large_product_where_bf16_is_emulated(
    monkeypatch, bf16_slowdown, large_timed
):
    from samcore import precision

    timed_rows = []

    def timing(product, a, b, repeats):  # fp32 takes 1 unit per row, bf16 `bf16_slowdown` units
        timed_rows.append(len(a))
        return len(a) * (bf16_slowdown if a.dtype == torch.bfloat16 else 1.0)

    monkeypatch.setattr(precision, "best_time", timing)
    precision.cpu_bf16_speedup.cache_clear()
    try:
        speedup = precision.cpu_bf16_speedup()
    finally:
        precision.cpu_bf16_speedup.cache_clear()  # other tests measure without the stand-in
    assert speedup == pytest.approx(1 / bf16_slowdown)
    assert (precision.ENCODER_PRODUCT[0] in timed_rows) == large_timed
    assert timed_rows[:2] == [precision.PROBE_PRODUCT[0]] * 2  # the probe comes first


def test_a_painted_mask_becomes_a_mask_input_of_this_image(predictor):
    image = np.zeros((60, 100), np.uint16)  # not square: the mask is padded like the image
    predictor.set_image(image)
    mask = np.zeros((60, 100), bool)
    mask[20:40, 50:80] = True
    logits = predictor.logits_from_mask(mask)
    side = predictor.model.prompt_encoder.mask_input_size
    assert logits.shape == (1, *side)
    scale = side[1] / 100  # the longest side fills the model input
    assert logits[0, int(30 * scale), int(65 * scale)] > 5  # inside
    assert logits[0, int(5 * scale), int(10 * scale)] < -5  # outside
    assert (logits[0, int(61 * scale) :] < -5).all()  # the padding below the image
    masks, _, _ = predictor.predict(box=np.array([50, 20, 79, 39]), mask_input=logits, multimask_output=False)
    assert masks.shape == (1, 60, 100)
    with pytest.raises(ValueError, match="shape"):
        predictor.logits_from_mask(mask[:50])


@pytest.mark.parametrize("multimask", [False, True])
def test_refining_decodes_each_candidate_again_with_its_own_logits(predictor, multimask):
    image = np.random.default_rng(5).random((90, 120)).astype(np.float32)
    predictor.set_image(image)
    prompt = {"point_coords": np.array([[60.0, 40.0], [20.0, 70.0]]), "point_labels": np.array([1, 0])}
    first, _, first_low = predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
    masks, scores, low_res = predictor.predict(
        **prompt, multimask_output=multimask, return_logits=True, refine=True
    )
    assert masks.shape == first.shape and low_res.shape == first_low.shape and scores.shape == (len(first),)
    for candidate in range(len(first)):
        again, again_score, again_low = predictor.predict(
            **prompt, mask_input=first_low[candidate][None], multimask_output=False, return_logits=True
        )
        np.testing.assert_allclose(masks[candidate], again[0], atol=1e-4)
        np.testing.assert_allclose(low_res[candidate], again_low[0], atol=1e-4)
        assert scores[candidate] == pytest.approx(again_score[0], abs=1e-5)
    assert not np.allclose(masks, first, atol=1e-3)  # the second pass changed something


@pytest.mark.parametrize(("option", "registered"), [("refine", "refine_masks"), ("zoom", "zoom_boxes")])
def test_refining_and_zoom_follow_the_model_unless_the_caller_chooses(option, registered):
    model = build_sam("vit_test")
    assert not getattr(Predictor(model, precision="fp32"), option)  # as segment-anything
    setattr(model, registered, True)  # what load_model sets for weights registered with it
    assert getattr(Predictor(model, precision="fp32"), option)
    assert not getattr(Predictor(model, precision="fp32", **{option: False}), option)


@pytest.mark.parametrize("refine", [False, True])
def test_logits_then_masks_of_one_candidate_are_those_of_predict(refine):
    torch.manual_seed(2)
    model_predictor = Predictor(build_sam("vit_test"), precision="fp32", views=2)
    model_predictor.set_image(np.random.default_rng(7).integers(0, 255, (300, 437, 3), dtype=np.uint8))
    prompt = {"point_coords": np.array([[120.0, 80.0]]), "point_labels": np.array([1]), "refine": refine}
    masks, scores, low_res = model_predictor.predict(**prompt)
    got_scores, got_low_res = model_predictor.predict_logits(**prompt)
    np.testing.assert_array_equal(got_scores, scores)
    np.testing.assert_array_equal(got_low_res, low_res)
    np.testing.assert_array_equal(model_predictor.masks_from_logits(got_low_res[1:2])[0], masks[1])
    logits, _, _ = model_predictor.predict(**prompt, return_logits=True)
    np.testing.assert_array_equal(model_predictor.masks_from_logits(got_low_res, return_logits=True), logits)


@pytest.mark.parametrize("shape", [(600, 2), (2, 600)])
def test_a_strip_one_pixel_across_at_the_input_size_embeds_in_mirrored_views(shape):
    torch.manual_seed(1)
    predictor = Predictor(build_sam("vit_test"), precision="fp32", views=4)
    image = np.random.default_rng(2).integers(0, 255, shape, dtype=np.uint8)
    predictor.set_image(image)  # resized to 256 x 1 (or 1 x 256): mirrored, an axis of length 1
    assert predictor.input_size in ((256, 1), (1, 256))
    masks, _, _ = predictor.predict(point_coords=np.array([[0.0, 0.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, *shape)


def test_segment_anythings_batched_boxes_run_as_written_for_it(predictor):
    image = np.random.default_rng(3).integers(0, 255, (120, 90, 3), dtype=np.uint8)
    predictor.set_image(image)
    boxes = torch.tensor([[10.0, 20.0, 60.0, 70.0], [30.0, 5.0, 85.0, 50.0]])
    transformed = predictor.transform.apply_boxes_torch(boxes, image.shape[:2])
    masks, scores, low_res = predictor.predict_torch(None, None, boxes=transformed, multimask_output=False)
    assert masks.shape == (2, 1, 120, 90) and scores.shape == (2, 1) and low_res.shape == (2, 1, 64, 64)
    for row, box in enumerate(boxes.numpy()):
        one, _, _ = predictor.predict(box=box, multimask_output=False)
        assert (masks[row, 0].numpy() != one[0]).sum() <= 2  # batched and alone: rounding apart at most
    points = predictor.transform.apply_coords(np.array([[45.0, 60.0]]), image.shape[:2])
    np.testing.assert_allclose(points, predictor.transform_coords(np.array([[45.0, 60.0]])))
    np.testing.assert_allclose(points, [[45.0 * 192 / 90, 60.0 * 256 / 120]])
    assert predictor.features is predictor.get_image_embedding()


@pytest.mark.parametrize("views", [1, 2])
def test_an_image_resized_by_the_caller_embeds_as_set_image_does(views):
    torch.manual_seed(1)
    predictor = Predictor(build_sam("vit_test"), precision="fp32", views=views)
    image = np.random.default_rng(4).integers(0, 255, (120, 90, 3), dtype=np.uint8)
    predictor.set_image(image)
    expected = predictor.get_image_embedding().clone()
    predictor.reset_image()
    resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None]
    assert resized.shape == (1, 3, 256, 192)
    predictor.set_torch_image(resized, image.shape[:2])
    # The same pixels in the same memory layout (whatever the caller's strides): the same embedding.
    assert torch.equal(predictor.get_image_embedding(), expected)
    assert predictor.original_size == (120, 90) and predictor.input_size == (256, 192)
    masks, _, _ = predictor.predict(box=np.array([10, 20, 60, 70]))
    assert masks.shape == (3, 120, 90)


@pytest.mark.parametrize(
    ("tensor", "size", "message"),
    [
        (np.zeros((1, 3, 256, 192)), (120, 90), "takes a torch.Tensor"),
        (torch.zeros(3, 256, 192), (120, 90), r"\(1, 3, h, w\)"),
        (torch.zeros(2, 3, 256, 192), (120, 90), r"\(1, 3, h, w\)"),
        (torch.zeros(1, 3, 256, 256), (120, 90), "not a 120x90 image resized for this model"),
        (torch.zeros(1, 3, 512, 384), (120, 90), "not a 120x90 image resized for this model"),
        (torch.zeros(1, 3, 256, 192), 120, r"must be the image's \(H, W\)"),
    ],
)
def test_set_torch_image_refuses_what_is_not_a_resized_image(predictor, tensor, size, message):
    predictor.set_image(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises((TypeError, ValueError), match=message):
        predictor.set_torch_image(tensor, size)
    assert predictor.original_size == (32, 32)  # the image set before is kept


def test_views_average_the_masks_of_the_mirror_images():
    torch.manual_seed(1)
    model = build_sam("vit_test")
    mirrored = Predictor(model, precision="fp32", views=4)
    single = Predictor(model, precision="fp32", views=1)
    # Both sides are the model's input (no resizing, no padding), so the masks are scaled up as they
    # are mirrored and the average can be rebuilt from single views of the mirrored images. (The
    # padding of another shape takes part in segment-anything's scaling at the image's far edges.)
    image = np.random.default_rng(6).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    height, width = image.shape[:2]
    mirrored.set_image(image)
    assert mirrored.get_image_embedding().shape[0] == 4
    point = np.array([[70.0, 90.0]])
    box = np.array([40.0, 60.0, 120.0, 150.0])
    got_point = mirrored.predict(point_coords=point, point_labels=np.array([1]), return_logits=True)
    got_box = mirrored.predict(box=box, multimask_output=False, return_logits=True)
    sums = [np.zeros_like(got_point[0]), np.zeros(3), np.zeros_like(got_box[0]), np.zeros(1)]
    for flip_x, flip_y in ((False, False), (True, False), (False, True), (True, True)):
        view = image[:: -1 if flip_y else 1, :: -1 if flip_x else 1]
        x_of = (lambda x: width - 1 - x) if flip_x else (lambda x: x)
        y_of = (lambda y: height - 1 - y) if flip_y else (lambda y: y)
        single.set_image(np.ascontiguousarray(view))
        back = (slice(None), slice(None, None, -1 if flip_y else 1), slice(None, None, -1 if flip_x else 1))
        masks, scores, _ = single.predict(
            point_coords=np.array([[x_of(point[0, 0]), y_of(point[0, 1])]]), point_labels=np.array([1]),
            return_logits=True,
        )
        sums[0] += masks[back]
        sums[1] += scores
        xs, ys = sorted([x_of(box[0]), x_of(box[2])]), sorted([y_of(box[1]), y_of(box[3])])
        masks, scores, _ = single.predict(
            box=np.array([xs[0], ys[0], xs[1], ys[1]]), multimask_output=False, return_logits=True
        )
        sums[2] += masks[back]
        sums[3] += scores
    np.testing.assert_allclose(got_point[0], sums[0] / 4, atol=1e-4)
    np.testing.assert_allclose(got_point[1], sums[1] / 4, atol=1e-5)
    np.testing.assert_allclose(got_box[0], sums[2] / 4, atol=1e-4)
    np.testing.assert_allclose(got_box[1], sums[3] / 4, atol=1e-5)
    single.set_image(image)  # the image alone gives other masks
    alone = single.predict(box=box, multimask_output=False, return_logits=True)[0]
    assert np.abs(alone - got_box[0]).max() > 1e-2
    # The averaged low-resolution logits are a mask input in the image's own orientation.
    _, _, low_res = got_box
    again = mirrored.predict(box=box, mask_input=low_res, multimask_output=False)[0]
    assert again.shape == (1, height, width)


def test_a_mirror_between_cells_blends_the_two_neighbours():
    from samcore.views import _mirror_cells

    ramp = torch.arange(64, dtype=torch.float32).expand(2, 64)
    mirrored = _mirror_cells(ramp, 49.5, -1)  # the image ends half-way through cell 49
    # Cell i's centre mirrors to position 48.5 - i, read from the ramp by linear interpolation.
    torch.testing.assert_close(mirrored[:, :49], (48.5 - torch.arange(49.0)).expand(2, 49))
    torch.testing.assert_close(mirrored[:, 50:], ramp[:, 50:])  # the padding is left alone
    whole = _mirror_cells(ramp, 50, -1)
    torch.testing.assert_close(whole[:, :50], ramp[:, :50].flip(-1))
    torch.testing.assert_close(_mirror_cells(whole, 50, -1), ramp)


def test_views_follow_the_model_and_embeddings_must_match_them():
    model = build_sam("vit_test")
    assert Predictor(model, precision="fp32").views == 1  # as segment-anything
    model.views = 2  # what load_model sets for weights registered with views
    two = Predictor(model, precision="fp32")
    assert two.views == 2 and Predictor(model, precision="fp32", views=1).views == 1
    for bad in (3, 0, True, "2"):
        with pytest.raises(ValueError, match="views must be one of 1, 2, 4"):
            Predictor(model, precision="fp32", views=bad)
    embedding = two.embed(np.zeros((30, 40), np.uint8))
    assert embedding.views == 2 and embedding.features.shape[0] == 2
    with pytest.raises(ValueError, match="holds 2 view"):
        Predictor(model, precision="fp32", views=1).set_embedding(embedding)
    two.set_embedding(embedding)
    masks, _, _ = two.predict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 30, 40)
    box = torch.tensor([[10.0, 10.0, 100.0, 100.0]])
    first, _ = two.predict_low_res(None, None, box, multimask_output=False, views=1)  # the image alone
    alone = Predictor(model, precision="fp32", views=1)
    alone.set_image(np.zeros((30, 40), np.uint8))
    torch.testing.assert_close(first, alone.predict_low_res(None, None, box, multimask_output=False)[0])
    with pytest.raises(ValueError, match="at most the embedding's 2"):
        two.predict_low_res(None, None, box, views=4)


def test_a_model_that_pads_with_the_mirror_image_fills_the_square_with_reflections() -> None:
    model = build_sam("vit_test")
    assert model.padding == "zeros"  # SAM's own padding for SAM's architectures
    pixels = torch.arange(2 * 3, dtype=torch.float32).view(1, 1, 2, 3).expand(1, 3, 2, 3) * 40
    zeros = model.preprocess(pixels)
    assert zeros.shape == (1, 3, 256, 256) and (zeros[..., 2:, :] == 0).all() and (zeros[..., :, 3:] == 0).all()
    model.padding = "mirror"
    mirrored = model.preprocess(pixels)
    inside = (pixels - model.pixel_mean) / model.pixel_std
    assert torch.equal(mirrored[..., :2, :3], inside)
    # Columns 0 1 2 | 2 1 0 | 0 1 2 ..., rows 0 1 | 1 0 | 0 1 ...
    assert torch.equal(mirrored[..., :2, 3:6], inside.flip(-1))
    assert torch.equal(mirrored[..., 2:4, :3], inside.flip(-2))
    assert torch.equal(mirrored[..., 4:6, 6:9], inside)
    # A store of embeddings made with one padding is not taken for the other's.
    mirrored_key = model_key(model)
    model.padding = "zeros"
    assert model_key(model) != mirrored_key


def test_a_model_that_enlarges_small_images_at_most_twice_maps_prompts_and_masks_alike():
    from samcore.slice_decoder import StackDecoder
    from samcore.transforms import model_input_size

    torch.manual_seed(4)
    model = build_sam("vit_test")  # input 256 px
    assert model_input_size(model, (60, 40)) == (256, 171)  # SAM's way: the longest side to the input
    model.max_enlargement = 2.0
    assert model_input_size(model, (60, 40)) == (120, 80)
    assert model_input_size(model, (200, 100)) == (256, 128)  # twice would pass the input size
    assert model_input_size(model, (60, 40), crop=True) == (256, 171)  # a zoomed crop fills the input
    predictor = Predictor(model, precision="fp32")
    image = np.random.default_rng(5).integers(0, 255, (60, 40), dtype=np.uint8)
    predictor.set_image(image)
    assert predictor.input_size == (120, 80)
    np.testing.assert_allclose(predictor.transform_coords(np.array([[10.0, 30.0]])), [[20.0, 60.0]])
    mapped = predictor.transform.apply_coords(np.array([[10.0, 30.0]]), (60, 40))
    np.testing.assert_allclose(mapped, [[20.0, 60.0]])
    masks, _, low_res = predictor.predict(point_coords=np.array([[20.0, 30.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 60, 40)
    mask = masks[0] if masks[0].any() else np.pad(np.ones((10, 10), bool), ((20, 30), (10, 20)))
    decoder = StackDecoder(predictor, image)  # propagation's mask inputs: the same geometry
    np.testing.assert_allclose(decoder.logits_from_mask(mask), predictor.logits_from_mask(mask))


def test_an_image_of_nan_only_is_refused_in_its_own_terms(predictor):
    with pytest.raises(ValueError, match=r"^The image \(float32\) contains no finite values"):
        predictor.set_image(np.full((64, 64), np.nan, np.float32))


def test_decoding_prepared_before_the_first_prompt_serves_it(monkeypatch):
    import samcore.predictor as predictor_module

    torch.manual_seed(0)
    model = build_sam("vit_test")
    made = []

    class CountedContext(predictor_module.ImageContext):
        def __init__(self, *args, **kwargs) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "ImageContext", CountedContext)
    image = np.random.default_rng(4).integers(0, 255, size=(70, 90, 3), dtype=np.uint8)
    box = np.array([10.0, 12.0, 50.0, 40.0])
    prepared, plain = (Predictor(model, precision="fp32", views=2) for _ in range(2))
    for predictor in (prepared, plain):
        predictor.set_image(image)
    prepared.prepare_decoding()
    assert len(made) == 2  # one context per view, before any prompt
    masks, scores, logits = prepared.predict(box=box, multimask_output=False)
    assert len(made) == 2  # the first prompt made none of its own
    expected = plain.predict(box=box, multimask_output=False)
    assert len(made) == 4
    np.testing.assert_array_equal(masks, expected[0])
    np.testing.assert_array_equal(scores, expected[1])
    np.testing.assert_array_equal(logits, expected[2])


def test_preparing_decoding_needs_an_image():
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(build_sam("vit_test"), precision="fp32").prepare_decoding()
