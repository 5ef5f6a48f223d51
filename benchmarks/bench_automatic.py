"""Automatic segmentation ("segment everything") on real nuclei, side by side with a classical baseline.

Prints, in one run:
  * dsb2018 (one 512x512 fluorescence image): object-level F1 at IoU 0.5 and mean matched IoU (over
    the matched pairs) of automatic segmentation and of the baseline, Otsu's threshold plus a
    distance-transform watershed (scikit-image); seconds per 512x512 slice, split into embedding
    and mask generation;
  * nuclei3d (60x256x256 confocal stack): the same for 3D objects, slices segmented one by one and
    linked by overlap (`samcore.linking`), the baseline run in 3D;
  * float16 embeddings: mask agreement between float32 and float16 embeddings of dsb2018, one
    point prompt per labelled object (at its most interior pixel);
  * peak memory of `napari-sam embed` on a synthetic 200-slice 512x512 stack, next to a 2-slice
    run and to the size of the stack's embeddings in float32;
  * mask records: `samcore.AutomaticMaskGenerator` and segment-anything's `SamAutomaticMaskGenerator`
    on the same model, parameters and image (dsb2018): seconds, records, how well each one's masks
    are found among the other's, and the F1 of each one's records painted largest first.

The baseline's parameters (Gaussian sigma 1, peaks at least 5 pixels apart, objects of at least 30
pixels) were fixed beforehand: nothing is tuned on this data, which is for measurement only.

Data: `$NAPARI_SAM_DATA` (default ../shared/data). Model: `--model NAME` (default: the bundled
model) or `--checkpoint FILE`. Until the bundled model exists, random weights check the mechanics
(the accuracy figures are then meaningless):

    python -c "import torch, samcore; torch.save(samcore.build_sam('micro_v1').state_dict(), 'random.pth')"
    python benchmarks/bench_automatic.py --checkpoint random.pth

`--points-per-side 8 --memory-slices 20` gives a quick run of every part; `--parts` picks some.
`--min-iou` and `--min-stability` replace the model's thresholds, as a user would in the widget.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from samcore import AutoSettings, Predictor, load_model
from samcore.automatic import segment_embedding
from samcore.embeddings import StackView, as_stored, embedding_geometry
from samcore.jobs import segment_stack
from samcore.preprocess import to_rgb_uint8
from samcore.progress import run

ROOT = Path(__file__).resolve().parents[1]
MIN_AREA = 30
PARTS = ("dsb2018", "nuclei3d", "float16", "memory", "records")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model name (default: the bundled model)")
    parser.add_argument("--checkpoint", type=Path, help="a weight file instead of a named model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--points-per-side", type=int, default=AutoSettings.points_per_side)
    parser.add_argument("--min-iou", type=float, help="least predicted IoU (default: the model's own)")
    parser.add_argument("--min-stability", type=float, help="least stability score (default: the model's own)")
    parser.add_argument("--memory-slices", type=int, default=200, help="slices of the synthetic stack")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        raise SystemExit(f"Unknown parts {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}.")

    model = load_model(args.model, args.checkpoint, args.device)
    predictor = Predictor(model)
    thresholds = {"min_predicted_iou": args.min_iou, "min_stability": args.min_stability}
    settings = AutoSettings.for_model(
        model, points_per_side=args.points_per_side, **{k: v for k, v in thresholds.items() if v is not None}
    )
    data = Path(os.environ.get("NAPARI_SAM_DATA", ROOT.parent / "shared" / "data"))
    if not (data / "dsb2018").is_dir():
        raise SystemExit(f"No benchmark data at {data}: set NAPARI_SAM_DATA to the folder holding dsb2018/.")
    architecture = model.architecture or "custom"
    print(f"model: {args.checkpoint or args.model or 'default'} ({architecture}) on {predictor.device}, "
          f"{predictor.precision}, {torch.get_num_threads()} threads\nsettings: {settings}")

    image, truth = (tifffile.imread(data / "dsb2018" / name) for name in ("image.tif", "labels.tif"))
    if "dsb2018" in parts:
        labels, (embedding, masks) = segment_2d(predictor, image, settings)
        print(f"\ndsb2018 {image.shape}, {count(truth)} objects of >= {MIN_AREA} px:")
        print_header()
        print_row("automatic", truth, labels)
        print_row("Otsu + watershed", truth, classical(image))
        print(f"  seconds per 512x512 slice: {embedding + masks:.2f} "
              f"(embedding {embedding:.2f}, masks {masks:.2f})")
    if "nuclei3d" in parts:
        stack, truth3d = (tifffile.imread(data / "nuclei3d" / name) for name in ("image.tif", "labels.tif"))
        started = time.perf_counter()
        labels3d = run(segment_stack(predictor, StackView.of(stack), None, settings))
        elapsed = time.perf_counter() - started
        print(f"\nnuclei3d {stack.shape}, {count(truth3d)} 3D objects of >= {MIN_AREA} voxels:")
        print_header()
        print_row("automatic, linked", truth3d, labels3d)
        print_row("Otsu + watershed 3D", truth3d, classical(stack))
        print(f"  seconds per 256x256 slice: {elapsed / len(stack):.2f}")
    if "float16" in parts:
        print_float16_agreement(predictor, image, truth)
    if "memory" in parts:
        print_memory(args, model, args.memory_slices)
    if "records" in parts:
        print_records(model, image, truth, settings)


def segment_2d(predictor: Predictor, image: np.ndarray, settings: AutoSettings):
    """Labels of one image and the (embedding, masks) seconds, with the store's float16 embedding."""
    rgb = to_rgb_uint8(image)
    started = time.perf_counter()
    embedding = as_stored(predictor.embed_rgb(rgb))
    embedded = time.perf_counter()
    labels = run(segment_embedding(predictor.model, embedding, rgb, settings, predictor.precision))
    return labels, (embedded - started, time.perf_counter() - embedded)


