"""`AutomaticMaskGenerator`: segment-anything's mask records, compared with its own generator on the same
weights, and the generator's parameters, output modes, progress and errors."""

import sys
import threading

import numpy as np
import pytest
import torch

from samcore import AutomaticMaskGenerator, Predictor, load_model
from samcore.cancel import Cancelled
from samcore.mask_generator import rle_to_mask, uncompressed_rle
from samcore.preprocess import to_rgb_uint8
from samcore.synthetic import nuclei_image

KEYS = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}
# The bundled model's predicted IoUs run lower than SAM's: thresholds both generators are given.
THRESHOLDS = {"pred_iou_thresh": 0.4, "stability_score_thresh": 0.8}


@pytest.fixture(scope="module")
def model():
    return load_model("default")


@pytest.fixture(scope="module")
def scene():
    image, labels = nuclei_image()
    return image, labels


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def test_records_match_the_official_generator_on_the_same_weights(model, scene):
    from segment_anything import SamAutomaticMaskGenerator

    rgb = to_rgb_uint8(scene[0])
    options = {"points_per_side": 8, **THRESHOLDS}
    official = SamAutomaticMaskGenerator(model, **options).generate(rgb)
    ours = AutomaticMaskGenerator(model, precision="fp32", **options).generate(rgb)
    assert len(official) >= 5, "too few official masks for the comparison to mean anything"
    assert 0 < len(ours) <= len(official)
    overlap = np.array([[iou(o["segmentation"], r["segmentation"]) for r in official] for o in ours])
    # Every mask of ours is one of the official ones. Ours resamples the logits to the image in one
    # step instead of two, so edges differ by a pixel here and there.
    assert overlap.max(axis=1).min() >= 0.95
    # The official masks we leave out are duplicates of ours: the official box NMS keeps masks that a
    # few stray pixels give a far larger box, where ours compares the masks themselves.
    assert np.median(overlap.max(axis=0)) >= 0.95
    compared = close_boxes = 0
    for record in ours:
        assert set(record) == KEYS
        same = [
            r
            for r in official
            if r["point_coords"] == record["point_coords"] and iou(r["segmentation"], record["segmentation"]) > 0.95
        ]
        if not same:
            continue
        compared += 1
        reference = same[0]
        assert record["predicted_iou"] == pytest.approx(reference["predicted_iou"], abs=1e-4)
        assert record["stability_score"] == pytest.approx(reference["stability_score"], abs=0.03)
        assert record["crop_box"] == reference["crop_box"]
        assert record["area"] == pytest.approx(reference["area"], rel=0.1)
        # A stray pixel at the threshold on one side only moves a box a long way.
        close_boxes += np.abs(np.subtract(record["bbox"], reference["bbox"])).max() <= 2
    assert compared >= len(ours) // 2
    assert close_boxes >= 0.75 * compared


