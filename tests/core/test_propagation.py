"""Propagation through a stack: its rules on a stand-in model that knows the true objects, and its
mechanics through the real predictor with a tiny random-weight model."""

import threading

import numpy as np
import pytest
import torch
from scipy import ndimage

from samcore import Predictor, build_sam
from samcore.build import MicroConfig
from samcore.embeddings import EmbeddingStore, StackView, model_key, stack_key
from samcore.mask_prompts import MODES
from samcore.propagation import (
    PropagationSettings,
    Run,
    iou,
    plan_runs,
    propagate,
    propagate_iter,
)
from samcore.progress import run
from samcore.slice_decoder import SliceOutput, StackDecoder

SHAPE = (24, 48, 48)


def ellipsoid(center, radii, shape=SHAPE):
    grids = np.indices(shape)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) <= 1


class Oracle:
    """Stands in for the model: a prompt on slice z gets the true object under it.

    A box (with a mask input, the part of the box the mask covers) selects the object with the most
    pixels in it; points select the object under most positive points. The mask logits are 1 plus
    the depth inside the object, -1 outside; with `leak`, the mask reaches `leak` pixels beyond the
    object and its logits fall with the distance from it. With `speck`, every mask also holds that
    (y, x) pixel, as SAM's masks often hold a stray speck far from the object. The stack's
    intensities are `image`; by default the objects are bright (100) on a dim background (10).
    """

    def __init__(self, truth, score=0.95, low_score_slices=(), leak=0, speck=None, image=None):
        self.truth, self.shape = truth, truth.shape
        self.score, self.low_score_slices, self.leak = score, set(low_score_slices), leak
        self.speck = speck
        self.image = np.where(truth > 0, 100.0, 10.0) if image is None else image
        self.embedded, self.calls = set(), []

    def intensities(self, z):
        return np.asarray(self.image[z], dtype=np.float32)

    def has_embedding(self, z):
        return z in self.embedded

    def embed(self, z):
        self.embedded.add(z)

    def logits_from_mask(self, mask):
        return np.where(mask, 1.0, -1.0)[None].astype(np.float32)

    def decode(self, z, prompts):
        self.calls.append((z, len(prompts)))
        return [self._answer(z, prompt) for prompt in prompts]

    def _answer(self, z, prompt):
        plane = self.truth[z]
        if prompt.box is not None:
            x0, y0, x1, y1 = np.round(prompt.box).astype(int)
            votes = np.zeros_like(plane)
            votes[y0 : y1 + 1, x0 : x1 + 1] = plane[y0 : y1 + 1, x0 : x1 + 1]
            if prompt.mask_input is not None:
                votes[prompt.mask_input[0] <= 0] = 0
            votes = votes[votes > 0]
        else:
            positive = prompt.points[prompt.labels == 1]
            votes = np.array([plane[int(round(y)), int(round(x))] for x, y in positive])
            votes = votes[votes > 0]
        chosen = np.bincount(votes).argmax() if len(votes) else 0
        mask = (plane == chosen) if chosen else np.zeros(plane.shape, bool)
        if mask.any():
            inside = ndimage.distance_transform_edt(mask)
            outside = ndimage.distance_transform_edt(~mask)
            spill = np.where(outside <= self.leak, 0.5 * (self.leak + 1 - outside), -1.0)
            logits = np.where(mask, 1.0 + inside, spill)
            if self.speck is not None:
                logits[self.speck] = 1.0
        else:
            logits = -np.ones(plane.shape)
        score = 0.1 if z in self.low_score_slices else self.score
        return SliceOutput(logits.astype(np.float32), score, (logits > 0)[None].astype(np.float32))


def seeded(truth, keys):
    """Labels holding the true objects on their key slices only: {object id: [slices]}."""
    labels = np.zeros_like(truth)
    for object_id, slices in keys.items():
        for z in slices:
            labels[z][truth[z] == object_id] = object_id
    return labels


@pytest.fixture
def two_nuclei():
    truth = np.zeros(SHAPE, np.uint16)
    truth[ellipsoid((8, 14, 14), (6, 9, 8))] = 1
    truth[ellipsoid((14, 33, 32), (8, 10, 11))] = 2
    return truth


