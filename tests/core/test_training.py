"""Training side: generated scenes, simulated prompts, losses, the loop, resume and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import samcore
from samcore.build import ARCHITECTURES, MicroConfig, build_sam, infer_architecture
from samcore.modeling.micro_encoder import SelfAttention
from samcore.preprocess import to_rgb_uint8
from samcore.training import prompts as prompt_sim
from samcore.training.checkpoints import export_weights
from samcore.training.geometry import ellipses, geometry_prompts, pretrain_decoder
from samcore.training.interactive import (
    DenseHead, Prompts, decode, encode, interactive_step, random_offset, upscale,
)
from samcore.training.batches import (
    EVAL_FAMILIES,
    make_batch,
    make_eval_batches,
    pick_objects,
    region_maps,
    scene_zoom,
)
from samcore.training.losses import FOCAL_WEIGHT, dice_loss, focal_loss, focal_ramp, mask_iou, sam_loss
from samcore.training.scenes import FAMILIES, make_scene, relabel_consecutive
from samcore.training.schedule import WarmupCosine
from samcore.training.settings import TrainSettings
from samcore.training.shapes import BlobSpec, RodSpec, blob_stamp, rod_stamp
from samcore.training.command import main
from samcore.training.train import train
from tiny_models import TINY_MICRO

TINY = "micro_tiny_test"


@pytest.fixture
def tiny_arch(monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered micro encoder small enough for a few training steps in a test."""
    monkeypatch.setitem(ARCHITECTURES, TINY, TINY_MICRO)
    return TINY


def tiny_settings(**changes: object) -> TrainSettings:
    base = TrainSettings(
        arch=TINY, seed=3, total_steps=6, size=64, loss_size=32, geometry_steps=0, scenes=1, objects=3,
        max_corrective=2, corrective_from=2, lr=1e-3, warmup=3, save_every=3, log_every=100, eval_every=0,
    )
    return base.replace(**changes)


def quiet(_: str) -> None:
    pass


# -- scenes ---------------------------------------------------------------------------------------


def test_scenes_are_deterministic_per_seed_and_index() -> None:
    a, b = make_scene(7, 3, size=96), make_scene(7, 3, size=96)
    assert a.family == b.family
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.raw, b.raw)
    assert not np.array_equal(make_scene(7, 4, size=96).image, a.image)
    assert not np.array_equal(make_scene(8, 3, size=96).image, a.image)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_renders_consistent_labels(family: str) -> None:
    for index in range(3):
        scene = make_scene(11, index, size=128, family=family)
        assert scene.family == family
        assert scene.image.shape == (128, 128, 3) and scene.image.dtype == np.uint8
        assert scene.labels.shape == (128, 128) and scene.labels.dtype == np.int32
        assert scene.raw.dtype in (np.uint8, np.uint16, np.float32)
        ids = np.unique(scene.labels)
        count = int(scene.labels.max())
        assert count >= 1
        np.testing.assert_array_equal(ids[ids > 0], np.arange(1, count + 1))  # consecutive, none empty
        grey = to_rgb_uint8(scene.raw)[..., 0]
        for channel in range(3):  # the model input is the raw array as inference converts it
            plane = scene.image[..., channel]
            assert np.array_equal(plane, grey) or not plane.any()


def test_objects_stand_out_from_their_surroundings() -> None:
    contrasts = []
    for index in range(8):
        scene = make_scene(5, index, size=128, family="nuclei")
        grey = scene.image.max(axis=-1).astype(float)
        inside = scene.labels > 0
        contrasts.append(abs(grey[inside].mean() - grey[~inside].mean()) if (~inside).any() else 99)
    assert np.median(contrasts) > 10


def test_zoomed_scenes_enlarge_objects_and_labels_together() -> None:
    scene = make_scene(2, 1, size=128, family="nuclei", zoom=2)
    assert scene.image.shape == (128, 128, 3) and scene.labels.shape == (128, 128)
    assert scene.raw.shape == (64, 64)
    np.testing.assert_array_equal(scene.labels[::2, ::2], scene.labels[1::2, 1::2])  # nearest, 2x2 blocks
    with pytest.raises(ValueError, match="zoom"):
        make_scene(2, 1, size=100, zoom=3)


