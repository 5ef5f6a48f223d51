"""Automatic-segmentation thresholds chosen for trained weights on generated scenes."""

from __future__ import annotations

import json

import numpy as np

from samcore.automatic import AutoSettings
from samcore.training import calibrate as calibration
from samcore.training.calibrate import calibrate, match_counts
from tiny_models import save_tiny_vit, tiny_sam


def test_matches_are_counted_above_half_iou_and_specks_ignored() -> None:
    truth = np.zeros((40, 40), np.int32)
    truth[2:12, 2:12] = 1  # found exactly
    truth[20:30, 2:12] = 2  # found shifted by 5 rows: IoU 1/3, no match
    truth[20:30, 25:35] = 3  # not found
    found = np.zeros_like(truth)
    found[2:12, 2:12] = 7
    found[25:35, 2:12] = 8
    found[0:3, 37:40] = 9  # 9 pixels: too small to count
    np.testing.assert_array_equal(match_counts(truth, found), [1, 3, 2])
    np.testing.assert_array_equal(match_counts(truth, truth), [3, 3, 3])
    np.testing.assert_array_equal(match_counts(truth, np.zeros_like(truth)), [0, 3, 0])


def test_every_pair_is_tried_and_the_best_one_chosen(monkeypatch) -> None:
    lines = []
    result = calibrate(
        tiny_sam(), settings=AutoSettings(points_per_side=3), size=64,
        iou_thresholds=(0.0, 0.5), stability_thresholds=(0.0, 0.9), log=lines.append,
    )
    assert set(result.table) == {(0.0, 0.0), (0.0, 0.9), (0.5, 0.0), (0.5, 0.9)}
    assert result.f1 == max(result.table.values())
    assert result.table[result.min_predicted_iou, result.min_stability] == result.f1
    # Ties go to the higher thresholds, the closest to SAM's.
    tied = [pair for pair, f1 in result.table.items() if f1 == result.f1]
    assert (result.min_predicted_iou, result.min_stability) == max(tied)
    assert result.scenes == len(calibration.FAMILIES) == len(lines)


def test_the_command_writes_the_chosen_pair_into_the_weights_notes(tmp_path, monkeypatch, capsys) -> None:
    weights = save_tiny_vit(tmp_path / "micro.pt")
    (tmp_path / "micro.json").write_text(json.dumps({"steps": 5}), encoding="utf-8")
    monkeypatch.setattr(calibration, "IOU_THRESHOLDS", (0.0, 0.99))
    monkeypatch.setattr(calibration, "STABILITY_THRESHOLDS", (0.0,))
    assert calibration.main([str(weights), "--points-per-side", "2"]) == 0
    notes = json.loads((tmp_path / "micro.json").read_text(encoding="utf-8"))
    assert notes["steps"] == 5 and len(notes["auto_thresholds"]) == 2
    assert notes["auto_thresholds"][0] in (0.0, 0.99) and 0.0 <= notes["auto_calibration_f1"] <= 1.0
    assert "chosen:" in capsys.readouterr().out


def test_a_missing_weights_file_is_explained(tmp_path, capsys) -> None:
    assert calibration.main([str(tmp_path / "nothing.pt")]) == 2
    assert "nothing.pt" in capsys.readouterr().err


def test_weights_with_their_own_thresholds_get_them_unless_overridden() -> None:
    model = tiny_sam()
    assert AutoSettings.for_model(model) == AutoSettings(min_predicted_iou=0.88, min_stability=0.95)  # SAM's
    model.auto_defaults = {"min_predicted_iou": 0.3, "min_stability": 0.6}
    settings = AutoSettings.for_model(model, points_per_side=8)
    assert (settings.min_predicted_iou, settings.min_stability, settings.points_per_side) == (0.3, 0.6, 8)
    assert AutoSettings.for_model(model, min_stability=0.9).min_stability == 0.9