def test_the_generator_finds_the_nuclei_of_a_generated_scene(model, scene):
    image, labels = scene
    records = AutomaticMaskGenerator(model, points_per_side=16).generate(image)
    found = 0
    for label in range(1, labels.max() + 1):
        truth = labels == label
        found += max((iou(r["segmentation"], truth) for r in records), default=0.0) >= 0.8
    assert found >= 0.8 * labels.max()
    scores = [r["predicted_iou"] for r in records]
    assert scores == sorted(scores, reverse=True)
    for record in records:
        mask = record["segmentation"]
        assert mask.shape == image.shape and mask.dtype == bool
        assert record["area"] == np.count_nonzero(mask)
        rows, cols = np.nonzero(mask)
        # segment-anything's XYWH: the first pixel, then the last pixel's coordinates minus the first's
        assert record["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min(), rows.max() - rows.min()]
        assert record["crop_box"] == [0, 0, image.shape[1], image.shape[0]]
        (x, y), = record["point_coords"]
        assert 0 <= x < image.shape[1] and 0 <= y < image.shape[0]


def test_run_length_encoding_matches_the_official_one():
    from segment_anything.utils.amg import mask_to_rle_pytorch

    rng = np.random.default_rng(0)
    masks = rng.random((4, 7, 5)) > 0.5
    masks[0, 0, 0], masks[1, 0, 0] = True, False  # a run of mask first, and of background first
    masks[2] = False
    masks[3] = True
    for mask, reference in zip(masks, mask_to_rle_pytorch(torch.from_numpy(masks))):
        rle = uncompressed_rle(mask)
        assert rle == reference
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
    with pytest.raises(ValueError, match="add up to 34 pixels, not 7 x 5"):
        rle_to_mask({"size": [7, 5], "counts": [30, 4]})


def test_uncompressed_rle_output_and_a_predictor_for_model(model, scene):
    image = scene[0]
    predictor = Predictor(model, precision="fp32")
    generator = AutomaticMaskGenerator(predictor, points_per_side=4, output_mode="uncompressed_rle", **THRESHOLDS)
    assert generator.model is model and generator.precision == "fp32"
    records = generator.generate(image)
    assert records
    for record in records:
        rle = record["segmentation"]
        assert rle["size"] == list(image.shape)
        assert np.count_nonzero(rle_to_mask(rle)) == record["area"]


def test_coco_rle_without_pycocotools_says_how_to_get_it(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        AutomaticMaskGenerator(model, output_mode="coco_rle")


def test_point_grids_and_the_downscaled_points_of_crop_layers(model, scene):
    image = scene[0]
    steps = []
    generator = AutomaticMaskGenerator(
        model, points_per_side=4, points_per_batch=4, crop_n_layers=1, crop_n_points_downscale_factor=2, **THRESHOLDS
    )
    assert [len(grid) for grid in generator.point_grids] == [16, 4]
    records = generator.generate(image, on_progress=steps.append)
    masks = [step for step in steps if step.stage == "masks"]
    # 16 points of the whole image in batches of 4, then 4 points in each of the 4 crops
    assert [step.done for step in masks] == list(range(1, 9)) and {step.total for step in masks} == {8}
    assert steps[0].stage == "embedding"
    whole = [r for r in records if r["crop_box"] == [0, 0, 256, 256]]
    assert whole and len(whole) < len(records), "the crops should add masks of their own"
    for record in whole:
        (x, y), = record["point_coords"]
        assert (x / 64) % 1 == 0.5 and (y / 64) % 1 == 0.5  # the centres of a 4 x 4 grid of 64 px cells

    centre = AutomaticMaskGenerator(model, points_per_side=None, point_grids=[np.array([[0.5, 0.5]])], **THRESHOLDS)
    for record in centre.generate(image):
        assert record["point_coords"] == [[128.0, 128.0]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"points_per_side": None}, "exactly one of points_per_side and point_grids"),
        ({"point_grids": [np.array([[0.5, 0.5]])]}, "exactly one of points_per_side and point_grids"),
        ({"output_mode": "polygons"}, "output_mode must be one of binary_mask, uncompressed_rle, coco_rle"),
        ({"points_per_side": None, "point_grids": [np.array([[0.5, 1.5]])]}, "on the unit square"),
        ({"points_per_side": None, "point_grids": [np.zeros((3,))]}, r"\(n, 2\) array"),
        ({"points_per_side": None, "point_grids": [np.array([[0.5, 0.5]])], "crop_n_layers": 1}, r"one per crop layer \(2\)"),
        ({"crop_n_points_downscale_factor": 0}, "at least 1"),
        ({"pred_iou_thresh": 1.5}, "between 0 and 1"),
    ],
)
def test_bad_parameters_are_refused_with_the_fix(model, options, message):
    with pytest.raises(ValueError, match=message):
        AutomaticMaskGenerator(model, **options)


def test_a_cancelled_search_raises_cancelled(model, scene):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        AutomaticMaskGenerator(model, points_per_side=4).generate(scene[0], cancel=cancel)