def test_size_curriculum_enlarges_early_scenes_only() -> None:
    rng = np.random.default_rng(0)
    early = [scene_zoom(rng, 0, 1000, 512) for _ in range(200)]
    late = [scene_zoom(rng, 5000, 1000, 512) for _ in range(400)]
    assert set(early) <= {2, 4} and set(late) <= {1, 2, 4}
    assert 0.05 < np.mean(np.asarray(late) > 1) < 0.3
    assert scene_zoom(rng, 0, 0, 512) == 1 and scene_zoom(rng, 0, 1000, 96) == 1



def test_prompted_objects_favour_larger_ones_and_skip_specks() -> None:
    labels = np.zeros((64, 64), np.int32)
    labels[0:2, 0:2] = 1  # 4 px: a speck, never prompted while larger objects exist
    labels[10:20, 10:20] = 2  # 100 px
    labels[30:50, 30:50] = 3  # 400 px
    picks = np.concatenate([pick_objects(np.random.default_rng(i), labels, 1) for i in range(2000)])
    counts = np.bincount(picks, minlength=4)
    assert counts[1] == 0
    assert 1.6 < counts[3] / counts[2] < 2.4  # sqrt(400 / 100) = 2
    assert set(pick_objects(np.random.default_rng(0), labels, 2)) == {2, 3}  # distinct when possible
    only_specks = np.zeros((8, 8), np.int32)
    only_specks[0, 0] = 1
    assert pick_objects(np.random.default_rng(0), only_specks, 3).tolist() == [1, 1, 1]


def test_region_maps_mark_edges_between_touching_objects() -> None:
    labels = np.zeros((6, 8), dtype=np.int32)
    labels[1:5, 1:4] = 1
    labels[1:5, 4:7] = 2  # touches object 1 along a column
    foreground, edge = region_maps(labels)
    assert np.array_equal(foreground, labels > 0)
    assert not edge[labels == 0].any()
    assert edge[2:4, 3].all() and edge[2:4, 4].all()  # the shared border, on both sides
    assert not edge[2:4, 2].any() and not edge[2:4, 5].any()  # interiors stay unmarked


def test_relabel_drops_small_labels_and_renumbers() -> None:
    labels = np.zeros((10, 10), dtype=np.int32)
    labels[0:3, 0:3] = 4  # 9 px
    labels[5:6, 5:7] = 9  # 2 px, dropped
    labels[7:10, 7:10] = 2  # 9 px
    out = relabel_consecutive(labels, min_area=3)
    assert set(np.unique(out)) == {0, 1, 2}
    assert out[0, 0] == 2 and out[8, 8] == 1 and out[5, 5] == 0


def test_shapes_have_the_expected_area() -> None:
    disc = blob_stamp(BlobSpec(20.0, 20.0, 10.0, 1.0, 0.0, np.zeros((0, 3))))
    assert disc.mask.sum() == pytest.approx(np.pi * 100, rel=0.05)
    assert disc.radial[disc.mask].max() <= 1.0
    rod = rod_stamp(RodSpec(30.0, 30.0, 20.0, 6.0, 0.7, 0.0))
    assert rod.mask.sum() == pytest.approx(20 * 6 + np.pi * 9, rel=0.08)


# -- prompts --------------------------------------------------------------------------------------


def blobs(n: int = 6, size: int = 64) -> torch.Tensor:
    masks = torch.zeros((n, size, size), dtype=torch.bool)
    for i in range(n):
        masks[i, 5 + 3 * i : 15 + 4 * i, 10 + 2 * i : 30 + i] = True
    return masks


def test_points_fall_inside_their_objects() -> None:
    masks = blobs()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        coords, labels = prompt_sim.point_prompts(masks, generator)
        x, y = coords[:, 0, 0].long(), coords[:, 0, 1].long()
        assert masks[torch.arange(len(masks)), y, x].all()
        assert (labels == 1).all()


