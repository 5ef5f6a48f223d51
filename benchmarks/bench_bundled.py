"""Zero-shot accuracy and speed of a model on real nuclei, side by side with a classical baseline.

For every labelled object of at least 30 pixels:
  * box prompt: the object's bounding box;
  * point prompt: one positive click at its most interior pixel (maximum of its distance transform);
the predicted mask (single output for a box; for a click, the candidate with the best predicted IoU)
is compared with the label: from the image alone in one decoder pass ("1 view") and refined ("1v
ref.": a second pass with the first's logits as mask input, `Predictor(refine=True)`), averaged over
the image and its mirror image left to right ("2 views", `Predictor(views=2)`), the same refined
in each view ("2v ref."), averaged over the image and its 3 mirror images ("4 views"), and as
"2v ref." with a box around a small object decoded on the crop around it, enlarged ("zoomed",
`Predictor(zoom=True)`, see `samcore.zoom`; a click alone is decoded as in "2v ref.").
The baseline on the same prompts: Otsu's threshold inside the box
(computed over the box grown by a tenth of its longest side, so that the histogram holds some
background), or in a window around the click (side twice the median object diameter of the image),
keeping the connected component under the prompt (the box's largest one, within the box).
Printed under the table: the box ceiling of thresholding, the best IoU any single threshold gives
inside the box (largest component, holes filled), chosen per object by looking at its label. It is
not a method: it shows how far the labels' outlines follow the intensities at all.

Data: `$NAPARI_SAM_DATA` (default ../shared/data): `dsb2018` (one 512x512 image) and every slice
of `nuclei3d` (60x256x256), with their instance labels. Measurement only: nothing is tuned on it.

Also printed: embedding seconds per 512x512 slice, decode milliseconds per prompt, the weight
file's size and, for the bundled model, its training time. The model's default settings (views,
refinement) are named at the top.

Run:  python benchmarks/bench_bundled.py [--model default | --checkpoint FILE] [--precision auto]
                                       [--slices-every 1]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from skimage.filters import threshold_otsu

from samcore import ImageEmbedding, Predictor, load_model
from samcore import download, zoo
from samcore.preprocess import to_rgb_uint8

from machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
MIN_AREA = 30
# Each method but Otsu: (views, refine, zoom).
SETTINGS = {"1 view": (1, False, False), "1v ref.": (1, True, False), "2 views": (2, False, False),
            "2v ref.": (2, True, False), "4 views": (4, False, False), "zoomed": (2, True, True)}
METHODS = (*SETTINGS, "Otsu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=zoo.DEFAULT_MODEL_NAME, help="model name (default: the bundled model)")
    parser.add_argument("--checkpoint", type=Path, help="a weight file instead of a named model")
    parser.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (the encoder's precision)")
    parser.add_argument("--slices-every", type=int, default=1, help="use every n-th slice of nuclei3d")
    args = parser.parse_args()

    data = Path(os.environ.get("NAPARI_SAM_DATA", ROOT.parent / "shared" / "data"))
    model = load_model(None if args.checkpoint else args.model, checkpoint=args.checkpoint, device="cpu")
    predictor = Predictor(model, precision=args.precision)
    print(machine_line())
    describe_weights(args)
    print(f"precision: {predictor.precision} (asked: {args.precision}); the model's default: "
          f"{'refined' if predictor.refine else 'one pass'}, {predictor.views} view(s)"
          f"{', zoomed on small boxes' if predictor.zoom else ''}")

    dsb_image, dsb_labels = read_pair(data / "dsb2018")
    stack, stack_labels = read_pair(data / "nuclei3d")
    sets = {
        "dsb2018": [(dsb_image, dsb_labels)],
        "nuclei3d": [(stack[z], stack_labels[z]) for z in range(0, len(stack), args.slices_every)],
    }
    print(f"\nMean IoU against the labels (objects >= {MIN_AREA} px):")
    width = 8 * len(METHODS)
    print(f"  {'':18}  {' box ':-^{width}}   {' point ':-^{width}}")
    heads = "".join(f"{method:>8}" for method in METHODS)
    print(f"  {'data':10} {'objects':>7}  {heads}   {heads}")
    ceilings = {}
    for name, slices in sets.items():
        scores = evaluate(model, args.precision, slices)
        ceilings[name] = scores["box ceiling"]
        print(f"  {name:10} {scores['objects']:7d}  "
              + "   ".join("".join(f"{scores[f'{kind} {method}']:8.3f}" for method in METHODS)
                          for kind in ("box", "point")))
    print("  box, best single threshold per object, chosen with its label (a ceiling for thresholding): "
          + ", ".join(f"{name} {value:.3f}" for name, value in ceilings.items()))

    print_speed(model, args.precision, dsb_image, dsb_labels)


def read_pair(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """An image and its instance labels from `folder/image.tif` and `folder/labels.tif`."""
    return tifffile.imread(folder / "image.tif"), tifffile.imread(folder / "labels.tif")


def describe_weights(args: argparse.Namespace) -> None:
    if args.checkpoint:
        path = args.checkpoint
    else:
        path = download.cached_path(zoo.get_entry(args.model))
    print(f"Weights: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    notes = path.with_suffix(".json")  # written next to the weights by samcore.training
    if notes.is_file():
        meta = json.loads(notes.read_text(encoding="utf-8"))
        print(f"Training: {meta['train_seconds'] / 60:.0f} min, {meta['steps']} steps on {meta['device']}")
        if "started_from" in meta:
            print(f"  started from {meta['started_from']['weights']}; in all "
                  f"{meta.get('train_seconds_in_all', 0) / 60:.0f} min, {meta.get('steps_in_all', '?')} steps")


def objects(labels: np.ndarray) -> Iterator[tuple[np.ndarray, tuple[slice, slice]]]:
    """(mask, bounding slices) of every object of at least MIN_AREA pixels."""
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        mask = labels == index
        if mask.sum() >= MIN_AREA:
            yield mask, found


def evaluate(model, precision: str, slices: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    ious: dict[str, list[float]] = {f"{kind} {method}": [] for kind in ("box", "point") for method in METHODS}
    predictors = {views: Predictor(model, precision=precision, views=views) for views in (1, 2, 4)}
    for image, labels in slices:
        found = list(objects(labels))
        if not found:
            continue
        embedding = predictors[4].embed(image)  # the first 1 and 2 of its views are the others'
        for views, predictor in predictors.items():
            features = embedding.features[:views]
            sizes = (embedding.original_size, embedding.input_size)
            predictor.set_embedding(ImageEmbedding(features, *sizes), image=to_rgb_uint8(image))
        diameters = [max(s.stop - s.start for s in box) for _, box in found]
        window = 2 * int(np.median(diameters))
        for mask, (rows, cols) in found:
            box = np.array([cols.start, rows.start, cols.stop - 1, rows.stop - 1])
            point = interior_point(mask)
            for method, (views, refine, zoom) in SETTINGS.items():
                predictor = predictors[views]
                masks, _, _ = predictor.predict(box=box, multimask_output=False, refine=refine, zoom=zoom)
                ious[f"box {method}"].append(iou(masks[0], mask))
                masks, scores, _ = predictor.predict(
                    point_coords=point[None], point_labels=np.array([1]), refine=refine, zoom=zoom
                )
                ious[f"point {method}"].append(iou(masks[int(np.argmax(scores))], mask))
            ious["box Otsu"].append(iou(otsu_in_box(image, box), mask))
            ious.setdefault("box ceiling", []).append(best_threshold_iou(image, box, mask))
            ious["point Otsu"].append(iou(otsu_at_point(image, point, window), mask))
    result = {name: float(np.mean(values)) for name, values in ious.items()}
    result["objects"] = len(ious["box Otsu"])
    return result


def interior_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the object's pixel farthest from its border."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return np.array([x, y], dtype=np.float64)


def otsu_in_box(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Otsu foreground inside an XYXY box, its largest connected component.

    A tight box is nearly all object, so the threshold comes from the box grown by a tenth of
    its longest side (at least 1 px) on every side; the mask stays inside the box.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    margin = max(1, round(0.1 * max(x1 - x0 + 1, y1 - y0 + 1)))
    context = image[max(y0 - margin, 0) : y1 + margin + 1, max(x0 - margin, 0) : x1 + margin + 1]
    crop = image[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    out = np.zeros(image.shape, dtype=bool)
    if context.min() == context.max():
        return out
    components, count = ndimage.label(crop > threshold_otsu(context.astype(np.float64)))
    if count:
        sizes = np.bincount(components.ravel())[1:]
        out[y0 : y1 + 1, x0 : x1 + 1] = components == int(np.argmax(sizes)) + 1
    return out


def best_threshold_iou(image: np.ndarray, box: np.ndarray, mask: np.ndarray, levels: int = 128) -> float:
    """The best IoU with `mask` of any threshold inside the XYXY box (largest component, holes filled),
    for bright objects as in both sets.

    Thresholds: every value in the box, or `levels` quantiles of them where there are more.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    crop = image[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    target = mask[y0 : y1 + 1, x0 : x1 + 1]
    outside = mask.sum() - target.sum()  # label pixels outside the box: none for a bounding box
    values = np.unique(crop)
    if values.size > levels:
        values = np.unique(np.quantile(crop, np.linspace(0, 1, levels)))
    best = 0.0
    for value in values:
        components, count = ndimage.label(crop >= value)
        if not count:
            continue
        largest = components == int(np.argmax(np.bincount(components.ravel())[1:])) + 1
        found = ndimage.binary_fill_holes(largest)
        union = np.logical_or(found, target).sum() + outside
        best = max(best, float(np.logical_and(found, target).sum() / union))
    return best


def otsu_at_point(image: np.ndarray, point: np.ndarray, window: int) -> np.ndarray:
    """Otsu foreground in a window around an (x, y) click, the component under the click."""
    x, y = int(point[0]), int(point[1])
    half = max(window // 2, 4)
    y0, x0 = max(y - half, 0), max(x - half, 0)
    crop = image[y0 : y + half + 1, x0 : x + half + 1].astype(np.float64)
    out = np.zeros(image.shape, dtype=bool)
    if crop.min() == crop.max():
        return out
    components, _ = ndimage.label(crop > threshold_otsu(crop))
    under = components[y - y0, x - x0]
    if under:
        out[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = components == under
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def print_speed(model, precision: str, image: np.ndarray, labels: np.ndarray) -> None:
    boxes = [np.array([c.start, r.start, c.stop - 1, r.stop - 1]) for _, (r, c) in objects(labels)][:40]
    print(f"\nSpeed on the {image.shape[0]}x{image.shape[1]} DSB image (median of 5 embeddings, of "
          f"{len(boxes)} box prompts):")
    for method, (views, refine, zoom) in SETTINGS.items():
        predictor = Predictor(model, precision=precision, views=views)
        embed = median_seconds(lambda: predictor.set_image(image), repeats=5)
        decode_one = functools.partial(predictor.predict, multimask_output=False, refine=refine, zoom=zoom)
        decode_one(box=boxes[0])  # warm-up
        decode = statistics.median(timed(lambda box=box: decode_one(box=box)) for box in boxes)
        zoomed = sum(predictor.zoom_window(box) is not None for box in boxes) if zoom else 0
        note = f" (embedding the crop included; {zoomed} of {len(boxes)} boxes zoomed)" if zoom else ""
        print(f"  {method:8} embedding {embed:.3f} s, box -> mask {decode * 1000:.1f} ms{note}")


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()
    return statistics.median(timed(run) for _ in range(repeats))


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
