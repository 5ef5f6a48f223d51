"""Thresholds of automatic segmentation for trained weights, chosen on generated scenes.

Automatic segmentation keeps a candidate mask when its predicted IoU and its stability score
pass two thresholds. SAM's (0.88 and 0.95) suit SAM's own IoU head; a model trained here
predicts lower IoUs for masks just as good, and with SAM's thresholds it keeps none. This module
picks the pair that gives the best object-level F1 (at IoU 0.5) on scenes of every family of
`scenes`, from a stream no training run uses. No real image is involved.

Command line::

    python -m samcore.training.calibrate runs/micro_v1/micro_v1.pt

prints the F1 of every pair and writes the chosen one into the weights' notes
(``micro_v1.json`` beside them) as ``auto_thresholds``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..automatic import AutoSettings, EmbeddingDecoder, deduplicate_crop, merge_crops, point_grid, scored_candidates
from ..maskops import Masks, concat, paint_labels
from ..predictor import Predictor
from .scenes import FAMILIES, make_scene

CALIBRATION_SEED = 123_456_789  # a stream no training run (small seeds) or validation uses
IOU_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.88)
STABILITY_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
MIN_OBJECT_AREA = 30  # smaller objects count on neither side


@dataclass(frozen=True)
class Calibration:
    """The chosen thresholds and the F1 of every pair tried.

    Attributes:
        min_predicted_iou: Chosen predicted-IoU threshold.
        min_stability: Chosen stability threshold.
        f1: F1 at IoU 0.5 of the chosen pair, over all scenes.
        table: (min_predicted_iou, min_stability) -> F1.
        scenes: How many scenes were segmented.
    """

    min_predicted_iou: float
    min_stability: float
    f1: float
    table: dict[tuple[float, float], float]
    scenes: int


def calibrate(
    model: torch.nn.Module,
    scenes_per_family: int = 1,
    size: int = 256,
    settings: AutoSettings | None = None,
    iou_thresholds: Sequence[float] | None = None,
    stability_thresholds: Sequence[float] | None = None,
    log=print,
) -> Calibration:
    """Segment generated scenes automatically with every pair of thresholds; keep the best pair.

    Each scene is decoded once: the candidates passing the lowest thresholds are kept with their
    predicted IoU and stability, and each pair then runs the rest of the pipeline on its subset.

    Args:
        model: The trained model.
        scenes_per_family: Scenes of each family of `scenes.FAMILIES`.
        size: Side of the scenes in pixels.
        settings: Every other parameter of automatic segmentation (default `AutoSettings()`).
        iou_thresholds, stability_thresholds: The pairs tried are their product (default
            `IOU_THRESHOLDS` and `STABILITY_THRESHOLDS`).
        log: Called with a line per scene.

    Returns:
        The `Calibration`; ties go to the higher thresholds.
    """
    settings = settings or AutoSettings()
    ious = sorted(IOU_THRESHOLDS if iou_thresholds is None else iou_thresholds)
    stabilities = sorted(STABILITY_THRESHOLDS if stability_thresholds is None else stability_thresholds)
    pairs = list(itertools.product(ious, stabilities))
    counts = {pair: np.zeros(3, np.int64) for pair in pairs}  # hits, true objects, found objects
    predictor = Predictor(model)
    scenes = [(family, i) for i in range(scenes_per_family) for family in FAMILIES]
    for index, (family, _) in enumerate(scenes):
        scene = make_scene(CALIBRATION_SEED, index, size=size, family=family)
        decoder = EmbeddingDecoder(model, predictor.embed_rgb(scene.image))
        masks, stability = _candidates(decoder, settings, pairs[0])
        whole = (0, 0, size, size)
        for pair in pairs:
            chosen = masks.select(np.flatnonzero((masks.scores >= pair[0]) & (stability >= pair[1])))
            found = merge_crops([deduplicate_crop(chosen, whole, (size, size), settings)], settings)
            counts[pair] += match_counts(scene.labels, paint_labels(found, (size, size), settings.min_visible))
        log(f"scene {index + 1}/{len(scenes)} ({family}): {len(masks)} candidates")
    table = {pair: _f1(*counts[pair]) for pair in pairs}
    best = max(pairs, key=lambda pair: (round(table[pair], 6), pair))
    return Calibration(best[0], best[1], table[best], table, len(scenes))


def match_counts(truth: np.ndarray, found: np.ndarray) -> np.ndarray:
    """(hits, true objects, found objects) of two label images; a hit is a pair with IoU above 0.5.

    Objects of either image smaller than `MIN_OBJECT_AREA` pixels are left out. Above 0.5, a
    true object can match at most one found object (labels do not overlap), so no assignment
    is needed.
    """
    truth, found = _sizeable(truth), _sizeable(found)
    t_ids, t_index = np.unique(truth, return_inverse=True)
    f_ids, f_index = np.unique(found, return_inverse=True)
    table = np.bincount(t_index.ravel() * len(f_ids) + f_index.ravel(), minlength=len(t_ids) * len(f_ids))
    table = table.reshape(len(t_ids), len(f_ids))
    t_area, f_area = table.sum(axis=1), table.sum(axis=0)
    iou = table / (t_area[:, None] + f_area[None, :] - table)
    objects = iou[t_ids > 0][:, f_ids > 0]
    return np.array([int((objects > 0.5).sum()), int((t_ids > 0).sum()), int((f_ids > 0).sum())])


def _candidates(decoder: EmbeddingDecoder, settings: AutoSettings, lowest: tuple[float, float]) -> tuple[Masks, np.ndarray]:
    height, width = decoder.size
    points = point_grid(settings.points_per_side) * np.array([width, height])
    parts, stabilities = [], []
    for start in range(0, len(points), settings.points_per_batch):
        masks, stability = scored_candidates(
            decoder, points[start : start + settings.points_per_batch], *lowest, settings.stability_offset
        )
        parts.append(masks)
        stabilities.append(stability)
    return concat(parts), np.concatenate(stabilities)


def _sizeable(labels: np.ndarray) -> np.ndarray:
    ids, areas = np.unique(labels, return_counts=True)
    small = ids[(areas < MIN_OBJECT_AREA) & (ids > 0)]
    return np.where(np.isin(labels, small), 0, labels)


def _f1(hits: int, n_true: int, n_found: int) -> float:
    return 2.0 * hits / (n_true + n_found) if n_true + n_found else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    from ..loading import load_model

    parser = argparse.ArgumentParser(
        prog="python -m samcore.training.calibrate",
        description="Choose automatic-segmentation thresholds for trained weights, on generated scenes.",
    )
    parser.add_argument("weights", type=Path, help="exported weights (e.g. runs/micro_v1/micro_v1.pt)")
    parser.add_argument("--scenes-per-family", type=int, default=1)
    parser.add_argument("--points-per-side", type=int, default=AutoSettings.points_per_side)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_model(checkpoint=args.weights, device="cpu")
    except (OSError, ValueError) as error:
        print(f"calibrate: {error}", file=sys.stderr)
        return 2
    settings = AutoSettings(points_per_side=args.points_per_side)
    result = calibrate(model, args.scenes_per_family, settings=settings)
    print("F1 at IoU 0.5 on generated scenes, by (least predicted IoU, least stability):")
    for (iou, stability), f1 in result.table.items():
        print(f"  {iou:.2f}  {stability:.2f}  {f1:.3f}")
    print(f"chosen: {result.min_predicted_iou} and {result.min_stability} (F1 {result.f1:.3f}, {result.scenes} scenes)")
    notes = args.weights.with_suffix(".json")
    meta = json.loads(notes.read_text(encoding="utf-8")) if notes.is_file() else {}
    meta["auto_thresholds"] = [result.min_predicted_iou, result.min_stability]
    meta["auto_calibration_f1"] = round(result.f1, 4)
    notes.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"written to {notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