def test_boxes_are_jittered_bounding_boxes() -> None:
    masks = blobs()
    tight = prompt_sim.bounding_boxes(masks)
    assert tight[0].tolist() == [10.0, 5.0, 29.0, 14.0]
    generator = torch.Generator().manual_seed(1)
    boxes = torch.stack([prompt_sim.box_prompts(masks, generator) for _ in range(50)])
    assert (boxes[..., 2:] >= boxes[..., :2]).all()
    assert (boxes >= 0).all() and (boxes <= 63).all()
    shift = (boxes - tight).abs()
    assert shift.max() <= prompt_sim.BOX_NOISE_MAX + 1e-4
    assert shift.mean() > 0.3  # jittered, not exact


def test_corrective_clicks_sample_the_error_with_the_right_label() -> None:
    target = blobs(3)
    missed = target.clone()
    missed[0, 5:10] = False  # false negatives only
    extra = target.clone()
    extra[1, 40:50, 40:50] = True  # false positives only
    predicted = torch.stack([missed[0], extra[1], target[2]])  # the third is perfect
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        coords, labels = prompt_sim.corrective_clicks(predicted, target, generator)
        x, y = coords[:, 0, 0].long(), coords[:, 0, 1].long()
        assert labels[:, 0].tolist() == [1, 0, prompt_sim.PAD_LABEL]
        error = predicted ^ target
        assert error[0, y[0], x[0]] and error[1, y[1], x[1]]


def test_mixed_errors_get_the_polarity_of_the_clicked_pixel() -> None:
    target = blobs(1)
    predicted = torch.zeros_like(target)
    predicted[0, 0:12, 0:20] = True  # partly object, partly background
    generator = torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(40):
        coords, labels = prompt_sim.corrective_clicks(predicted, target, generator)
        x, y = int(coords[0, 0, 0]), int(coords[0, 0, 1])
        assert bool(predicted[0, y, x] ^ target[0, y, x])
        assert labels[0, 0] == int(target[0, y, x])
        seen.add(int(labels[0, 0]))
    assert seen == {0, 1}


# -- losses ---------------------------------------------------------------------------------------


def test_perfect_prediction_has_lower_loss_than_a_bad_one() -> None:
    targets = blobs(4)[:, None].float()
    perfect = (targets * 2 - 1) * 12
    bad = -perfect
    assert (focal_loss(perfect, targets) < focal_loss(bad, targets)).all()
    assert (dice_loss(perfect, targets) < dice_loss(bad, targets)).all()
    assert mask_iou(perfect, targets).min() == 1.0 and mask_iou(bad, targets).max() == 0.0
    good = sam_loss(perfect, torch.ones(4, 1), targets)
    worse = sam_loss(bad, torch.ones(4, 1), targets)
    assert good.total < 0.05 < worse.total
    assert good.iou == 1.0


def test_multimask_loss_trains_only_the_best_candidate() -> None:
    targets = blobs(2)[:, None].float()
    perfect = (targets * 2 - 1) * 12
    wrong = torch.full_like(perfect, -12.0)
    candidates = torch.cat([wrong, perfect, wrong * -1], dim=1).requires_grad_(True)
    scores = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    parts = sam_loss(candidates, scores, targets)
    single = sam_loss(perfect, torch.ones(2, 1), targets)
    assert parts.iou == 1.0
    assert parts.focal.item() == pytest.approx(single.focal.item(), abs=1e-7)
    assert parts.dice.item() == pytest.approx(single.dice.item(), abs=1e-7)
    parts.total.backward()
    grad = candidates.grad.flatten(2).abs().sum(dim=2)  # the IoU target carries no gradient
    assert (grad[:, 0] == 0).all() and (grad[:, 2] == 0).all() and (grad[:, 1] > 0).all()


def test_focal_weight_ramps_up_to_sams_ratio() -> None:
    assert focal_ramp(0, 100) == 0.0
    assert focal_ramp(50, 100) == pytest.approx(FOCAL_WEIGHT / 2)
    assert focal_ramp(100, 100) == focal_ramp(10**6, 100) == FOCAL_WEIGHT == 20.0
    assert focal_ramp(0, 0) == FOCAL_WEIGHT


