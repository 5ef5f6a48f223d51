"""The model's own mask decoder, every prompt at once (how a GPU decodes), against the CPU's rewrite
one prompt at a time: the same masks and scores for every kind of prompt."""

import numpy as np
import pytest
import torch
from weights import randomize_

from samcore import Predictor, build_sam


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = randomize_(build_sam("vit_test").eval(), seed=4)
    image = np.random.default_rng(5).integers(0, 256, size=(150, 220, 3), dtype=np.uint8)
    predictors = []
    for batched in (False, True):
        predictor = Predictor(model, precision="fp32", views=2, refine=False)
        predictor._decodes_in_batches = batched
        predictor.set_image(image)
        predictors.append(predictor)
    return predictors


PROMPTS = {
    "point": {"point_coords": np.array([[60.0, 70.0]]), "point_labels": np.array([1])},
    "points": {"point_coords": np.array([[60.0, 70.0], [150.0, 40.0]]), "point_labels": np.array([1, 0])},
    "box": {"box": np.array([30.0, 40.0, 120.0, 110.0])},
    "box and point": {"box": np.array([30.0, 40.0, 120.0, 110.0]), "point_coords": np.array([[50.0, 60.0]]),
                      "point_labels": np.array([0])},
}


@pytest.mark.parametrize("name", list(PROMPTS))
@pytest.mark.parametrize("refine", [False, True])
def test_every_prompt_decodes_alike_one_at_a_time_and_all_at_once(pair, name, refine):
    one_at_a_time, all_at_once = pair
    assert not one_at_a_time.decodes_in_batches and all_at_once.decodes_in_batches
    for multimask in (True, False):
        expected = one_at_a_time.predict(**PROMPTS[name], multimask_output=multimask, refine=refine,
                                          return_logits=True)
        got = all_at_once.predict(**PROMPTS[name], multimask_output=multimask, refine=refine, return_logits=True)
        for mine, theirs in zip(got, expected):
            np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=2e-4)
    # The low-resolution logits back as a mask input, with the prompts and alone.
    low_res = expected[2][:1]
    for prompts in (PROMPTS[name], {}):
        expected = one_at_a_time.predict(**prompts, mask_input=low_res, multimask_output=False, return_logits=True)
        got = all_at_once.predict(**prompts, mask_input=low_res, multimask_output=False, return_logits=True)
        for mine, theirs in zip(got, expected):
            np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=2e-4)


def test_a_batch_of_points_decodes_alike(pair):
    one_at_a_time, all_at_once = pair
    points = torch.tensor([[[20.0, 30.0]], [[100.0, 90.0]], [[200.0, 140.0]]])
    labels = torch.ones(3, 1, dtype=torch.int64)
    expected = one_at_a_time.predict_low_res(points, labels, multimask_output=True, views=1)
    got = all_at_once.predict_low_res(points, labels, multimask_output=True, views=1)
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=2e-4)


def test_a_cpu_decodes_one_prompt_at_a_time():
    assert not Predictor(build_sam("vit_test"), precision="fp32").decodes_in_batches