def classical(image: np.ndarray) -> np.ndarray:
    """Otsu's threshold on the smoothed image, then a watershed of the distance transform from its peaks."""
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    smooth = gaussian(image.astype(np.float32), sigma=1)
    mask = sizeable(ndimage.label(smooth > threshold_otsu(smooth))[0]) > 0
    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=5, labels=ndimage.label(mask)[0], exclude_border=False)
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=mask)


def matched_ious(truth: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, int, int]:
    """IoUs of a one-to-one matching of true and found objects (largest total IoU), and their counts.

    Objects smaller than MIN_AREA pixels are left out on both sides.
    """
    t_ids, t_index = np.unique(sizeable(truth), return_inverse=True)
    f_ids, f_index = np.unique(sizeable(found), return_inverse=True)
    pairs = np.bincount(t_index.ravel() * len(f_ids) + f_index.ravel(), minlength=len(t_ids) * len(f_ids))
    table = pairs.reshape(len(t_ids), len(f_ids))
    true_area, found_area = table.sum(axis=1)[t_ids > 0], table.sum(axis=0)[f_ids > 0]
    table = table[t_ids > 0][:, f_ids > 0]
    n_true, n_found = table.shape
    if not (n_true and n_found):
        return np.zeros(0), n_true, n_found
    iou = table / (true_area[:, None] + found_area[None, :] - table)
    rows, cols = linear_sum_assignment(-iou)
    return iou[rows, cols], n_true, n_found


def sizeable(labels: np.ndarray) -> np.ndarray:
    ids, areas = np.unique(labels, return_counts=True)
    small = ids[(areas < MIN_AREA) & (ids > 0)]
    return np.where(np.isin(labels, small), 0, labels)


def count(labels: np.ndarray) -> int:
    return matched_ious(labels, labels)[1]


def print_header() -> None:
    print(f"  {'method':<22}{'F1@0.5':>8}{'mean matched IoU':>18}{'found':>7}{'matched':>9}")


def print_row(name: str, truth: np.ndarray, found: np.ndarray) -> None:
    ious, n_true, n_found = matched_ious(truth, found)
    hits = ious[ious >= 0.5]
    f1 = 2 * len(hits) / (n_true + n_found) if n_true + n_found else 0.0
    mean = f"{hits.mean():.3f}" if len(hits) else "-"
    print(f"  {name:<22}{f1:>8.3f}{mean:>18}{n_found:>7}{len(hits):>9}")