def test_per_object_focal_normalisation_weighs_small_objects_up() -> None:
    targets = torch.zeros((1, 1, 64, 64))
    targets[..., 30:33, 30:33] = 1.0  # 9 pixels
    logits = torch.zeros((1, 1, 64, 64))
    per_image = focal_loss(logits, targets)
    per_object = focal_loss(logits, targets, window=16.0)
    assert per_object.item() == pytest.approx(per_image.item() * 64 * 64 / (9 * 16), rel=1e-5)
    large = torch.ones((1, 1, 64, 64))
    assert focal_loss(logits, large, window=16.0).item() == pytest.approx(focal_loss(logits, large).item())


def test_schedule_warms_up_then_decays() -> None:
    schedule = WarmupCosine(warmup=10, total=110, floor=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)


def test_a_restarted_schedule_keeps_its_first_cycle_and_warms_up_again_from_the_floor() -> None:
    first = WarmupCosine(warmup=10, total=110, floor=0.1)
    schedule = WarmupCosine(warmup=10, total=110, floor=0.1)
    schedule.restart(at=110, peak=0.5, total=210)
    assert [schedule(step) for step in range(110)] == [first(step) for step in range(110)]
    assert 0.1 < schedule(111) < schedule(115) < schedule(119) == pytest.approx(0.5)
    assert schedule(165) == pytest.approx(0.3)
    assert schedule(210) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="restart"):
        schedule.restart(at=210, peak=0.05, total=300)  # a peak under the floor
    with pytest.raises(ValueError, match="restart"):
        schedule.restart(at=100, peak=0.5, total=300)  # inside the last cycle
    two_cycles = [schedule(step) for step in range(210)]
    schedule.restart(at=210, peak=0.3, total=310)  # a third cycle leaves the first two as they were
    assert [schedule(step) for step in range(210)] == two_cycles
    assert schedule(209) == pytest.approx(0.1, abs=1e-3) and schedule(219) == pytest.approx(0.3)
    assert schedule(310) == pytest.approx(0.1)


# -- architecture ---------------------------------------------------------------------------------


def test_micro_v1_is_recognised_small_and_fast_enough_to_build(tmp_path) -> None:
    model = build_sam("micro_v1")
    assert model.img_size == 512
    assert infer_architecture(model.state_dict()) == "micro_v1"
    path = export_weights(model, tmp_path / "micro_v1.pt")
    assert path.stat().st_size <= 25e6
    loaded = samcore.load_model(checkpoint=path)
    assert loaded.architecture == "micro_v1"
    for key, value in loaded.state_dict().items():
        assert value.dtype == model.state_dict()[key].dtype
        torch.testing.assert_close(value, model.state_dict()[key].half().to(value.dtype))


def test_micro_encoder_serves_the_predictor_on_any_image_shape(tiny_arch: str) -> None:
    model = build_sam(tiny_arch)
    predictor = samcore.Predictor(model)
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (40, 70), dtype=np.uint8))
    embedding = predictor.get_image_embedding()
    assert tuple(embedding.shape) == (1, 256, 4, 4)
    prompts = Prompts(torch.tensor([[[20.0, 10.0]]]), torch.tensor([[1]]), None)
    with torch.no_grad():
        low_res, scores = decode(model, embedding, prompts, multimask=True)
    assert low_res.shape == (1, 3, 16, 16) and scores.shape == (1, 3)


