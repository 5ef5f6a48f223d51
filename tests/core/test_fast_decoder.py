"""The fast decoder path gives the reference `MaskDecoder` results, and its per-image cache follows the image."""

import numpy as np
import pytest
import torch
from conftest import randomize_

from samcore import ImageEmbedding, Predictor, build_sam
from samcore.logits import upscale_logits
from samcore.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer, linear
from samcore.modeling.fast_decoder import (
    DecoderConstants,
    ImageContext,
    decode_masks,
    decode_prompts,
    decode_with_masks,
)

GRID = 64  # the 64x64 image embedding of every 1024 px SAM model
SIDE = 16 * GRID


@pytest.fixture(scope="module")
def parts():
    """A randomised prompt encoder and mask decoder of SAM's sizes (shared by all SAM models)."""
    prompt_encoder = PromptEncoder(256, (GRID, GRID), (SIDE, SIDE), mask_in_chans=16)
    decoder = MaskDecoder(256, TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048))
    return randomize_(prompt_encoder, seed=1).eval(), randomize_(decoder, seed=2).eval()


def embedding(seed: int, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(1, 256, GRID, GRID, generator=torch.Generator().manual_seed(seed)) + offset


def prompts(batch: int = 1, seed: int = 0) -> dict[str, dict]:
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(batch, 3, 2, generator=generator) * SIDE
    labels = torch.randint(0, 2, (batch, 3), generator=generator)
    corners = torch.rand(batch, 2, 2, generator=generator).sort(dim=1).values * SIDE
    boxes = corners.reshape(batch, 4)
    masks = torch.randn(batch, 1, 4 * GRID, 4 * GRID, generator=generator)
    return {
        "point": {"points": (points[:, :1], labels[:, :1].clamp(min=1)), "boxes": None, "masks": None},
        "points": {"points": (points, labels), "boxes": None, "masks": None},
        "box": {"points": None, "boxes": boxes, "masks": None},
        "box+points": {"points": (points, labels), "boxes": boxes, "masks": None},
        "mask+point": {"points": (points[:, :1], labels[:, :1]), "boxes": None, "masks": masks},
        "box+mask": {"points": None, "boxes": boxes, "masks": masks},
    }


def assert_matches_reference(fast, reference):
    (masks, scores), (ref_masks, ref_scores) = fast, reference
    assert masks.shape == ref_masks.shape and scores.shape == ref_scores.shape
    assert (masks - ref_masks).abs().max() <= 2e-5 * max(1.0, float(ref_masks.abs().max()))
    assert (scores - ref_scores).abs().max() <= 1e-5
    # Masks are thresholded at zero; only logits within rounding of zero may flip.
    flips = (masks > 0) != (ref_masks > 0)
    assert bool((ref_masks[flips].abs() < 1e-5).all())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("kind", list(prompts()))
def test_decode_masks_matches_the_reference_decoder(parts, kind, multimask, batch):
    prompt_encoder, decoder = parts
    prompt = prompts(batch)[kind]
    image, image_pe = embedding(0), prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = prompt_encoder(prompt["points"], prompt["boxes"], prompt["masks"])
        reference = decoder(image, image_pe, sparse, dense, multimask)
        fast = decode_masks(decoder, image, image_pe, sparse, dense, multimask)
    assert_matches_reference(fast, reference)


def test_one_embedding_per_prompt_matches_the_reference_decoder(parts):
    prompt_encoder, decoder = parts
    prompt = prompts(2)["box+mask"]
    images = torch.cat([embedding(0), embedding(1)])
    with torch.inference_mode():
        sparse, dense = prompt_encoder(prompt["points"], prompt["boxes"], prompt["masks"])
        reference = decoder(images, prompt_encoder.get_dense_pe(), sparse, dense, True)
        fast = decode_masks(decoder, images, prompt_encoder.get_dense_pe(), sparse, dense, True)
    assert_matches_reference(fast, reference)


def test_embedding_far_from_zero_mean_keeps_float32_accuracy(parts):
    prompt_encoder, decoder = parts
    prompt = prompts(1)["box+points"]
    image = embedding(3, offset=10.0)  # every channel offset by ten standard deviations
    with torch.inference_mode():
        sparse, dense = prompt_encoder(prompt["points"], prompt["boxes"], prompt["masks"])
        reference = decoder(image, prompt_encoder.get_dense_pe(), sparse, dense, False)
        fast = decode_masks(decoder, image, prompt_encoder.get_dense_pe(), sparse, dense, False)
    assert_matches_reference(fast, reference)


def test_image_context_serves_prompts_without_mask_input(parts):
    prompt_encoder, decoder = parts
    image, image_pe = embedding(4), prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        constants = DecoderConstants(decoder, image_pe)
        tokens = image[0].flatten(1) + prompt_encoder.no_mask_embed.weight.T
        context = ImageContext(constants, tokens)
        for kind in ("point", "box", "box+points"):
            prompt = prompts(2, seed=5)[kind]
            sparse, dense = prompt_encoder(prompt["points"], prompt["boxes"], None)
            for multimask in (False, True):
                reference = decoder(image, image_pe, sparse, dense, multimask)
                assert_matches_reference(decode_prompts(context, sparse, multimask), reference)


def test_upscaling_without_onednn_matches_the_reference_decoder(parts, monkeypatch):
    # Where oneDNN is not faster (or not there), the upscaling's product and GELU take two passes.
    monkeypatch.setattr(linear, "onednn_is_faster", lambda: False)
    prompt_encoder, decoder = parts
    image, image_pe = embedding(5), prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        constants = DecoderConstants(decoder, image_pe)
        context = ImageContext(constants, image[0].flatten(1) + prompt_encoder.no_mask_embed.weight.T)
        prompt = prompts(1, seed=6)["box"]
        sparse, dense = prompt_encoder(prompt["points"], prompt["boxes"], None)
        reference = decoder(image, image_pe, sparse, dense, True)
        assert_matches_reference(decode_prompts(context, sparse, True), reference)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_mask_inputs_update_the_image_context_as_the_reference_decoder_decodes_them(parts, offset):
    # The no-mask context plus the low-rank change of a mask input, for every prompt kind with a
    # mask, on an embedding with a large common offset (float32 cancellation).
    prompt_encoder, decoder = parts
    image, image_pe = embedding(7, offset), prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        constants = DecoderConstants(decoder, image_pe, prompt_encoder)
        context = ImageContext(constants, image[0].flatten(1) + prompt_encoder.no_mask_embed.weight.T)
        for kind in ("mask+point", "box+mask"):
            prompt = prompts(3, seed=8)[kind]
            sparse, dense = prompt_encoder(prompt["points"], prompt["boxes"], prompt["masks"])
            for multimask in (False, True):
                reference = decoder(image, image_pe, sparse, dense, multimask)
                fast = decode_with_masks(context, sparse, prompt["masks"], multimask)
                assert_matches_reference(fast, reference)


def test_mask_inputs_need_constants_made_with_the_prompt_encoder(parts):
    prompt_encoder, decoder = parts
    image, image_pe = embedding(9), prompt_encoder.get_dense_pe()
    prompt = prompts(1)["box+mask"]
    with torch.inference_mode():
        context = ImageContext(DecoderConstants(decoder, image_pe), image[0].flatten(1))
        sparse, _ = prompt_encoder(prompt["points"], prompt["boxes"], None)
        with pytest.raises(ValueError, match="prompt encoder"):
            decode_with_masks(context, sparse, prompt["masks"], False)


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    model = randomize_(build_sam("vit_test"), seed=6)
    return Predictor(model, precision="fp32")


def reference_prediction(predictor, features, box, multimask):
    """Masks and scores straight from the reference modules, as `predict` returns them."""
    model = predictor.model
    with torch.inference_mode():
        boxes = torch.as_tensor(predictor.transform_boxes(box), dtype=torch.float32)
        sparse, dense = model.prompt_encoder(None, boxes, None)
        low_res, scores = model.mask_decoder(features, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
        masks = upscale_logits(low_res, model.img_size, predictor.input_size, predictor.original_size)
    return masks[0].numpy(), scores[0].numpy()


def test_alternating_embeddings_are_each_decoded_with_their_own_context(predictor):
    features = [torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(seed)) for seed in (7, 8)]
    box = np.array([20.0, 30.0, 150.0, 120.0])
    for step in range(4):
        current = features[step % 2]
        predictor.set_embedding(ImageEmbedding(current, (200, 180), (256, 230)))
        for multimask in (False, True):
            logits, scores, _ = predictor.predict(box=box, multimask_output=multimask, return_logits=True)
            ref_logits, ref_scores = reference_prediction(predictor, current, box, multimask)
            np.testing.assert_allclose(logits, ref_logits, atol=2e-5)
            np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_new_image_and_reset_drop_the_previous_context(predictor):
    box = np.array([10.0, 10.0, 60.0, 50.0])
    image = np.random.default_rng(9).integers(0, 255, size=(80, 100, 3), dtype=np.uint8)
    predictor.set_image(image)
    first = predictor.predict(box=box, return_logits=True)[0]
    predictor.set_image(255 - image)
    second = predictor.predict(box=box, return_logits=True)[0]
    assert not np.allclose(first, second)
    np.testing.assert_allclose(second, reference_prediction(predictor, predictor.get_image_embedding(), box, True)[0], atol=2e-5)
    predictor.reset_image()
    with pytest.raises(RuntimeError, match="No image"):
        predictor.predict(box=box)


def test_embedding_changed_in_place_is_decoded_afresh(predictor):
    features = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(10))
    box = np.array([20.0, 30.0, 150.0, 120.0])
    predictor.set_embedding(ImageEmbedding(features, (200, 180), (256, 230)))
    predictor.predict(box=box)
    current = predictor.get_image_embedding()
    current.mul_(-1.0)  # e.g. a caller refining the embedding it handed over
    logits = predictor.predict(box=box, multimask_output=False, return_logits=True)[0]
    np.testing.assert_allclose(logits, reference_prediction(predictor, current, box, False)[0], atol=2e-5)


def test_weights_loaded_in_place_are_decoded_afresh():
    torch.manual_seed(0)
    model = randomize_(build_sam("vit_test"), seed=11)
    predictor = Predictor(model, precision="fp32")
    features = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(12))
    predictor.set_embedding(ImageEmbedding(features, (256, 256), (256, 256)))
    box = np.array([40.0, 40.0, 200.0, 180.0])
    before = predictor.predict(box=box, multimask_output=False, return_logits=True)[0]
    other = randomize_(build_sam("vit_test"), seed=13)
    model.load_state_dict(other.state_dict())
    after = predictor.predict(box=box, multimask_output=False, return_logits=True)[0]
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, reference_prediction(predictor, features, box, False)[0], atol=2e-5)
