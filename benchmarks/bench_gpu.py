"""Embedding a stack on a GPU: slices per second, ours against the official segment-anything predictor.

Prints, for the same ViT-B weights and the same slices, on one device:
  * slices per second of the official predictor (fp32, `set_image` one slice at a time) and of ours:
    fp32 one slice a pass, then bf16 with `--batches` slices a pass (`Predictor.embed_batch`, as the
    widget and `napari-sam embed` run a stack on a CUDA GPU), each with its speed-up;
  * the mask IoU of each of ours against the official fp32 masks, one box per labelled object on
    the first slices;
  * prompts per second of segment all's unit of work, 64 single points decoded at once
    (`predict_torch`), official against ours (which decodes them all at once on a GPU, one at a time
    on a CPU: `Predictor.decodes_in_batches`).

Each variant embeds the slices once to warm up (kernel selection, the allocator), then `--repeats`
rounds that time every variant in turn; the figures are the medians of the rounds.

Weights: the official `sam_vit_b_01ec64.pth` if SAM_VIT_B_CHECKPOINT points to it, else random
weights that exercise every parameter (the same for both implementations).
Data: slices from the middle of `$NAPARI_SAM_DATA/nuclei3d` (default ../shared/data), 256x256 nuclei.

Run:  python benchmarks/bench_gpu.py [--device cuda] [--slices 32] [--batches 4 8 16]
A CPU run (`--device cpu --slices 2 --batches 2 --repeats 1`) checks the script, not the GPU figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_engine import iou, object_boxes, official_vit_b
from machine import machine_line
from segment_anything import SamPredictor

from samcore import Predictor, build_sam
from samcore.embeddings import StackView

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device to run on (default: cuda)")
    parser.add_argument("--slices", type=int, default=32, help="slices of nuclei3d embedded per round")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16], help="bf16 slices per pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--iou-slices", type=int, default=4, help="slices whose boxes give the mask IoU")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU here (torch.cuda.is_available() is False): run it with --device cpu "
                         "to check the script, or on a machine with a GPU for the figures.")

    rgbs, labels = load_slices(args.slices)
    official_model, weights_name = official_vit_b()
    ours_model = build_sam("vit_b").eval()
    ours_model.load_state_dict(official_model.state_dict())
    official_model.to(device)
    ours_model.to(device)
    print(machine_line())
    print(f"device: {device_name(device)}")
    print(f"weights: {weights_name}")
    print(f"data: {len(rgbs)} slices from the middle of nuclei3d, {rgbs[0].shape[0]}x{rgbs[0].shape[1]}, "
          "as 8-bit RGB with one contrast for the stack (the same input for both)")

    official = SamPredictor(official_model)
    variants: dict[str, tuple[Callable[[], object], Predictor | None]] = {
        "official fp32, 1 a pass": (lambda: [official.set_image(rgb) for rgb in rgbs], None)
    }
    ours = {"ours fp32, 1 a pass": Predictor(ours_model, precision="fp32", embed_batch=1)}
    ours.update({f"ours bf16, {batch} a pass": Predictor(ours_model, precision="bf16", embed_batch=batch)
                 for batch in args.batches})
    for name, predictor in ours.items():
        variants[name] = (lambda predictor=predictor: embed_all(predictor, rgbs), predictor)

    rounds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for run, _ in variants.values():  # warm-up
            run()
            synchronize(device)
        for _ in range(args.repeats):
            for name, (run, _) in variants.items():
                rounds[name].append(timed(run, device))

    reference = official_masks(official, rgbs[: args.iou_slices], labels[: args.iou_slices])
    baseline = statistics.median(rounds["official fp32, 1 a pass"])
    print(f"\nViT-B embedding, {len(rgbs)} slices a round, median of {args.repeats} rounds:")
    print(f"  {'variant':26} {'slices/s':>9} {'speed-up':>9}   mask IoU vs official fp32 (mean / min, "
          f"{sum(len(boxes) for boxes, _ in reference)} boxes)")
    for name, (_, predictor) in variants.items():
        seconds = statistics.median(rounds[name])
        quality = "—"
        if predictor is not None:
            quality = "{:.3f} / {:.3f}".format(*mask_iou(predictor, rgbs, reference))
        print(f"  {name:26} {len(rgbs) / seconds:9.2f} {baseline / seconds:8.2f}x   {quality}")
    print_decoding(official, ours["ours fp32, 1 a pass"], rgbs[0], device, args.repeats)
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


def print_decoding(
    official: SamPredictor, predictor: Predictor, rgb: np.ndarray, device: torch.device, repeats: int
) -> None:
    """Time segment all's unit of work on one slice: a batch of 64 single-point prompts (an 8 x 8 grid),
    three masks each at full resolution, through `predict_torch`; say how ours decodes them."""
    official.set_image(rgb)
    predictor.set_image(rgb)
    height, width = rgb.shape[:2]
    cells = (np.arange(8) + 0.5) / 8
    grid = np.stack(np.meshgrid(cells * width, cells * height), axis=-1).reshape(-1, 2)
    labels = torch.ones(len(grid), 1, dtype=torch.int64, device=device)

    def points(transform) -> torch.Tensor:
        coords = transform.apply_coords(grid, (height, width))
        return torch.as_tensor(coords, dtype=torch.float32, device=device)

    official_points, our_points = points(official.transform)[:, None], points(predictor.transform)[:, None]
    runs = {
        "official": lambda: official.predict_torch(official_points, labels, multimask_output=True),
        "ours": lambda: predictor.predict_torch(our_points, labels, multimask_output=True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():  # warm-up
            run()
        for _ in range(max(repeats, 3)):
            for name, run in runs.items():
                seconds[name].append(timed(run, device))
    how = "all at once" if predictor.decodes_in_batches else "one at a time (the CPU's rewrite)"
    print(f"\nDecoding 64 point prompts at once (predict_torch, 3 masks each, full resolution), median of "
          f"{max(repeats, 3)}; ours decodes them {how}:")
    baseline = statistics.median(seconds["official"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:26} {len(grid) / median:9.1f} prompts/s {baseline / median:8.2f}x")


def load_slices(count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` slices from the middle of nuclei3d as RGB uint8 (the stack's contrast), and their labels."""
    import tifffile

    data = Path(os.environ.get("NAPARI_SAM_DATA", ROOT.parent / "shared" / "data")) / "nuclei3d"
    if not data.is_dir():
        raise SystemExit(f"No benchmark data at {data}: set NAPARI_SAM_DATA to the folder holding nuclei3d/.")
    stack = tifffile.imread(data / "image.tif")
    view = StackView.of(stack)
    first = max(0, (view.n_slices - count) // 2)
    picked = range(first, min(view.n_slices, first + count))
    labels = tifffile.imread(data / "labels.tif")[picked.start : picked.stop]
    return [view.rgb_slice(z) for z in picked], labels


def embed_all(predictor: Predictor, rgbs: list[np.ndarray]) -> None:
    for start in range(0, len(rgbs), predictor.embed_batch):
        predictor.embed_rgb_batch(rgbs[start : start + predictor.embed_batch])


def official_masks(official: SamPredictor, rgbs: list[np.ndarray], labels: np.ndarray) -> list:
    """Per slice: its boxes and the official predictor's mask for each."""
    reference = []
    for rgb, slice_labels in zip(rgbs, labels):
        official.set_image(rgb)
        boxes = object_boxes(slice_labels)
        reference.append((boxes, [official.predict(box=box, multimask_output=False)[0][0] for box in boxes]))
    return reference


def mask_iou(predictor: Predictor, rgbs: list[np.ndarray], reference: list) -> tuple[float, float]:
    """Mean and least IoU of `predictor`'s box masks with the official ones, on embeddings made the
    way the variant makes them (its batch)."""
    scores = []
    count = len(reference)
    embeddings = []
    for start in range(0, count, predictor.embed_batch):
        embeddings += predictor.embed_rgb_batch(rgbs[start : min(count, start + predictor.embed_batch)])
    for embedding, (boxes, masks) in zip(embeddings, reference):
        predictor.set_embedding(embedding)
        for box, expected in zip(boxes, masks):
            scores.append(iou(predictor.predict(box=box, multimask_output=False)[0][0], expected))
    return (float(np.mean(scores)), float(np.min(scores))) if scores else (float("nan"), float("nan"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        memory = torch.cuda.get_device_properties(index).total_memory / 2**30
        return f"{torch.cuda.get_device_name(index)} ({memory:.0f} GiB), CUDA {torch.version.cuda}"
    return str(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