@pytest.mark.parametrize("side", [8, 20])  # a window (plain products) and a whole grid (fused kernel)
def test_micro_attention_matches_the_fused_kernel_and_trains(side: int) -> None:
    torch.manual_seed(0)
    attention = SelfAttention(dim=32, num_heads=4)
    x = torch.randn(3, side, side, 32, requires_grad=True)
    qkv = attention.qkv(x).reshape(3, side * side, 3, 4, 8).permute(2, 0, 3, 1, 4)
    fused = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    expected = attention.proj(fused.transpose(1, 2).reshape(3, side, side, 32))
    out = attention(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert x.grad is not None and attention.qkv.weight.grad.abs().sum() > 0


def test_the_micro_encoder_gives_the_same_embedding_for_any_input_layout(tiny_arch: str) -> None:
    encoder = build_sam(tiny_arch).eval().image_encoder
    x = torch.randn(2, 3, encoder.img_size, encoder.img_size)
    with torch.inference_mode():
        plain = encoder(x)
        channels_last = encoder(x.contiguous(memory_format=torch.channels_last))
        strided = encoder(x.permute(0, 1, 3, 2).contiguous().transpose(2, 3))  # same values, other strides
    torch.testing.assert_close(channels_last, plain)
    torch.testing.assert_close(strided, plain)


def test_a_stride_8_micro_encoder_gives_a_finer_grid_the_predictor_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    config = MicroConfig(**{**TINY_MICRO.__dict__, "stride": 8})
    monkeypatch.setitem(ARCHITECTURES, "micro_stride8_test", config)
    model = build_sam("micro_stride8_test").eval()
    assert model.prompt_encoder.image_embedding_size == (8, 8)
    predictor = samcore.Predictor(model)
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    assert tuple(predictor.get_image_embedding().shape) == (1, 256, 8, 8)
    masks, scores, low_res = predictor.predict(box=np.array([10, 12, 40, 44]), multimask_output=False)
    assert masks.shape == (1, 64, 64) and low_res.shape == (1, 32, 32)
    with pytest.raises(ValueError, match="stride"):
        MicroConfig(stride=4).build()


def test_the_dense_head_adds_a_loss_that_trains_the_encoder(tiny_arch: str) -> None:
    model = build_sam(tiny_arch).train()
    head = DenseHead(model)
    assert [name for name, _ in head.named_parameters()] == ["project.weight", "project.bias"]
    batch = make_batch(0, 0, scenes=1, objects=2, size=64)
    assert batch.regions.shape == (1, 2, 64, 64) and batch.regions[:, 0].any()
    generator = torch.Generator().manual_seed(0)
    plain = interactive_step(model, batch, True, 0, generator, 32)
    generator = torch.Generator().manual_seed(0)
    dense = interactive_step(model, batch, True, 0, generator, 32, dense_head=head, dense_weight=2.0)
    assert float(plain.regions) == 0.0 and float(dense.regions) > 0.0
    expected = float(plain.loss.detach()) + 2.0 * float(dense.regions)
    assert float(dense.loss.detach()) == pytest.approx(expected, rel=1e-5)
    dense.loss.backward()
    assert head.project.weight.grad is not None and head.project.weight.grad.abs().sum() > 0
    assert model.mask_decoder.output_upscaling[0].weight.grad is not None


def test_scenes_smaller_than_the_model_input_are_encoded_without_padding(tiny_arch: str) -> None:
    model = build_sam(tiny_arch).eval()
    scenes = torch.rand((2, 3, 32, 32)) * 255
    with torch.no_grad():
        corner = encode(model, scenes)
        padded = model.image_encoder(model.preprocess(scenes))
        assert corner.shape == (2, 256, 2, 2) and padded.shape == (2, 256, 4, 4)
        prompts = Prompts(None, None, torch.tensor([[4.0, 4.0, 20.0, 24.0], [0.0, 0.0, 31.0, 31.0]]))
        low_res, scores = decode(model, corner, prompts, multimask=False)
    assert low_res.shape == (2, 1, 8, 8) and scores.shape == (2, 1)
    assert upscale(model, low_res, 32).shape == (2, 1, 32, 32)
    assert upscale(model, low_res, 32, out=16).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="do not fit"):
        encode(model, torch.rand((1, 3, 40, 40)))



