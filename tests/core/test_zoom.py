"""Zooming in on small boxed objects, and on clicks on large images: the crop chosen, and its masks pasted
into the whole image's."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from samcore import Predictor, build_sam
from samcore.crop_decoder import BACKGROUND_LOGIT
from samcore.zoom import CLICK_MARGIN, ZOOM_CONTEXT, Window, click_order, click_window, serves, zoom_window


@contextmanager
def encodings(model):
    """A list that gains an entry each time the model's image encoder runs, within the block."""
    calls = []
    hook = model.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return build_sam("vit_test")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)


def test_the_crop_is_centred_on_the_box_with_context_around_it():
    window = zoom_window(np.array([200, 100, 209, 111]), None, (600, 800))  # 10 x 12 px
    side = int(np.ceil(12 * ZOOM_CONTEXT))
    assert (window.width, window.height) == (side, side)
    assert abs(window.x0 + side / 2 - 204.5) <= 1 and abs(window.y0 + side / 2 - 105.5) <= 1


def test_a_crop_at_the_border_moves_inside_the_image_and_holds_the_clicks():
    window = zoom_window(np.array([0, 590, 9, 599]), np.array([[30.0, 560.0]]), (600, 800))
    assert window.x0 == 0 and window.y0 + window.height == 600
    assert window.width == window.height >= 40 * ZOOM_CONTEXT


@pytest.mark.parametrize(
    ("box", "size"),
    [((10, 10, 300, 200), (600, 800)),  # a large object: the whole image is as close a look
     ((5, 5, 10, 10), (60, 80))],  # a small image: the crop would be most of it
)
def test_no_crop_where_it_would_not_enlarge_the_object(box, size):
    assert zoom_window(np.array(box), None, size) is None


def test_a_zoomed_box_is_decoded_on_its_crop_and_pasted_into_the_image(model, image):
    predictor = Predictor(model, precision="fp32", zoom=True)
    predictor.set_image(image)
    box = np.array([150, 120, 165, 131])
    decode = {"box": box, "multimask_output": False, "return_logits": True}
    logits, scores, low_res = predictor.predict(**decode)
    whole, _, whole_low_res = predictor.predict(**decode, zoom=False)

    window = zoom_window(box, None, image.shape[:2])
    rows, cols = window.slices
    crop = Predictor(model, precision="fp32", zoom=False)
    crop.set_image(np.ascontiguousarray(image[rows, cols]))
    crop_logits, crop_scores, _ = crop.predict(**{**decode, "box": window.box(box)})

    np.testing.assert_allclose(logits[0][rows, cols], crop_logits[0], atol=1e-5)
    np.testing.assert_allclose(scores, crop_scores, atol=1e-6)
    outside = np.ones(image.shape[:2], bool)
    outside[rows, cols] = False
    # Background around the crop: the boxed object lies inside it, and the whole image is not decoded.
    np.testing.assert_array_equal(logits[0][outside], np.float32(BACKGROUND_LOGIT))
    assert low_res.shape == whole_low_res.shape and np.isfinite(low_res).all()
    above = rows.start * low_res.shape[-1] // max(image.shape[:2]) - 2  # low-resolution rows above the crop
    np.testing.assert_allclose(low_res[0][:above], BACKGROUND_LOGIT, atol=1e-4)
    masks, _, _ = predictor.predict(box=box, multimask_output=False)
    np.testing.assert_array_equal(masks[0], logits[0] > 0)


def test_the_crop_is_embedded_once_for_the_prompts_of_one_box(model, image):
    predictor = Predictor(model, precision="fp32", zoom=True)
    predictor.set_image(image)
    with encodings(model) as calls:
        box = np.array([150, 120, 165, 131])
        _, _, low_res = predictor.predict(box=box, multimask_output=False)
        predictor.predict(box=box, mask_input=low_res, multimask_output=False)  # the next round, same box
        assert len(calls) == 1
        predictor.predict(box=box + 40, multimask_output=False)
        assert len(calls) == 2


def test_without_the_pixels_a_cached_embedding_decodes_boxes_on_the_whole_image(model, image):
    predictor = Predictor(model, precision="fp32", zoom=True)
    embedding = predictor.embed(image)
    box = np.array([150, 120, 165, 131])
    predictor.set_embedding(embedding)
    plain = predictor.predict(box=box, multimask_output=False, return_logits=True)[0]
    predictor.set_embedding(embedding, image=image)
    zoomed = predictor.predict(box=box, multimask_output=False, return_logits=True)[0]
    unzoomed = predictor.predict(box=box, multimask_output=False, return_logits=True, zoom=False)[0]
    np.testing.assert_array_equal(plain, unzoomed)
    assert not np.allclose(zoomed, unzoomed)


def test_the_pixels_given_with_an_embedding_must_be_its_image(model, image):
    predictor = Predictor(model, precision="fp32")
    embedding = predictor.embed(image)
    with pytest.raises(ValueError, match="300x400 image as .H, W, 3. uint8 RGB"):
        predictor.set_embedding(embedding, image=image[:100])
    with pytest.raises(ValueError, match="uint8 RGB"):
        predictor.set_embedding(embedding, image=image.astype(np.float32))