# -- the rules, on the stand-in model ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_objects_are_recovered_from_one_slice_each(two_nuclei, mode):
    labels = seeded(two_nuclei, {1: [8], 2: [14]})
    result = run(propagate_iter(Oracle(two_nuclei), labels, settings=PropagationSettings(mode=mode)))
    for object_id in (1, 2):
        assert iou(result.labels == object_id, two_nuclei == object_id) > 0.9
    # Nothing beyond the objects' ends, and each run ended at an end of its object.
    assert not (result.labels.astype(bool) & ~two_nuclei.astype(bool)).any()
    assert {(stop.object_id, stop.direction) for stop in result.stops} == {(1, -1), (1, 1), (2, -1), (2, 1)}
    for stop in result.stops:
        extent = np.flatnonzero((two_nuclei == stop.object_id).any(axis=(1, 2)))
        assert extent[0] - 1 <= stop.z <= extent[0] + 2 or extent[-1] - 2 <= stop.z <= extent[-1] + 1


@pytest.mark.parametrize("mode", MODES)
def test_stray_specks_neither_steer_the_prompts_nor_reach_the_labels(two_nuclei, mode):
    labels = seeded(two_nuclei, {1: [8], 2: [14]})
    oracle = Oracle(two_nuclei, speck=(SHAPE[1] - 1, SHAPE[2] - 1))  # the far corner
    result = run(propagate_iter(oracle, labels, settings=PropagationSettings(mode=mode)))
    for object_id in (1, 2):
        assert iou(result.labels == object_id, two_nuclei == object_id) > 0.9
    assert not (result.labels.astype(bool) & ~two_nuclei.astype(bool)).any()


def test_stops_where_another_object_continues_the_column():
    truth = np.zeros(SHAPE, np.uint16)
    column = ellipsoid((0, 24, 24), (1e6, 10, 10))  # a cylinder through the whole stack
    truth[column & (np.arange(24) < 12)[:, None, None]] = 1
    truth[ellipsoid((0, 24, 30), (1e6, 6, 6)) & (np.arange(24) >= 12)[:, None, None]] = 2
    labels = seeded(truth, {1: [5]})
    # A box covers the other object's pixels, so the IoU rule must stop it (points would find none).
    result = run(propagate_iter(Oracle(truth), labels, settings=PropagationSettings(mode="box+mask")))
    assert result.filled[1] == (*range(0, 5), *range(6, 12))
    (stop,) = result.stops
    assert (stop.direction, stop.z, stop.reason) == (1, 12, "iou") and stop.value < 0.5
    assert not (result.labels == 2).any()


def test_a_low_predicted_iou_ends_the_object(two_nuclei):
    labels = seeded(two_nuclei, {1: [8]})
    result = run(propagate_iter(Oracle(two_nuclei, low_score_slices=[11]), labels))
    assert max(result.filled[1]) == 10
    assert any(stop.reason == "score" and stop.z == 11 for stop in result.stops)
    relaxed = PropagationSettings(min_score=0.0)
    result = run(propagate_iter(Oracle(two_nuclei, low_score_slices=[11]), labels, settings=relaxed))
    assert 11 in result.filled[1]


def test_tiny_masks_end_the_object(two_nuclei):
    labels = seeded(two_nuclei, {1: [8]})
    result = run(propagate_iter(Oracle(two_nuclei), labels, settings=PropagationSettings(min_area=100)))
    areas = (result.labels == 1).sum(axis=(1, 2))
    assert areas[areas > 0].min() >= 100
    assert any(stop.reason == "small" for stop in result.stops)


def test_the_z_range_limits_the_propagation(two_nuclei):
    labels = seeded(two_nuclei, {1: [8], 2: [14]})
    settings = PropagationSettings(z_range=(6, 15))
    result = run(propagate_iter(Oracle(two_nuclei), labels, settings=settings))
    touched = np.flatnonzero(result.labels.any(axis=(1, 2)))
    assert touched.min() == 6 and touched.max() == 15
    assert all(stop.reason != "range" for stop in result.stops)
    with pytest.raises(ValueError, match="not on any slice between 15 and 20"):
        propagate_iter(Oracle(two_nuclei), labels, [1], PropagationSettings(z_range=(15, 20)))
    with pytest.raises(ValueError, match="outside the stack's 24 slices"):
        propagate_iter(Oracle(two_nuclei), labels, settings=PropagationSettings(z_range=(0, 30)))


