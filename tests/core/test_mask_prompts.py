"""Prompts for the next slice, made from a mask: boxes, interior and surrounding points, mask inputs."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from samcore import Predictor, build_sam
from samcore.mask_prompts import bounding_box, interior_points, main_part, prompt_from_mask, surrounding_points
from samcore.logits import upscale_logits
from samcore.slice_decoder import StackDecoder


def disk(shape, center, radius):
    yy, xx = np.indices(shape)
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_box_is_xyxy_widened_and_clipped():
    mask = np.zeros((20, 30), bool)
    mask[5:11, 3:9] = True
    np.testing.assert_array_equal(bounding_box(mask), [3, 5, 8, 10])
    np.testing.assert_array_equal(bounding_box(mask, margin=0.5), [0, 2, 11, 13])
    with pytest.raises(ValueError, match="empty mask"):
        bounding_box(np.zeros((4, 4), bool))


def test_interior_points_are_deep_inside_each_lobe():
    one = disk((40, 60), (20, 20), 8)
    (point,) = interior_points(one, 3)  # a disk has one deepest region
    np.testing.assert_allclose(point, [20, 20])
    lobes = one | disk((40, 60), (20, 42), 8)
    lobes[19:22, 20:42] = True  # a thin bridge
    points = interior_points(lobes, 3)
    assert len(points) == 2 and {round(x) for x, _ in points} == {20, 42}
    assert all(lobes[int(y), int(x)] for x, y in points)
    assert len(interior_points(np.zeros((5, 5), bool), 3)) == 0


def test_surrounding_points_ring_the_mask_at_a_distance():
    mask = disk((60, 60), (30, 30), 9)
    points = surrounding_points(mask, 4, distance=4)
    assert len(points) == 4
    away = ndimage.distance_transform_edt(~mask)
    for x, y in points:
        assert 4 <= away[int(y), int(x)] < 5.5
    near_edge = disk((60, 60), (30, 3), 3)  # the ring leaves the image on the left
    assert len(surrounding_points(near_edge, 4, distance=4)) == 3


def test_each_mode_makes_its_prompt():
    mask = disk((40, 40), (20, 20), 6)
    assert prompt_from_mask("box", mask).structure() == (False, True, False, False)
    with_mask = prompt_from_mask("box+mask", mask, np.zeros((1, 16, 16)))
    assert with_mask.structure() == (False, True, True, False)
    points = prompt_from_mask("points", mask)
    assert points.labels.tolist().count(1) >= 1 and points.labels.tolist().count(0) == 4
    with pytest.raises(ValueError, match="low-resolution logits"):
        prompt_from_mask("box+mask", mask)
    with pytest.raises(ValueError, match="Unknown propagation mode"):
        prompt_from_mask("lasso", mask)


def test_the_main_part_drops_specks_and_keeps_large_pieces():
    body = disk((60, 60), (20, 20), 8)
    second = disk((60, 60), (45, 45), 5)  # 81 px against 197: a real piece
    speck = np.zeros((60, 60), bool)
    speck[55:57, 2:4] = True
    np.testing.assert_array_equal(main_part(body | second | speck), body | second)
    np.testing.assert_array_equal(main_part(body), body)
    assert not main_part(np.zeros((5, 5), bool)).any()


@pytest.mark.parametrize("mode", ["box", "box+mask", "points"])
def test_a_stray_speck_does_not_move_the_prompt(mode):
    mask = disk((80, 80), (20, 20), 7)
    specked = mask.copy()
    specked[75, 70] = True  # one stray pixel far away, as SAM's masks often have
    low_res = np.zeros((1, 16, 16))
    clean, noisy = prompt_from_mask(mode, mask, low_res), prompt_from_mask(mode, specked, low_res)
    if mode == "points":
        np.testing.assert_array_equal(noisy.points, clean.points)
    else:
        np.testing.assert_array_equal(noisy.box, clean.box)


def test_a_mask_input_from_a_mask_maps_back_onto_it():
    torch.manual_seed(0)
    predictor = Predictor(build_sam("vit_test").eval(), precision="fp32")
    stack = np.zeros((2, 90, 140), np.uint16)  # not square: the model input is padded below
    decoder = StackDecoder(predictor, stack)
    mask = disk((90, 140), (50, 90), 20)
    logits = decoder.logits_from_mask(mask)
    assert logits.shape == (1, *predictor.model.prompt_encoder.mask_input_size)
    model = predictor.model
    input_size = (int(90 * model.img_size / 140 + 0.5), model.img_size)
    back = upscale_logits(torch.as_tensor(logits)[None], model.img_size, input_size, (90, 140))[0, 0] > 0
    overlap = (back.numpy() & mask).sum() / (back.numpy() | mask).sum()
    assert overlap > 0.9