def test_an_unpadded_embedding_can_stand_anywhere_in_the_positional_grid(tiny_arch: str) -> None:
    model = build_sam(tiny_arch).eval()
    corner = torch.randn((1, 256, 2, 2))
    prompts = Prompts(torch.tensor([[[5.0, 9.0]]]), torch.tensor([[1]]), torch.tensor([[2.0, 3.0, 12.0, 14.0]]))
    stride = model.img_size // model.prompt_encoder.image_embedding_size[0]
    with torch.no_grad():
        shifted, shifted_scores = decode(model, corner, prompts, multimask=True, offset=(1, 2))
        # The same decoding spelt out: prompts moved by (2, 1) tokens in (x, y), the grid's (1, 2) window.
        shift = torch.tensor([2.0 * stride, 1.0 * stride])
        sparse, dense = model.prompt_encoder((prompts.coords + shift, prompts.labels), prompts.boxes + shift.repeat(2), None)
        image_pe = model.prompt_encoder.get_dense_pe()[..., 1:3, 2:4]
        expected, expected_scores = model.mask_decoder(corner, image_pe, sparse, dense[..., :2, :2], True)
        at_corner, _ = decode(model, corner, prompts, multimask=True)
    torch.testing.assert_close(shifted, expected)
    torch.testing.assert_close(shifted_scores, expected_scores)
    assert not torch.allclose(shifted, at_corner)
    with pytest.raises(ValueError, match="does not fit"):
        decode(model, corner, prompts, multimask=True, offset=(3, 0))
    generator = torch.Generator().manual_seed(0)
    drawn = {random_offset(model, corner, generator) for _ in range(200)}
    assert drawn == {(row, column) for row in range(3) for column in range(3)}


# -- loop -----------------------------------------------------------------------------------------


def test_loss_decreases_when_overfitting_a_fixed_batch(tiny_arch: str, tmp_path) -> None:
    settings = tiny_settings(total_steps=40, lr=2e-3, warmup=4, save_every=1000)
    result = train(settings, tmp_path, repeat_batches=1, export=False, log=quiet)
    losses = [entry["loss"] for entry in result.history]
    assert len(losses) == 40 and result.step == 40
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8])
    ious = [entry["iou_last"] for entry in result.history]
    assert np.mean(ious[-8:]) > np.mean(ious[:8])


def test_resume_continues_at_the_same_step_with_the_same_loss(tiny_arch: str, tmp_path) -> None:
    settings = tiny_settings()
    straight = train(settings, tmp_path / "straight", export=False, log=quiet)
    first = train(settings, tmp_path / "split", stop_at=3, export=False, log=quiet)
    assert first.step == 3 and len(first.history) == 3
    resumed = train(TrainSettings(), tmp_path / "split", resume=True, export=False, log=quiet)
    assert resumed.settings == settings  # the stored settings win over the ones passed
    assert resumed.history[0]["step"] == 4
    for a, b in zip(straight.history[3:], resumed.history):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)


def test_an_extended_run_continues_past_its_schedule_with_a_restarted_learning_rate(
    tiny_arch: str, tmp_path
) -> None:
    finished = train(tiny_settings(), tmp_path, export=False, log=quiet)
    extended = train(
        TrainSettings(), tmp_path, resume=True, extend=6, restart_peak=0.5, export=False, log=quiet
    )
    assert extended.settings.total_steps == 12 and extended.settings.restarts == ((6, 0.5),)
    assert [entry["step"] for entry in extended.history] == [7, 8, 9, 10, 11, 12]
    rates = [entry["lr"] for entry in extended.history]
    floor = finished.settings.lr * finished.settings.lr_floor
    assert floor < rates[0] < rates[1] and max(rates) == pytest.approx(0.5e-3) and rates[-1] < max(rates)
    assert all(np.isfinite(entry["loss"]) for entry in extended.history)
    again = train(
        TrainSettings(), tmp_path, resume=True, extend=4, restart_peak=0.25, export=False, log=quiet
    )
    assert again.settings.restarts == ((6, 0.5), (12, 0.25)) and again.settings.total_steps == 16
    rates = [entry["lr"] for entry in again.history]
    assert floor < rates[0] and max(rates) == pytest.approx(0.25e-3)
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_settings(), tmp_path / "new", extend=2, export=False, log=quiet)