def test_plan_splits_each_gap_between_its_two_key_slices():
    assert plan_runs([9, 3, 8, 15], (0, 19)) == [
        Run(3, -1, 0),
        Run(3, +1, 5, 2), Run(8, -1, 6, 1),  # 4 slices between: 2 from each end
        Run(9, +1, 12, 4), Run(15, -1, 13, 3),  # 5 slices: the middle one from below
        Run(15, +1, 19),
    ]
    assert plan_runs([4, 6], (0, 10))[1:3] == [Run(4, +1, 5, 2), Run(6, -1, 6, 1)]  # nothing left for 6
    assert plan_runs([2, 30], (5, 10)) == []  # no key slice in the range


def test_walls_split_the_plan_and_no_run_reaches_or_crosses_them():
    assert plan_runs([3, 15], (0, 19), walls=[9, 17, 15]) == [  # 15 is a key slice: not a wall
        Run(3, -1, 0),
        Run(3, +1, 8),  # the gap's middle lay beyond the wall: the run from 3 fills up to it alone
        Run(15, -1, 10),
        Run(15, +1, 16),
    ]
    assert plan_runs([3, 8], (0, 10), walls=[2]) == [Run(3, +1, 5, 1), Run(8, -1, 6, 0), Run(8, +1, 10)]
    assert plan_runs([5], (0, 10), walls=[4, 6]) == []


def test_slices_erased_by_hand_are_kept_out_and_said(two_nuclei):
    labels = seeded(two_nuclei, {1: [8], 2: [14]})
    result = run(propagate_iter(Oracle(two_nuclei), labels, keep_out={1: [10], 2: [3, 14]}))
    assert max(result.filled[1]) == 9  # object 1 reaches 13 otherwise
    assert not (result.labels[10:] == 1).any()
    assert min(result.filled[2]) < 14  # a slice holding the object is no wall
    erased = [stop for stop in result.stops if stop.reason == "erased"]
    assert [(stop.object_id, stop.direction, stop.z) for stop in erased] == [(1, 1, 10)]
    assert erased[0].describe() == "on slice 10, it was erased there by hand, so it is kept out"
    with pytest.raises(ValueError, match="outside the stack's 24 slices"):
        propagate_iter(Oracle(two_nuclei), labels, keep_out={1: [30]})
    with pytest.raises(TypeError, match="maps object ids"):
        propagate_iter(Oracle(two_nuclei), labels, keep_out=[10])


def two_part_column():
    """One column changing shape at z = 10: a user's object seen as part A below, part B above."""
    truth = np.zeros(SHAPE, np.uint16)
    lower = (np.arange(24) < 10)[:, None, None]
    truth[ellipsoid((0, 24, 24), (1e6, 10, 10)) & lower] = 1
    truth[ellipsoid((0, 24, 26), (1e6, 9, 11)) & ~lower] = 2
    return truth


def test_key_slices_are_filled_from_both_ends_and_joined():
    truth = two_part_column()
    labels = np.zeros_like(truth)
    labels[4][truth[4] > 0] = 7  # the user's annotations of one object on slices 4 and 14
    labels[14][truth[14] > 0] = 7
    oracle = Oracle(truth)
    result = run(propagate_iter(oracle, labels))
    assert result.filled[7] == tuple(z for z in range(24) if z not in (4, 14))
    for z in range(5, 10):  # from slice 4: part A
        np.testing.assert_array_equal(result.labels[z] == 7, truth[z] == 1)
    for z in range(10, 14):  # from slice 14: part B
        np.testing.assert_array_equal(result.labels[z] == 7, truth[z] == 2)
    # Both ends advance in the same steps: slices 5 and 13 are decided before 6 and 12.
    order = [z for z, _ in oracle.calls]
    assert order.index(5) < order.index(6) and order.index(13) < order.index(6)
    assert order.index(6) < order.index(7) and order.index(12) < order.index(7)
    assert result.stops == ()


def test_a_run_that_stops_between_key_slices_leaves_the_rest_to_the_other():
    truth = two_part_column()
    labels = np.zeros_like(truth)
    labels[4][truth[4] > 0] = 7
    labels[14][truth[14] > 0] = 7
    result = run(propagate_iter(Oracle(truth, low_score_slices=[6]), labels))
    # The run from 4 stops at 6; the run from 14 goes on past the middle down to 7 (6 stops it too).
    assert result.filled[7] == (0, 1, 2, 3, 5, 7, 8, 9, 10, 11, 12, 13, *range(15, 24))
    assert sorted((s.direction, s.z) for s in result.stops) == [(-1, 6), (1, 6)]
    for z in (7, 8, 9):
        np.testing.assert_array_equal(result.labels[z] == 7, truth[z] == 1)