def test_a_window_maps_prompts_into_the_crop():
    window = Window(x0=30, y0=20, width=64, height=64)
    np.testing.assert_array_equal(window.points(np.array([[40.0, 25.0]])), [[10.0, 5.0]])
    np.testing.assert_array_equal(window.box(np.array([31, 21, 50, 60])), [1, 1, 20, 40])


def test_a_stack_decoder_zooms_in_on_small_boxes_and_batches_the_rest(model):
    from samcore.embeddings import StackView
    from samcore.slice_decoder import SlicePrompt, StackDecoder

    rng = np.random.default_rng(8)
    stack = rng.integers(0, 256, (2, 300, 400), dtype=np.uint8)
    small, large = np.array([150.0, 120, 165, 131]), np.array([20.0, 30, 300, 250])
    prompts = [SlicePrompt(box=small), SlicePrompt(box=large)]
    plain = StackDecoder(Predictor(model, precision="fp32", zoom=False), StackView.of(stack))
    zoomed = StackDecoder(plain.predictor, plain.view, plain.store, zoom=True)
    flat = plain.decode(1, prompts)
    near = zoomed.decode(1, prompts)

    reference = Predictor(model, precision="fp32", zoom=True)
    reference.set_image(plain.view.rgb_slice(1))  # the pixels the stack's embeddings were made from
    logits, scores, _ = reference.predict(box=small, multimask_output=False, return_logits=True)
    np.testing.assert_allclose(near[0].logits, logits[0], atol=1e-4)
    assert near[0].score == pytest.approx(float(scores[0]), abs=1e-5)
    assert not np.allclose(near[0].logits, flat[0].logits, atol=1e-3)  # decoded on the crop
    np.testing.assert_allclose(near[1].logits, flat[1].logits, atol=1e-5)  # too large to zoom
    assert near[0].low_res.shape == flat[0].low_res.shape


def test_clicks_on_a_large_image_get_a_crop_of_the_input_size_around_them():
    window = click_window(np.array([[700.0, 300.0]]), (1000, 1200), 256)
    assert window.clicks and (window.width, window.height) == (256, 256)  # seen at the image's own resolution
    assert abs(window.x0 + 128 - 700) <= 1 and abs(window.y0 + 128 - 300) <= 1
    spread = click_window(np.array([[500.0, 300.0], [700.0, 320.0]]), (1000, 1200), 256)
    assert spread.width == spread.height == int(np.ceil(201 / (1 - 2 * CLICK_MARGIN)))  # both well inside
    corner = click_window(np.array([[3.0, 990.0]]), (1000, 1200), 256)
    assert (corner.x0, corner.y0 + corner.height) == (0, 1000)
    assert click_window(np.array([[100.0, 100.0]]), (400, 500), 256) is None  # under twice the input size


def test_a_click_crop_serves_clicks_well_inside_it_and_at_the_image_border():
    window = Window(400, 200, 256, 256, clicks=True)
    assert serves(window, np.array([[528.0, 328.0], [470.0, 380.0]]), (1000, 1200))
    assert not serves(window, np.array([[420.0, 328.0]]), (1000, 1200))  # 20 px from its left edge
    border = Window(0, 744, 256, 256, clicks=True)
    assert serves(border, np.array([[3.0, 990.0]]), (1000, 1200))  # no crop reaches past the image


@pytest.fixture(scope="module")
def large():
    rng = np.random.default_rng(6)
    return rng.integers(0, 256, (600, 700, 3), dtype=np.uint8)


def test_clicks_on_a_large_image_are_decoded_on_their_crop_with_background_around(model, large):
    predictor = Predictor(model, precision="fp32", zoom=True)
    predictor.set_image(large)
    points, labels = np.array([[300.0, 250.0], [330.0, 270.0]]), np.array([1, 0])
    logits, scores, low_res = predictor.predict(points, labels, multimask_output=True, return_logits=True)
    window = click_window(points, large.shape[:2], model.img_size)
    rows, cols = window.slices
    crop = Predictor(model, precision="fp32", zoom=False)
    crop.set_image(np.ascontiguousarray(large[rows, cols]))
    crop_logits, crop_scores, _ = crop.predict(window.points(points), labels, return_logits=True)
    np.testing.assert_allclose(logits[:, rows, cols], crop_logits, atol=1e-5)
    np.testing.assert_allclose(scores, crop_scores, atol=1e-6)
    outside = np.ones(large.shape[:2], bool)
    outside[rows, cols] = False
    assert (logits[:, outside] < 0).all()  # background: the clicked object lies in the crop
    assert low_res.shape == (3, *model.prompt_encoder.mask_input_size) and np.isfinite(low_res).all()
    again, _, _ = predictor.predict(points, labels, mask_input=low_res[:1], multimask_output=False)
    assert again.shape == (1, *large.shape[:2])  # the next round of clicks takes the logits back