def test_a_run_can_start_from_the_weights_of_another(tiny_arch: str, tmp_path) -> None:
    first = train(tiny_settings(total_steps=2), tmp_path / "first", log=quiet)
    start = torch.load(first.export, weights_only=True)
    # A learning rate this small leaves the started weights as they were loaded.
    second = train(tiny_settings(total_steps=1, lr=1e-12, init=str(first.export)), tmp_path / "second", log=quiet)
    assert second.settings.init == str(first.export)
    notes = json.loads(second.export.with_suffix(".json").read_text())
    assert notes["started_from"]["weights"] == str(first.export)
    assert notes["started_from"]["notes"]["steps"] == 2 and notes["steps_in_all"] == 3
    finish = torch.load(second.export, weights_only=True)
    assert start.keys() == finish.keys()
    for name in start:
        torch.testing.assert_close(finish[name], start[name], rtol=1e-3, atol=1e-4)
    fresh = train(tiny_settings(total_steps=1, lr=1e-12), tmp_path / "fresh", log=quiet)
    assert not torch.equal(torch.load(fresh.export, weights_only=True)["mask_decoder.iou_token.weight"],
                           start["mask_decoder.iou_token.weight"])
    with pytest.raises(ValueError, match="micro_v1"):  # the bundled model is another architecture
        train(tiny_settings(init="default"), tmp_path / "wrong", log=quiet)


def test_a_new_run_refuses_to_overwrite_an_old_one(tiny_arch: str, tmp_path) -> None:
    train(tiny_settings(total_steps=1), tmp_path, export=False, log=quiet)
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_settings(total_steps=1), tmp_path, export=False, log=quiet)
    with pytest.raises(FileNotFoundError):
        train(tiny_settings(), tmp_path / "empty", resume=True, log=quiet)