def test_an_object_ends_where_it_fades_though_the_model_still_finds_it():
    # The model finds the nucleus on slices 4 to 19; the image shows it bright on 8 to 15 only, and
    # dim (a fifth of its contrast) beyond, as a nucleus out of focus at its top and bottom.
    found = np.zeros(SHAPE, np.uint16)
    found[4:20][ellipsoid((12, 24, 24), (30, 10, 10))[4:20]] = 1
    image = np.where(found > 0, 28.0, 10.0)
    image[8:16][found[8:16] > 0] = 100.0
    labels = seeded(found, {1: [12]})
    oracle = Oracle(found, image=image)
    result = run(propagate_iter(oracle, labels))
    assert result.filled[1] == (8, 9, 10, 11, 13, 14, 15)
    stops = sorted((s.direction, s.z, s.reason, round(s.value, 2)) for s in result.stops)
    assert stops == [(-1, 7, "contrast", 0.2), (1, 16, "contrast", 0.2)]
    # Without the rule, the run goes on as far as the model finds it.
    result = run(propagate_iter(oracle, labels, settings=PropagationSettings(min_contrast=0)))
    assert result.filled[1] == (4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19)
    # An object as dim as its surroundings on its key slice has no contrast to lose: no rule.
    flat = run(propagate_iter(Oracle(found, image=np.full(SHAPE, 10.0)), labels))
    assert flat.filled[1] == (4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19)


def test_several_objects_in_one_run_never_overwrite_others():
    truth = np.zeros(SHAPE, np.uint16)
    truth[ellipsoid((12, 24, 13), (8, 10, 9))] = 1
    truth[ellipsoid((12, 24, 33), (8, 10, 9))] = 2  # touching object 1 in x
    truth[ellipsoid((12, 6, 24), (9, 4, 9))] = 3  # touching both from above in y
    labels = seeded(truth, {1: [12], 2: [12]})
    labels[truth == 3] = 3  # a committed object on every slice, not propagated
    oracle = Oracle(truth, leak=3)  # masks spill 3 pixels beyond their object
    # Near the tips such a mask is mostly spill, dimmer than the object: no contrast rule here.
    no_contrast = PropagationSettings(min_contrast=0)
    result = run(propagate_iter(oracle, labels, object_ids=[1, 2], settings=no_contrast))
    np.testing.assert_array_equal(result.labels == 3, truth == 3)
    # Pixels two leaky masks both claim go to the higher logit: the true owner.
    for object_id in (1, 2):
        assert len(result.filled[object_id]) >= 12
        for z in result.filled[object_id]:
            assert ((truth[z] == object_id) <= (result.labels[z] == object_id)).all()
    # Both objects start on slice 12: each slice they reach together is one batch of two prompts.
    assert all(count == 2 for _, count in oracle.calls)
    assert len(oracle.calls) == len(set(result.filled[1]) | set(result.filled[2])) + 2  # the stop slices


def test_runs_from_different_slices_meet_and_then_share_each_slice(two_nuclei):
    labels = seeded(two_nuclei, {1: [8], 2: [14]})  # object 1 spans slices 2-14, object 2 slices 6-22
    oracle = Oracle(two_nuclei)
    result = run(propagate_iter(oracle, labels))
    for object_id in (1, 2):
        assert iou(result.labels == object_id, two_nuclei == object_id) > 0.9
    # Going down, the highest slice comes first: object 1's run waits on slice 8 until object 2's
    # comes down to it, and from there the two share each slice's batch.
    assert (7, 2) in oracle.calls and (6, 2) in oracle.calls
    # A slice is decoded at most once per direction.
    decoded = [z for z, _ in oracle.calls]
    assert all(decoded.count(z) <= 2 for z in decoded)


def test_progress_reports_each_step_and_what_it_wrote(two_nuclei):
    labels = seeded(two_nuclei, {1: [8], 2: [14]})
    steps = propagate_iter(Oracle(two_nuclei), labels)
    events = []
    while True:
        try:
            events.append(next(steps))
        except StopIteration as end:
            result = end.value
            break
    painted = labels.copy()
    for event in events:
        assert 0 <= event.done <= event.total
        for object_id, mask in event.written.items():
            painted[event.z][mask] = object_id
    np.testing.assert_array_equal(painted, result.labels)
    assert events[-1].done == events[-1].total == sum(len(v) for v in result.filled.values())
    assert sum(len(e.stops) for e in events) == len(result.stops)


