"""Automatic segmentation: its pure pieces on hand-made inputs, and the whole pipeline on a decoder
that answers each point with the true object under it."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from samcore.automatic import (
    AutoSettings,
    EmbeddingDecoder,
    crop_boxes,
    cut_by_crop,
    filter_candidates,
    generate_masks,
    point_grid,
)
from samcore.maskops import (
    Masks,
    box_iou,
    box_nms,
    clean_masks,
    concat,
    mask_boxes,
    mask_nms,
    paint_labels,
    remove_small_regions,
    ring_contrast,
    stability_score,
)
from samcore.progress import Progress, run
from samcore.synthetic import nuclei_image


class TruthDecoder:
    """Answers each point with 3 candidates, as SAM does, built from true labels:

    0. the object under the point, with sharp logits and a predicted IoU of 0.95 (background: 0.3);
    1. the same object with blurred logits (unstable) and a predicted IoU of 0.93;
    2. the object merged with everything in its bounding box grown by 10 px, predicted IoU 0.6.
    """

    def __init__(self, truth: np.ndarray) -> None:
        self.truth = truth
        self.size = truth.shape
        self.calls = 0

    def decode(self, points: np.ndarray, min_score: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        logits, scores = [], []
        for x, y in points:
            label = self.truth[int(y), int(x)]
            mask = self.truth == label
            distance = ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)
            rows, cols = np.nonzero(mask)
            grown = np.zeros_like(mask)
            grown[max(rows.min() - 10, 0) : rows.max() + 11, max(cols.min() - 10, 0) : cols.max() + 11] = True
            merged = grown & (self.truth > 0) | mask
            logits.append([np.where(mask, 8.0, -8.0), 0.2 * distance, np.where(merged, 8.0, -8.0)])
            scores.append([0.95 if label else 0.3, 0.93, 0.6])
        return torch.tensor(np.array(logits), dtype=torch.float32), torch.tensor(scores)

    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return nuclei_image((96, 112), n_nuclei=7, radius=(6.0, 12.0), seed=3)[1]


def test_point_grid_holds_cell_centres_row_by_row():
    np.testing.assert_allclose(point_grid(2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])


def test_crops_tile_the_image_with_overlap():
    boxes = crop_boxes(100, 120, layers=1, overlap=0.25)
    assert boxes[0] == (0, 0, 120, 100) and len(boxes) == 5
    covered = np.zeros((100, 120), int)
    for x0, y0, x1, y1 in boxes[1:]:
        covered[y0:y1, x0:x1] += 1
    assert covered.min() == 1  # every pixel in some crop
    (ax0, _, ax1, _), (bx0, _, _, _) = boxes[1], boxes[2]
    assert ax1 - bx0 == pytest.approx(0.25 * (ax1 - ax0), abs=1)  # neighbours share a quarter
    assert len(crop_boxes(64, 64, layers=2, overlap=0.1)) == 1 + 4 + 16


def test_masks_cut_by_an_inner_crop_edge_are_flagged():
    crop = (50, 0, 100, 60)  # the right half of a 100x60 image
    boxes = np.array([[0, 10, 20, 30], [10, 10, 20, 30], [30, 0, 50, 20]])
    # touches the inner left edge / inside / touches the image's top and right edges only
    assert cut_by_crop(boxes, crop, (60, 100)).tolist() == [True, False, False]


def test_ring_contrast_is_the_mean_inside_less_the_mean_of_the_ring():
    image = np.full((20, 20), 10.0)
    mask = np.zeros((20, 20), bool)
    mask[8:12, 8:12] = True
    image[mask] = 50.0
    image[0:6, :] = 90.0  # a bright neighbour above, more than 2 pixels away
    assert ring_contrast(image, mask, width=2) == 40.0
    neighbour = np.zeros((20, 20), bool)
    neighbour[6:8, 8:12] = True  # inside the ring: left out when excluded
    image[neighbour] = 90.0
    assert ring_contrast(image, mask, width=2) < 40.0
    assert ring_contrast(image, mask, neighbour, width=2) == 40.0
    assert ring_contrast(-image, mask, neighbour, width=2) == -40.0  # a dark object
    assert ring_contrast(image, np.zeros((20, 20), bool)) is None
    assert ring_contrast(image, mask, ~mask) is None  # nothing around it to compare with


def test_stability_is_the_area_ratio_of_the_shifted_thresholds():
    logits = torch.tensor([[[3.0, 3.0, 0.5, -0.5, -3.0]], [[-5.0, -5.0, -5.0, -5.0, -5.0]]])
    np.testing.assert_allclose(stability_score(logits, 0.0, 1.0).numpy(), [0.5, 0.0])


def test_mask_boxes_are_pixel_edges():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 2:5, 3:8] = True
    assert mask_boxes(masks).tolist() == [[3, 2, 8, 5], [0, 0, 0, 0]]


def test_box_iou_and_nms_keep_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]])
    assert box_iou(boxes[:1], boxes[1:]) == pytest.approx(np.array([[90 / 110, 0.0]]))
    assert box_nms(boxes, np.array([0.8, 0.9, 0.5]), 0.7).tolist() == [1, 2]
    assert box_nms(boxes, np.array([0.8, 0.9, 0.5]), 0.95).tolist() == [1, 0, 2]


def test_mask_nms_keeps_different_masks_that_share_a_box():
    left = np.zeros((10, 10), bool)
    left[:, :5] = True
    left[0, :] = left[-1, :] = True  # same bounding box as its complement's ...
    right = ~left
    right[0, 0] = right[-1, -1] = True  # ... which spans the box too
    masks = Masks((left, right, left.copy()), np.array([[0, 0, 10, 10]] * 3), np.array([0.9, 0.8, 0.7]))
    assert box_nms(masks.boxes, masks.scores, 0.7).tolist() == [0]
    assert mask_nms(masks, 0.7).tolist() == [0, 1]  # the exact duplicate goes, the other half stays


def test_small_holes_filled_small_islands_dropped_edges_kept():
    mask = np.zeros((12, 12), bool)
    mask[2:9, 2:9] = True
    mask[4:6, 4:5] = False  # a 2-pixel hole
    mask[10, 10] = True  # a 1-pixel island
    cleaned = remove_small_regions(mask, min_area=5)
    expected = np.zeros((12, 12), bool)
    expected[2:9, 2:9] = True
    np.testing.assert_array_equal(cleaned, expected)
    assert not remove_small_regions(mask, 5)[0, 0]  # background at the array's edge is never a hole
    assert remove_small_regions(mask, 0) is mask


def test_cleaned_masks_get_tight_boxes():
    crop = np.zeros((6, 6), bool)
    crop[1:4, 1:4] = True
    crop[5, 5] = True
    masks = clean_masks(Masks((crop,), np.array([[10, 20, 16, 26]]), np.array([0.9])), min_area=3)
    assert masks.boxes.tolist() == [[11, 21, 14, 24]] and masks.crops[0].all()


def test_per_mask_meta_follows_its_masks():
    big, speck = np.ones((4, 4), bool), np.ones((1, 1), bool)
    meta = {"points": np.array([[1.0, 2.0], [3.0, 4.0]]), "stability": np.array([0.9, 0.8])}
    masks = Masks((speck, big), np.array([[0, 0, 1, 1], [5, 5, 9, 9]]), np.array([0.7, 0.6]), meta)
    cleaned = clean_masks(masks, min_area=2)  # the speck goes, and its row with it
    assert cleaned.meta["stability"].tolist() == [0.8] and cleaned.meta["points"].tolist() == [[3.0, 4.0]]
    shifted = masks.shifted(10, 20)
    assert shifted.meta["points"].tolist() == [[11.0, 22.0], [13.0, 24.0]]
    assert masks.meta["points"].tolist() == [[1.0, 2.0], [3.0, 4.0]]  # the original is left as it was
    assert masks.select([1, 0]).meta["stability"].tolist() == [0.8, 0.9]
    plain = Masks((big,), np.array([[0, 0, 4, 4]]), np.array([0.5]))
    both = concat([masks, plain])
    assert len(both) == 3 and both.meta == {}  # rows that one part lacks cannot be made up
    assert concat([masks, masks]).meta["stability"].tolist() == [0.9, 0.8, 0.9, 0.8]


def test_paint_keeps_small_objects_on_top_and_drops_clumps():
    shape = (20, 20)
    clump = np.zeros(shape, bool)
    clump[2:10, 2:18] = True  # two nuclei and a thin bridge
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[2:10, 2:9] = True
    b[2:10, 11:18] = True
    cell = np.zeros(shape, bool)
    cell[11:20, 0:20] = True
    spot = np.zeros(shape, bool)
    spot[14:16, 5:7] = True  # small object on a large one
    masks = Masks.from_dense(torch.tensor(np.array([clump, a, b, cell, spot])), torch.full((5,), 0.9))
    labels = paint_labels(masks, shape, min_visible=0.5)
    assert len(np.unique(labels)) == 5  # background, a, b, cell, spot: the clump is gone
    assert labels[5, 9] == 0 and labels[5, 4] != labels[5, 14]
    assert labels[15, 6] != labels[12, 0] != 0


def test_filters_drop_background_unstable_and_merged_candidates(truth):
    decoder = TruthDecoder(truth)
    ys, xs = np.nonzero(truth == 1)
    points = np.array([[0.5, 0.5], [xs[0] + 0.5, ys[0] + 0.5]])  # background, then object 1
    masks = filter_candidates(decoder, points, AutoSettings())
    assert len(masks) == 1
    np.testing.assert_array_equal(masks.dense(0, truth.shape), truth == 1)


def test_candidates_are_upscaled_a_few_at_a_time_on_a_large_image_and_cancel_stops_them(truth, monkeypatch):
    import threading

    import samcore.automatic as automatic
    from samcore.cancel import Cancelled, stopping_on

    monkeypatch.setattr(automatic, "UPSCALE_PIXELS", 3 * truth.size)  # as if the image were large
    decoder = TruthDecoder(truth)
    chunks = []
    upscale = decoder.upscale
    decoder.upscale = lambda logits: chunks.append(len(logits)) or upscale(logits)
    points = np.array([[xs[0] + 0.5, ys[0] + 0.5] for ys, xs in (np.nonzero(truth == k) for k in (1, 2, 3))])
    masks = filter_candidates(decoder, points, AutoSettings())
    assert len(masks) == 3 and chunks == [1, 3, 2]  # 6 candidates pass the predicted IoU
    cancel = threading.Event()
    decoder.upscale = lambda logits: cancel.set() or upscale(logits)  # the user cancels meanwhile
    with stopping_on(cancel), pytest.raises(Cancelled):
        filter_candidates(decoder, points, AutoSettings())


def run_truth(truth, settings):
    steps = []

    def decoder_for(crop):
        x0, y0, x1, y1 = crop
        return TruthDecoder(truth[y0:y1, x0:x1])

    masks = run(generate_masks(decoder_for, truth.shape, settings), steps.append)
    return paint_labels(masks, truth.shape, settings.min_visible), steps


def assert_same_objects(labels, truth):
    """Each true object is one label with exactly its pixels, and nothing else is labelled."""
    assert len(np.unique(labels)) == len(np.unique(truth))
    for label in np.unique(truth)[1:]:
        found = np.unique(labels[truth == label])
        assert len(found) == 1 and found[0] != 0
        np.testing.assert_array_equal(labels == found[0], truth == label)


def test_every_object_is_found_once_with_its_pixels(truth):
    settings = AutoSettings(points_per_side=16, points_per_batch=40, min_area=10)
    labels, steps = run_truth(truth, settings)
    assert_same_objects(labels, truth)
    assert steps[-1] == Progress("masks", 7, 7)  # 256 points in batches of 40


def test_crops_find_the_same_objects(truth):
    settings = AutoSettings(points_per_side=8, crop_layers=1, min_area=10)
    labels, steps = run_truth(truth, settings)
    assert_same_objects(labels, truth)
    assert steps[-1].total == 5


def test_settings_are_checked_with_a_readable_message():
    with pytest.raises(ValueError, match="between 0 and 1"):
        AutoSettings(min_predicted_iou=88)
    with pytest.raises(ValueError, match="at least 1"):
        AutoSettings(points_per_side=0)


def test_thresholds_left_unset_are_the_models_own_and_given_ones_stay():
    model = torch.nn.Module()
    model.auto_defaults = {"min_predicted_iou": 0.4, "min_stability": 0.8}  # as the bundled model's
    settings = AutoSettings(points_per_side=12).resolved(model)
    assert (settings.min_predicted_iou, settings.min_stability, settings.points_per_side) == (0.4, 0.8, 12)
    assert AutoSettings(min_predicted_iou=0.7).resolved(model).min_predicted_iou == 0.7
    plain = AutoSettings().resolved(torch.nn.Module())  # SAM's weights: SAM's thresholds
    assert (plain.min_predicted_iou, plain.min_stability) == (0.88, 0.95)
    assert AutoSettings.for_model(model, min_stability=0.9).min_stability == 0.9


def test_settings_made_in_a_script_find_the_nuclei_with_the_bundled_model():
    from samcore import load_model, segment_everything

    image, truth = nuclei_image((128, 128), n_nuclei=5, radius=(8.0, 12.0), seed=4)
    labels = segment_everything(image, load_model("default"), settings=AutoSettings(points_per_side=8))
    assert labels.max() >= 3  # SAM's thresholds, which the bundled model's predicted IoUs rarely reach, kept none


class IgnoringThreshold:
    """A decoder that makes every mask, whatever threshold it is told."""

    def __init__(self, decoder: EmbeddingDecoder) -> None:
        self.decoder, self.size = decoder, decoder.size

    def decode(self, points: np.ndarray, min_score: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.decode(points)

    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        return self.decoder.upscale(logits)


def test_masks_of_points_scored_below_the_threshold_are_not_made_and_the_rest_are_unchanged(truth):
    from weights import randomize_

    from samcore import Predictor, build_sam
    from samcore.preprocess import to_rgb_uint8

    model = randomize_(build_sam("vit_test").eval(), seed=4)
    image = nuclei_image(truth.shape, n_nuclei=7, radius=(6.0, 12.0), seed=3)[0]
    decoder = EmbeddingDecoder(model, Predictor(model, precision="fp32").embed_rgb(to_rgb_uint8(image)), "fp32")
    points = point_grid(8) * np.array([truth.shape[1], truth.shape[0]])
    all_logits, all_scores = decoder.decode(points)
    threshold = float(all_scores.max(dim=1).values.median())
    logits, scores = decoder.decode(points, min_score=threshold)
    torch.testing.assert_close(scores, all_scores)
    left_out = (all_scores < threshold).all(dim=1)
    assert 0 < int(left_out.sum()) < len(points)
    assert bool((logits[left_out] == -1e4).all())
    torch.testing.assert_close(logits[~left_out], all_logits[~left_out])
    # Segment all keeps the same candidates either way.
    settings = AutoSettings(min_predicted_iou=threshold, min_stability=0.0)
    kept = filter_candidates(decoder, points, settings)
    expected = filter_candidates(IgnoringThreshold(decoder), points, settings)
    assert len(kept) == len(expected) > 0
    np.testing.assert_array_equal(kept.boxes, expected.boxes)
    np.testing.assert_array_equal(kept.scores, expected.scores)
    for mine, theirs in zip(kept.crops, expected.crops):
        np.testing.assert_array_equal(mine, theirs)
