"""Same masks and scores as the official segment-anything predictor, for every prompt type."""

from functools import partial

import numpy as np
import pytest
import torch
from conftest import randomize_

from samcore import Predictor, build_sam
from samcore.build import ViTConfig
from samcore.logits import upscale_logits
from samcore.transforms import resized_shape

from segment_anything import SamPredictor
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

SMALL = ViTConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=6, img_size=1024)


def official_sam(config: ViTConfig) -> torch.nn.Module:
    grid = config.img_size // 16
    encoder = ImageEncoderViT(
        depth=config.depth,
        embed_dim=config.embed_dim,
        img_size=config.img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=config.num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=config.global_attn_indexes,
        window_size=config.window_size,
        out_chans=256,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(grid, grid),
        input_image_size=(config.img_size, config.img_size),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return Sam(encoder, prompt_encoder, decoder, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]).eval()


def prompts(height: int, width: int) -> dict[str, dict]:
    center = np.array([[0.4 * width, 0.5 * height]])
    box = np.array([0.2 * width, 0.3 * height, 0.6 * width, 0.7 * height])
    return {
        "point": {"point_coords": center, "point_labels": np.array([1])},
        "multi-point": {
            "point_coords": np.array([[0.4 * width, 0.5 * height], [0.6 * width, 0.3 * height], [0.2 * width, 0.8 * height]]),
            "point_labels": np.array([1, 0, 1]),
        },
        "box": {"box": box},
        "box+point": {"box": box, "point_coords": center, "point_labels": np.array([0])},
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def assert_same_prediction(official, ours, kwargs):
    for multimask in (True, False):
        o_masks, o_scores, o_low = official.predict(multimask_output=multimask, **kwargs)
        masks, scores, low = ours.predict(multimask_output=multimask, **kwargs)
        assert masks.shape == o_masks.shape and low.shape == o_low.shape
        for o_mask, mask in zip(o_masks, masks):
            assert 0.05 < o_mask.mean() < 0.95, "a degenerate mask would make the comparison meaningless"
            assert iou(o_mask, mask) >= 0.99
        np.testing.assert_allclose(scores, o_scores, atol=0.01)
    # Feed the previous low-resolution logits back, as interactive refinement does.
    o_masks, o_scores, _ = official.predict(mask_input=o_low[:1], multimask_output=False, **kwargs)
    masks, scores, _ = ours.predict(mask_input=o_low[:1], multimask_output=False, **kwargs)
    assert iou(o_masks[0], masks[0]) >= 0.99
    np.testing.assert_allclose(scores, o_scores, atol=0.01)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    official = randomize_(official_sam(SMALL))
    ours = build_sam(SMALL).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def test_state_dict_keys_match_official_vit_b():
    from segment_anything import sam_model_registry

    official = sam_model_registry["vit_b"]().state_dict()
    ours = build_sam("vit_b").state_dict()
    assert list(official) == list(ours)
    assert all(official[k].shape == ours[k].shape for k in official)


@pytest.mark.parametrize(
    ("image_name", "crop"),
    [
        ("real_rgb", None),
        ("real_gray", None),
        ("real_rgb", (slice(100, 356), slice(50, 306))),  # 256 x 256: masks scaled down 4x at the end
        ("real_gray", (slice(0, 150), slice(0, 220))),
    ],
)
def test_predictions_match_official(pair, image_name, crop, request):
    image = request.getfixturevalue(image_name)
    if crop is not None:
        image = np.ascontiguousarray(image[crop])
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    official_model, our_model = pair
    official, ours = SamPredictor(official_model), Predictor(our_model, precision="fp32")
    official.set_image(image)
    ours.set_image(image)
    torch.testing.assert_close(ours.get_image_embedding(), official.features, atol=1e-4, rtol=1e-4)
    for kwargs in prompts(*image.shape[:2]).values():
        assert_same_prediction(official, ours, kwargs)


@pytest.mark.parametrize(
    "original_size",
    [(1024, 1024), (800, 600), (512, 512), (256, 256), (150, 220), (90, 140), (33, 1), (2000, 1500)],
)
def test_logits_scale_to_the_image_as_official_postprocessing_does(pair, original_size):
    official_model, our_model = pair
    low_res = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    input_size = resized_shape(*original_size, our_model.img_size)
    expected = official_model.postprocess_masks(low_res, input_size, original_size)
    ours = upscale_logits(low_res, our_model.img_size, input_size, original_size)
    torch.testing.assert_close(ours, expected, rtol=0.0, atol=1e-5)


def test_an_image_resized_by_the_caller_matches_official_set_torch_image(pair, real_rgb):
    official_model, our_model = pair
    official, ours = SamPredictor(official_model), Predictor(our_model, precision="fp32")
    resized = torch.as_tensor(official.transform.apply_image(real_rgb)).permute(2, 0, 1)[None]
    np.testing.assert_array_equal(
        ours.transform.apply_image(real_rgb), official.transform.apply_image(real_rgb)
    )
    official.set_torch_image(resized, real_rgb.shape[:2])
    ours.set_torch_image(resized, real_rgb.shape[:2])
    torch.testing.assert_close(ours.get_image_embedding(), official.features, atol=1e-4, rtol=1e-4)
    assert ours.input_size == official.input_size and ours.original_size == official.original_size
    assert_same_prediction(official, ours, prompts(*real_rgb.shape[:2])["box"])
    # segment-anything's apply_image_torch sizes its output from the batch and channel axes; ours from
    # the image's, and it agrees with apply_image up to rounding.
    strip = real_rgb[:300]
    batch = ours.transform.apply_image_torch(torch.as_tensor(strip).permute(2, 0, 1)[None])
    assert batch.shape == (1, 3, 600, 1024) and batch.dtype == torch.float32
    as_image = torch.as_tensor(ours.transform.apply_image(strip)).permute(2, 0, 1)[None].float()
    assert (batch - as_image).abs().mean() < 1.0


def test_the_end_to_end_batched_call_matches_official(pair, real_rgb, real_gray):
    official_model, our_model = pair
    transform = Predictor(our_model).transform  # no image set: the model's input size
    batch = []
    for image, prompt in ((real_rgb, "points"), (np.stack([real_gray[:300]] * 3, axis=-1), "boxes")):
        entry = {
            "image": torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1),
            "original_size": image.shape[:2],
        }
        height, width = image.shape[:2]
        if prompt == "points":
            xy = np.array([[[0.4 * width, 0.5 * height], [0.6 * width, 0.3 * height]]])
            entry["point_coords"] = transform.apply_coords_torch(torch.as_tensor(xy), image.shape[:2])
            entry["point_labels"] = torch.tensor([[1, 0]])
        else:
            boxes = np.array(
                [[0.2 * width, 0.3 * height, 0.6 * width, 0.7 * height], [10, 10, 0.5 * width, 0.9 * height]]
            )
            entry["boxes"] = transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2])
        batch.append(entry)
    for multimask in (True, False):
        with torch.no_grad():
            expected, got = official_model(batch, multimask), our_model(batch, multimask)
        for one, other in zip(expected, got):
            assert other["masks"].shape == one["masks"].shape and other["masks"].dtype == torch.bool
            for o_mask, mask in zip(one["masks"].flatten(0, 1).numpy(), other["masks"].flatten(0, 1).numpy()):
                assert 0.01 < o_mask.mean() < 0.99 and iou(o_mask, mask) >= 0.99
            torch.testing.assert_close(other["iou_predictions"], one["iou_predictions"], atol=0.01, rtol=0)
            torch.testing.assert_close(other["low_res_logits"], one["low_res_logits"], atol=1e-3, rtol=1e-3)