def test_clicks_near_earlier_ones_reuse_their_crop_and_a_few_crops_are_kept(model, large):
    from samcore.predictor import HELD_CROPS

    predictor = Predictor(model, precision="fp32", zoom=True)
    predictor.set_image(large)
    with encodings(model) as calls:
        predictor.predict(np.array([[300.0, 250.0]]), np.array([1]))
        predictor.predict(np.array([[330.0, 270.0]]), np.array([1]))  # a neighbour, well inside the crop
        assert len(calls) == 1
        places = [(120.0, 120.0), (560.0, 120.0), (120.0, 460.0), (560.0, 460.0)]
        for x, y in places:
            predictor.predict(np.array([[x, y]]), np.array([1]))
        assert len(calls) == 1 + len(places)
        for x, y in places[-HELD_CROPS:]:  # back to the places clicked last: nothing embedded
            predictor.predict(np.array([[x, y]]), np.array([1]))
        assert len(calls) == 1 + len(places)
        predictor.predict(np.array([[300.0, 250.0]]), np.array([1]), zoom=False)  # the whole image's
        assert len(calls) == 1 + len(places)


def test_a_batch_of_clicks_is_taken_in_an_order_that_shares_crops():
    points = list(np.random.default_rng(11).uniform(0, 2048, (300, 1, 2)))
    order = click_order(points, (2048, 2048), 512)
    assert sorted(order) == list(range(len(points)))

    def crops(sequence):  # as the predictor does it: a new crop unless the last one serves
        count, held = 0, None
        for p in sequence:
            if held is None or not serves(held, p, (2048, 2048)):
                held, count = click_window(p, (2048, 2048), 512), count + 1
        return count

    assert crops([points[i] for i in order]) * 2 < crops(points)
    spread = [np.array([[100.0, 100.0], [900.0, 100.0]]), np.array([[120.0, 110.0]])]
    assert sorted(click_order(spread, (2048, 2048), 512)) == [0, 1]  # crops of other sizes are not shared


def test_a_stack_decoder_decodes_a_batch_of_clicks_on_few_crops_in_the_order_given(model):
    from samcore.embeddings import StackView
    from samcore.slice_decoder import SlicePrompt, StackDecoder

    stack = np.random.default_rng(12).integers(0, 256, (1, 1024, 1024), dtype=np.uint8)
    regions = [(x, y) for y in (100.0, 900.0) for x in (100.0, 500.0, 900.0)]  # more than HELD_CROPS
    places = regions + [(x + 20, y + 15) for x, y in regions]  # every region, then every one again
    prompts = [SlicePrompt(points=np.array([xy]), labels=np.array([1])) for xy in places]
    decoder = StackDecoder(Predictor(model, precision="fp32"), StackView.of(stack), zoom=True)
    decoder.embed(0)
    with encodings(model) as calls:
        outputs = decoder.decode(0, prompts)
    assert len(calls) == len(regions)  # in the order given, the second round would embed each again
    reference = Predictor(model, precision="fp32", zoom=True)
    for index in range(len(regions)):  # each region's two clicks, on the crop of its first
        reference.set_image(decoder.view.rgb_slice(0))  # no crop held
        for which in (index, index + len(regions)):  # outputs come in the order given
            click = np.array([places[which]])
            logits, _, _ = reference.predict(click, np.array([1]), multimask_output=False, return_logits=True)
            np.testing.assert_allclose(outputs[which].logits, logits[0], atol=1e-4)


def test_a_crop_decoder_decodes_clicks_as_a_zoomed_predict_one_candidate_at_a_time(model, large):
    predictor = Predictor(model, precision="fp32", zoom=True, refine=False)
    predictor.set_image(large)
    points, labels = np.array([[300.0, 250.0]]), np.array([1])
    logits, scores, _ = predictor.predict(points, labels, return_logits=True)
    decoder = predictor.crop_decoder(predictor.zoom_window(None, points))
    got_scores, low_res = decoder.predict_logits(points, labels)
    np.testing.assert_allclose(got_scores, scores, atol=1e-6)
    second = decoder.masks_from_logits(low_res[1:2], return_logits=True)[0]
    np.testing.assert_allclose(second, logits[1], atol=1e-5)
    np.testing.assert_array_equal(decoder.masks_from_logits(low_res[1:2])[0], logits[1] > 0)
    # Its logits take a second pass as the crop's mask input: the candidate that predict(refine=True) gives.
    refined = Predictor(model, precision="fp32", zoom=True, refine=True)
    refined.set_image(large)
    refined_logits, refined_scores, _ = refined.predict(points, labels, return_logits=True)
    again, again_low_res = decoder.predict_logits(
        points, labels, mask_input=low_res[1:2], multimask_output=False
    )
    np.testing.assert_allclose(again[0], refined_scores[1], atol=1e-5)
    second_refined = decoder.masks_from_logits(again_low_res, return_logits=True)[0]
    np.testing.assert_allclose(second_refined, refined_logits[1], atol=1e-4)


def test_a_crop_decoder_is_for_the_crop_of_clicks_alone(model, large):
    predictor = Predictor(model, precision="fp32", zoom=True)
    predictor.set_image(large)
    with pytest.raises(ValueError, match="clicks alone"):
        predictor.crop_decoder(Window(0, 0, 64, 64))