def test_command_line_trains_exports_and_the_export_loads(tiny_arch: str, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main([
        "--out", str(out), "--arch", tiny_arch, "--steps", "2", "--size", "64", "--loss-size", "32",
        "--scenes", "1", "--objects", "2", "--warmup", "1", "--log-every", "1", "--eval-every", "0",
        "--geometry-steps", "0",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "step 2/2" in printed and "steps/s" in printed and "train IoU" in printed
    exported = out / f"{tiny_arch}.pt"
    state = torch.load(exported, weights_only=True)
    assert all(key.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for key in state)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert infer_architecture(state) == tiny_arch
    model = samcore.load_model(checkpoint=exported)
    assert model.architecture == tiny_arch and next(model.parameters()).dtype == torch.float32
    assert (out / "last.pt").exists() and (out / "log.jsonl").exists()
    notes = json.loads(exported.with_suffix(".json").read_text(encoding="utf-8"))
    assert notes["steps"] == 2 and notes["architecture"] == tiny_arch and notes["train_seconds"] > 0


# -- geometry warm-up -----------------------------------------------------------------------------


def test_warm_up_ellipses_match_their_parameters_and_prompts() -> None:
    generator = torch.Generator().manual_seed(0)
    masks, params, extent = ellipses(64, 16, 8, generator)
    assert masks.shape == (64, 64, 64) and masks.flatten(1).any(dim=1).all()
    cell_area = (128 / 64) ** 2
    expected = np.pi * params[:, 2] * params[:, 3] / cell_area
    large = expected > 50
    assert large.sum() > 10
    ratio = masks.flatten(1).sum(dim=1)[large].float() / expected[large]
    assert ((ratio > 0.85) & (ratio < 1.15)).all()
    clicks = geometry_prompts(params, extent, use_box=False, generator=generator).coords[:, 0]
    cells = (clicks / 2).long().clamp(0, 63)
    assert masks[torch.arange(64), cells[:, 1], cells[:, 0]].float().mean() > 0.95
    boxes = geometry_prompts(params, extent, use_box=True, generator=generator).boxes
    tight = torch.cat([params[:, :2] - extent, params[:, :2] + extent], dim=1)
    relative = (boxes - tight).abs() / extent.repeat(1, 2)
    assert 0.02 < float(relative.mean()) < 0.15  # noisy by about a tenth of the object, as users draw
    cells = 64  # every ellipse lies inside its tight box
    pixel = (torch.arange(cells) + 0.5) * 2
    inside_x = (pixel[None, :] >= tight[:, 0, None] - 2) & (pixel[None, :] <= tight[:, 2, None] + 2)
    inside_y = (pixel[None, :] >= tight[:, 1, None] - 2) & (pixel[None, :] <= tight[:, 3, None] + 2)
    assert not (masks & ~(inside_y[:, :, None] & inside_x[:, None, :])).any()


def test_geometry_warm_up_trains_only_the_prompt_side(tiny_arch: str) -> None:
    torch.manual_seed(0)
    model = build_sam(tiny_arch)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    history = pretrain_decoder(model, steps=4, seed=0, count=4, log=quiet)
    assert len(history) == 4
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, before[key])}
    assert changed and all(key.startswith(("mask_decoder.", "prompt_encoder.")) for key in changed)


def test_geometry_warm_up_learns_to_follow_the_prompt(tiny_arch: str) -> None:
    torch.manual_seed(0)
    model = build_sam(tiny_arch)
    history = pretrain_decoder(model, steps=220, seed=0, count=16, log=quiet)
    assert np.mean(history[-20:]) > np.mean(history[:20]) + 0.1


def test_a_run_warms_the_decoder_up_once_not_again_on_resume(tiny_arch: str, tmp_path) -> None:
    lines: list[str] = []
    settings = tiny_settings(total_steps=4, geometry_steps=3)
    train(settings, tmp_path, stop_at=2, export=False, log=lines.append)
    assert any("geometry" in line for line in lines)
    lines.clear()
    resumed = train(settings, tmp_path, resume=True, export=False, log=lines.append)
    assert resumed.step == 4 and not any("geometry" in line for line in lines)


def test_export_only_writes_the_weights_of_an_unfinished_run(tiny_arch: str, tmp_path, capsys) -> None:
    train(tiny_settings(), tmp_path, stop_at=3, export=False, log=quiet)
    assert main(["--out", str(tmp_path), "--export-only"]) == 0
    assert "loads with samcore.load_model" in capsys.readouterr().out
    notes = json.loads((tmp_path / f"{tiny_arch}.json").read_text(encoding="utf-8"))
    assert notes["steps"] == 3 and notes["device"] == "cpu" and notes["train_seconds"] > 0
    assert samcore.load_model(checkpoint=tmp_path / f"{tiny_arch}.pt").architecture == tiny_arch
    assert main(["--out", str(tmp_path / "nothing"), "--export-only"]) == 1


def test_a_larger_validation_set_starts_with_the_one_validated_during_training(
    tiny_arch: str, tmp_path, capsys
) -> None:
    small = make_eval_batches(64, objects=2, scenes=3)
    large = make_eval_batches(64, objects=2, scenes=len(EVAL_FAMILIES) + 2)
    assert sum(len(batch.families) for batch in large) == len(EVAL_FAMILIES) + 2
    assert large[-1].families[-1] == EVAL_FAMILIES[1]  # the families cycle
    for a, b in zip(small, large):
        assert torch.equal(a.images[: len(a.families)], b.images[: len(a.families)])
        assert a.families == b.families[: len(a.families)]
    with pytest.raises(ValueError, match="at least one scene"):
        make_eval_batches(64, scenes=0)
    train(tiny_settings(), tmp_path, stop_at=2, export=False, log=quiet)
    assert main(["--out", str(tmp_path), "--eval-only", "--eval-scenes", "3"]) == 0
    printed = capsys.readouterr().out
    assert "3 validation scenes" in printed and "box IoU" in printed and "point IoU" in printed
    assert main(["--out", str(tmp_path / "nothing"), "--eval-only"]) == 1


def test_settings_saved_with_a_single_restart_load_as_a_list_of_restarts() -> None:
    old = {**tiny_settings().to_dict(), "restart_at": 6, "restart_peak": 0.5}
    old.pop("restarts")
    assert TrainSettings.from_dict(old).restarts == ((6, 0.5),)
    assert TrainSettings.from_dict({**old, "restart_at": 0}).restarts == ()
    saved = json.loads(json.dumps(tiny_settings(restarts=((6, 0.5), (9, 0.25))).to_dict()))  # tuples become lists
    assert TrainSettings.from_dict(saved).restarts == ((6, 0.5), (9, 0.25))
    with pytest.raises(ValueError, match="increasing steps"):
        tiny_settings(restarts=((9, 0.5), (6, 0.5)))