def print_float16_agreement(predictor: Predictor, image: np.ndarray, truth: np.ndarray) -> None:
    """Masks from float32 and float16 embeddings, one click per object at its most interior pixel."""
    full = predictor.embed_rgb(to_rgb_uint8(image))
    clicks = []
    for index, found in enumerate(ndimage.find_objects(truth), start=1):
        if found is None or (truth[found] == index).sum() < MIN_AREA:
            continue
        distance = ndimage.distance_transform_edt(np.pad(truth[found] == index, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(np.argmax(distance), distance.shape)
        clicks.append((x + found[1].start, y + found[0].start))
    masks = []
    for embedding in (full, as_stored(full, "float16")):
        predictor.set_embedding(embedding)
        predicted = [predictor.predict(np.array([c]), np.array([1]), multimask_output=False) for c in clicks]
        masks.append([mask[0] for mask, _, _ in predicted])
    ious = [iou(a, b) for a, b in zip(*masks)]
    changed = np.mean([np.mean(a != b) for a, b in zip(*masks)])
    print(f"\nfloat16 vs float32 embeddings, {len(clicks)} clicks on dsb2018: mask IoU mean "
          f"{np.mean(ious):.4f}, min {np.min(ious):.4f}; pixels that differ {changed:.2e}")


def print_records(model: torch.nn.Module, image: np.ndarray, truth: np.ndarray, settings: AutoSettings) -> None:
    """Both mask generators on one image, with the same model and parameters, side by side."""
    sys.path.insert(0, str(ROOT / "tests" / "reference"))  # torchvision stand-in for segment-anything
    from segment_anything import SamAutomaticMaskGenerator

    from samcore import AutomaticMaskGenerator

    options = {
        "points_per_side": settings.points_per_side,
        "pred_iou_thresh": settings.min_predicted_iou,
        "stability_score_thresh": settings.min_stability,
    }
    rgb = to_rgb_uint8(image)
    records, seconds = {}, {}
    for name, make in (("official", SamAutomaticMaskGenerator), ("ours", AutomaticMaskGenerator)):
        generator = make(model, **options)
        started = time.perf_counter()
        records[name] = generator.generate(rgb)
        seconds[name] = time.perf_counter() - started
    official, ours = ([r["segmentation"] for r in records[name]] for name in ("official", "ours"))
    print(f"\nmask records on dsb2018, {options}:")
    print(f"  {'generator':<12}{'seconds':>9}{'records':>9}{'found in the other (IoU >= 0.9)':>34}{'F1@0.5':>8}")
    for name, mine, other in (("official", official, ours), ("ours", ours, official)):
        found = np.mean([max((iou(m, o) for o in other), default=0.0) >= 0.9 for m in mine]) if mine else 0.0
        painted = np.zeros(image.shape[:2], np.int32)
        for label, mask in enumerate(sorted(mine, key=np.count_nonzero, reverse=True), start=1):
            painted[mask] = label
        ious, n_true, n_found = matched_ious(truth, painted)
        f1 = 2 * np.count_nonzero(ious >= 0.5) / (n_true + n_found) if n_true + n_found else 0.0
        print(f"  {name:<12}{seconds[name]:>9.1f}{len(mine):>9}{found:>34.3f}{f1:>8.3f}")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def print_memory(args: argparse.Namespace, model: torch.nn.Module, slices: int) -> None:
    """Peak resident memory of `napari-sam embed` in a fresh process, for 2 slices and for `slices`."""
    from samcore.synthetic import nuclei_image

    base, _ = nuclei_image((512, 512), n_nuclei=40, seed=0)
    views = Predictor(model, precision="fp32").views  # what `napari-sam embed` stores: the model's views
    features, _ = embedding_geometry(model, (512, 512), views)
    source = ["--model", args.model or "default"]
    if args.checkpoint:
        source = ["--checkpoint", str(args.checkpoint)]
    print(f"\n`napari-sam embed` on a synthetic 512x512 stack ({features} features per slice):")
    print(f"  {'slices':>7}{'peak RSS MB':>13}{'seconds':>9}{'input MB':>10}{'float32 embeddings MB':>23}")
    with tempfile.TemporaryDirectory() as folder:
        for depth in (2, slices):
            path = Path(folder) / f"stack{depth}.tif"
            with tifffile.TiffWriter(path) as tiff:  # written slice by slice, read back memory-mapped
                for z in range(depth):
                    tiff.write(np.roll(base, 3 * z, axis=1), contiguous=True, photometric="minisblack")
            store = Path(folder) / f"s{depth}.zarr"
            started = time.perf_counter()
            peak = peak_rss_mb(["embed", str(path), "--store", str(store), "--device", args.device, *source])
            seconds = time.perf_counter() - started
            embeddings = depth * np.prod(features) * 4 / 2**20
            source_mb = base.nbytes * depth / 2**20
            print(f"  {depth:>7}{peak:>13.0f}{seconds:>9.1f}{source_mb:>10.0f}{embeddings:>23.0f}")


def peak_rss_mb(cli_args: list[str]) -> float:
    """Run the command line in a child process and return its peak resident memory in MiB."""
    script = (
        "import resource, sys\n"
        "from samcore.cli import main\n"
        f"code = main({cli_args!r})\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"napari-sam embed failed:\n{result.stderr[-2000:]}")
    kilobytes = int(result.stdout.split("PEAK")[-1])
    return kilobytes / 1024


if __name__ == "__main__":
    main()