def test_the_end_to_end_call_refuses_what_is_not_a_batch(pair, real_rgb):
    _, our_model = pair
    image = torch.as_tensor(real_rgb).permute(2, 0, 1)
    with pytest.raises(TypeError, match="one dict per image"):
        our_model({"image": image, "original_size": (512, 512)}, False)
    with pytest.raises(ValueError, match="lacks original_size"):
        our_model([{"image": image}], False)
    with pytest.raises(ValueError, match="apply_image_torch"):
        our_model([{"image": torch.zeros(3, 2048, 1024), "original_size": (2048, 1024)}], False)


@pytest.mark.slow
def test_full_size_vit_b_matches_official(real_rgb):
    torch.manual_seed(1)
    config = ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))
    official_model = randomize_(official_sam(config), seed=1)
    our_model = build_sam("vit_b").eval()
    our_model.load_state_dict(official_model.state_dict(), strict=True)
    official, ours = SamPredictor(official_model), Predictor(our_model, precision="fp32")
    official.set_image(real_rgb)
    ours.set_image(real_rgb)
    torch.testing.assert_close(ours.get_image_embedding(), official.features, atol=1e-3, rtol=1e-3)
    for kwargs in prompts(*real_rgb.shape[:2]).values():
        assert_same_prediction(official, ours, kwargs)