def test_missing_embeddings_are_computed_on_the_way(two_nuclei):
    labels = seeded(two_nuclei, {1: [8]})
    oracle = Oracle(two_nuclei)
    oracle.embedded = {8, 9}
    events = list_events(propagate_iter(oracle, labels))
    embedded = [event.z for event in events if event.stage == "embedding"]
    assert 9 not in embedded and 7 in embedded
    assert {z for z, _ in oracle.calls} <= oracle.embedded


def test_cancel_stops_after_the_current_step_and_keeps_what_was_filled(two_nuclei):
    labels = seeded(two_nuclei, {1: [8], 2: [14]})
    cancel = threading.Event()
    steps = propagate_iter(Oracle(two_nuclei), labels, cancel=cancel)
    first = next(steps)
    cancel.set()
    with pytest.raises(StopIteration) as end:
        next(steps)
    result = end.value.value
    assert result.cancelled
    assert sum(len(v) for v in result.filled.values()) == first.done
    full = run(propagate_iter(Oracle(two_nuclei), labels))
    assert not full.cancelled and sum(len(v) for v in full.filled.values()) > first.done
    closed = propagate_iter(Oracle(two_nuclei), labels)  # a worker may also just close the generator
    next(closed)
    closed.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"labels": np.zeros((3, 4, 4), np.uint16)}, ValueError, "shape"),
        ({"labels": np.zeros(SHAPE, np.float32)}, TypeError, "integers"),
        ({"labels": np.zeros(SHAPE, np.uint16)}, ValueError, "no object"),
        ({"object_ids": [5]}, ValueError, "Object 5 is not in the labels"),
    ],
)
def test_bad_inputs_are_explained(two_nuclei, kwargs, error, message):
    args = {"labels": seeded(two_nuclei, {1: [8]}), "object_ids": None, **kwargs}
    with pytest.raises(error, match=message):  # when called, not at the first step
        propagate_iter(Oracle(two_nuclei), args["labels"], args["object_ids"])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="Unknown propagation mode 'boxes'"):
        PropagationSettings(mode="boxes")
    with pytest.raises(ValueError, match="between 0 and 1"):
        PropagationSettings(min_iou=1.5)
    with pytest.raises(ValueError, match="min_contrast is a fraction between 0 and 1"):
        PropagationSettings(min_contrast=-0.1)
    with pytest.raises(ValueError, match="first <= last"):
        PropagationSettings(z_range=(5, 2))


# -- the mechanics, through the real predictor -------------------------------------------------------

TINY = MicroConfig(
    embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2,
    stem_dims=(8, 16, 24), stem_blocks=(1, 1), img_size=64,
)
# Random weights: keep every nonempty mask.
EVERYTHING = {"min_iou": 0.0, "min_score": 0.0, "min_area": 0, "min_contrast": 0.0}


@pytest.fixture(scope="module")
def tiny_predictor():
    torch.manual_seed(0)
    return Predictor(build_sam(TINY).eval(), precision="fp32")


@pytest.fixture(scope="module")
def stack():
    from samcore.synthetic import nuclei_stack

    return nuclei_stack((10, 40, 48), n_nuclei=3, radius=(6, 9), seed=1)


@pytest.mark.parametrize("mode", MODES)
def test_real_predictor_fills_labels_without_touching_other_objects(tiny_predictor, stack, mode):
    image, truth = stack
    labels = np.zeros_like(truth)
    labels[5] = truth[5]
    labels[:, :3, :3] = 9  # a committed object in a corner, on every slice
    ids = [int(i) for i in np.unique(truth[5]) if i]
    result = propagate(tiny_predictor, image, labels, ids, mode=mode, **EVERYTHING)
    assert result.labels.shape == labels.shape and result.labels.dtype == labels.dtype
    assert set(np.unique(result.labels)) <= {0, 9, *ids}
    np.testing.assert_array_equal(result.labels[5], labels[5])  # key slices stay as drawn
    np.testing.assert_array_equal(result.labels == 9, labels == 9)
    assert any(len(slices) >= 2 for slices in result.filled.values())  # it did propagate
    for object_id, slices in result.filled.items():
        assert 5 not in slices and all((result.labels[z] == object_id).any() for z in slices)


