"""Clicks on large images: decoded on the whole image, or on a crop around them (`zoom`), side by side.

Generated scenes only (`samcore.training.scenes`, all six families in turn; no real labels are needed or
used), the bundled model with its own settings. Each object gets one click at its most interior pixel, and
the mask the widget shows for it (the best-scored of the three candidates, refined) is compared with its
label: decoded on the whole image (`Predictor.predict_logits`) and on the crop around the click
(`Predictor.crop_decoder`). Prints mean IoU both ways, the paired gain, the same by family and by object
size, and the time of a click whose crop is new (embedded then) and of one whose crop is held.

Run:  python benchmarks/bench_click_zoom.py [--size 2048] [--scenes 12] [--objects 12] [--seed 777001]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from machine import machine_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="side of the square scenes, in pixels")
    parser.add_argument("--scenes", type=int, default=12, help="scenes, the six families in turn")
    parser.add_argument("--objects", type=int, default=12, help="objects clicked per scene")
    parser.add_argument("--seed", type=int, default=777001, help="seed of the scenes (never used in training)")
    args = parser.parse_args()

    import samcore
    from samcore.training.scenes import FAMILIES, make_scene

    print(machine_line())
    model = samcore.load_model("default")
    predictor = samcore.Predictor(model, zoom=True)
    print(f"bundled model, {predictor.views} views, {'refined' if predictor.refine else 'one pass'}, "
          f"input {model.img_size} px; {args.size}x{args.size} scenes, seed {args.seed}")
    rows, new_ms, held_ms = [], [], []
    rng = np.random.default_rng(1)
    for index in range(args.scenes):
        family = FAMILIES[index % len(FAMILIES)]
        scene = make_scene(args.seed, index, size=args.size, family=family)
        predictor.set_image(scene.image)
        count = min(args.objects, int(scene.labels.max()))
        for object_id in rng.choice(np.arange(1, scene.labels.max() + 1), size=count, replace=False):
            truth = scene.labels == object_id
            click, label = np.array([interior(truth)], dtype=np.float64), np.array([1])
            window = predictor.zoom_window(None, click)
            held = None if window is None else predictor.has_crop(window)
            started = time.perf_counter()
            if window is not None and not held:
                predictor.embed_crop(window)
            zoomed = shown_mask(predictor if window is None else predictor.crop_decoder(window), click, label,
                                predictor.refine)
            took = 1000 * (time.perf_counter() - started)
            if held is not None:
                (held_ms if held else new_ms).append(took)
            whole = shown_mask(predictor, click, label, predictor.refine)
            rows.append((family, int(truth.sum()), iou(whole, truth), iou(zoomed, truth)))
        print(f"  scene {index + 1}/{args.scenes} ({family}) done", file=sys.stderr, flush=True)

    print(f"\nOne click, mean IoU ({len(rows)} objects):")
    print(f"  {'':>22}  {'n':>4}  {'whole image':>11}  {'zoomed':>7}  paired gain")
    summary("all", rows)
    for family in FAMILIES:
        summary(family, [row for row in rows if row[0] == family])
    for low, high in ((0, 1000), (1000, 5000), (5000, None)):
        label = f"objects {low}-{high} px" if high else f"objects over {low} px"
        summary(label, [row for row in rows if row[1] >= low and (high is None or row[1] < high)])
    if new_ms:
        held = f"{statistics.median(held_ms):.0f}" if held_ms else "-"
        print(f"\nA zoomed click (median ms): new crop {statistics.median(new_ms):.0f} ({len(new_ms)} clicks), "
              f"crop held {held} ({len(held_ms)} clicks)")


def summary(name: str, rows: list) -> None:
    if not rows:
        return
    whole, zoomed = (np.array([row[k] for row in rows]) for k in (2, 3))
    gain = zoomed - whole
    print(f"  {name:>22}  {len(rows):>4}  {whole.mean():>11.3f}  {zoomed.mean():>7.3f}  "
          f"{gain.mean():+.3f} ± {gain.std() / np.sqrt(len(rows)):.3f}")


def shown_mask(decoder, click: np.ndarray, label: np.ndarray, refine: bool) -> np.ndarray:
    """The mask the widget shows for a click: the best-scored of the three candidates of one pass, with
    `refine` decoded again with its own logits (the widget refines the candidate it shows only)."""
    scores, low_res = decoder.predict_logits(click, label, refine=False)
    best = low_res[int(np.argmax(scores))][None]
    if refine:
        _, best = decoder.predict_logits(click, label, mask_input=best, multimask_output=False, refine=False)
    return decoder.masks_from_logits(best)[0]


def interior(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel farthest from the object's outline."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(distance), distance.shape)
    return int(x), int(y)


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    return float((mask & truth).sum() / max((mask | truth).sum(), 1))


if __name__ == "__main__":
    main()