def test_embeddings_reached_are_cached_and_reused(tiny_predictor, stack):
    image, truth = stack
    labels = np.zeros_like(truth)
    labels[5] = truth[5]
    view = StackView.of(image)
    store = EmbeddingStore(stack_key(view, model_key(tiny_predictor.model)), view.n_slices)
    decoder = StackDecoder(tiny_predictor, view, store)
    events = list_events(propagate_iter(decoder, labels, settings=PropagationSettings(**EVERYTHING)))
    embedded = {event.z for event in events if event.stage == "embedding"}
    decided = {event.z for event in events if event.stage == "propagation"}
    assert decided and decided <= embedded and 5 not in embedded
    assert len(store) == len(embedded)
    again = list_events(propagate_iter(decoder, labels, settings=PropagationSettings(**EVERYTHING)))
    assert not any(event.stage == "embedding" for event in again)


def test_negative_values_are_not_objects_and_stay(tiny_predictor, stack):
    image, truth = stack
    labels = np.zeros(truth.shape, np.int32)
    labels[5] = truth[5]
    labels[:, :3, :3] = -1  # a mark of the user's, not an object
    result = propagate(tiny_predictor, image, labels, **EVERYTHING)
    assert -1 not in result.filled and set(result.filled) == {int(i) for i in np.unique(truth[5]) if i}
    np.testing.assert_array_equal(result.labels == -1, labels == -1)


def test_a_store_of_another_stack_is_refused(tiny_predictor, stack):
    image, truth = stack
    labels = np.zeros_like(truth)
    labels[5] = truth[5]
    other = StackView.of(image[::-1].copy())  # the same size, other pixels
    store = EmbeddingStore(stack_key(other, model_key(tiny_predictor.model)), other.n_slices)
    with pytest.raises(ValueError, match="another image"):
        propagate(tiny_predictor, image, labels, store=store)
    own = EmbeddingStore(stack_key(StackView.of(image), model_key(tiny_predictor.model)), len(image))
    assert propagate(tiny_predictor, image, labels, store=own, **EVERYTHING).filled


def test_batched_decoding_matches_one_prompt_at_a_time(tiny_predictor, stack):
    image, truth = stack
    decoder = StackDecoder(tiny_predictor, image)
    from samcore.mask_prompts import prompt_from_mask

    masks = [truth[5] == i for i in np.unique(truth[5]) if i]
    prompts = [prompt_from_mask("box+mask", m, decoder.logits_from_mask(m)) for m in masks]
    prompts += [prompt_from_mask("points", m) for m in masks]
    together = decoder.decode(6, prompts)
    for prompt, output in zip(prompts, together):
        (alone,) = decoder.decode(6, [prompt])
        np.testing.assert_allclose(output.logits, alone.logits, atol=1e-4)
        assert output.logits.shape == (40, 48) and output.low_res.shape == (1, 16, 16)


def list_events(steps):
    events = []
    while True:
        try:
            events.append(next(steps))
        except StopIteration:
            return events


def test_crowded_synthetic_stacks_have_touching_nuclei_and_sparse_ones_keep_a_gap():
    from samcore.synthetic import nuclei_stack

    def touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
        pairs = set()
        for axis in range(3):
            a, b = np.moveaxis(labels, axis, 0)[1:], np.moveaxis(labels, axis, 0)[:-1]
            differ = (a != b) & (a > 0) & (b > 0)
            pairs |= {tuple(sorted(p)) for p in zip(a[differ].tolist(), b[differ].tolist())}
        return pairs

    image, crowded = nuclei_stack(
        (12, 64, 64), n_nuclei=12, radius=(8, 12), seed=0, z_radius=(3, 5), max_overlap=0.05
    )
    assert image.shape == crowded.shape and crowded.max() >= 6
    assert len(touching_pairs(crowded)) >= 2
    for object_id in range(1, int(crowded.max()) + 1):  # every nucleus is one piece
        assert ndimage.label(crowded == object_id)[1] == 1
    _, sparse = nuclei_stack((12, 64, 64), n_nuclei=12, radius=(8, 12), seed=0, z_radius=(3, 5))
    assert sparse.max() >= 2 and not touching_pairs(sparse)
