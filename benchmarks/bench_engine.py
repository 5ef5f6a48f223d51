"""Engine speed and fidelity, side by side with the official segment-anything predictor.

Prints, for the same weights and the same image:
  * ViT-B image embedding time: official fp32 vs ours (fp32, bf16, int8), with mask IoU against
    the official fp32 masks for one box prompt per labelled object, and the first call's time
    (int8 compiles then);
  * one prompt to full-resolution mask (median over prompts, embedding cached): a box, and a box
    with the previous mask's low-resolution logits as mask input (how SAM takes a further click,
    and how propagation prompts a slice).

Weights: the official `sam_vit_b_01ec64.pth` if SAM_VIT_B_CHECKPOINT points to it, else random
weights that exercise every parameter (same for both implementations).
Image: `$NAPARI_SAM_DATA/dsb2018` (default ../shared/data), 512x512 fluorescence nuclei.

Run:  python benchmarks/bench_engine.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reference"))  # torchvision stand-in for segment-anything
sys.path.insert(0, str(ROOT / "tests"))

from segment_anything import SamPredictor, sam_model_registry  # noqa: E402

from samcore import Predictor, build_sam  # noqa: E402
from samcore.preprocess import to_rgb_uint8  # noqa: E402
from machine import machine_line  # noqa: E402
from weights import randomize_  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed embeddings per variant (after one warm-up)")
    parser.add_argument("--prompts", type=int, default=40, help="objects used for mask IoU and decode timing")
    args = parser.parse_args()

    image, labels = load_image()
    official_model, weights_name = official_vit_b()
    ours_model = build_sam("vit_b").eval()
    ours_model.load_state_dict(official_model.state_dict())
    boxes = object_boxes(labels)[: args.prompts]
    print_machine(weights_name, image)

    official = SamPredictor(official_model)
    rows = [("official fp32", measure_embedding(lambda: official.set_image(image), args.repeats)[0])]
    outputs = [official.predict(box=box, multimask_output=False) for box in boxes]
    reference = [masks[0] for masks, _, _ in outputs]
    with_masks = [(box, low_res) for box, (_, _, low_res) in zip(boxes, outputs)]  # (box, mask input) pairs
    decode_official = time_decoding(lambda box: official.predict(box=box, multimask_output=False), boxes)
    masked_official = time_decoding(lambda pair: official.predict(**masked(pair)), with_masks)

    ours_rows = []
    for precision in ("fp32", "bf16", "int8"):
        predictor = Predictor(ours_model, precision=precision)
        seconds, first = measure_embedding(lambda: predictor.set_image(image), args.repeats)
        masks = [predictor.predict(box=box, multimask_output=False)[0][0] for box in boxes]
        ious = [iou(a, b) for a, b in zip(reference, masks)]
        name = f"ours {predictor.precision}"
        if predictor.precision != precision:
            name += f" ({precision} failed)"
        ours_rows.append((name, seconds, float(np.mean(ious)), float(np.min(ious)), first))
        if precision == "fp32":
            decode_ours = time_decoding(lambda box: predictor.predict(box=box, multimask_output=False), boxes)
            masked_ours = time_decoding(lambda pair: predictor.predict(**masked(pair)), with_masks)

    auto = Predictor(ours_model).precision
    print(f"\nViT-B image embedding, {image.shape[0]}x{image.shape[1]} image (median of {args.repeats}):")
    print(f"  {'variant':<16}{'seconds':>9}{'speed-up':>10}{'mask IoU mean':>15}{'min':>7}{'first call':>12}")
    base = rows[0][1]
    print(f"  {rows[0][0]:<16}{base:>9.2f}{1.0:>9.2f}x{'1.000':>15}{'1.000':>7}")
    for name, seconds, mean_iou, min_iou, first in ours_rows:
        ratio = base / seconds
        print(f"  {name:<16}{seconds:>9.2f}{ratio:>9.2f}x{mean_iou:>15.3f}{min_iou:>7.3f}{first:>11.1f}s")
    print(f"  precision='auto' picks {auto} on this machine")
    print(f"\nOne box prompt to full-resolution mask, cached embedding (median of {len(boxes)} prompts):")
    print(f"  {'':10} {'box':>9} {'box + mask input':>27}")
    print(f"  official   {decode_official * 1000:7.1f} ms {masked_official * 1000:16.1f} ms")
    print(f"  ours       {decode_ours * 1000:7.1f} ms {masked_ours * 1000:16.1f} ms")
    print(f"  speed-up   {decode_official / decode_ours:8.2f}x {masked_official / masked_ours:17.2f}x")


def load_image() -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    data = Path(os.environ.get("NAPARI_SAM_DATA", ROOT.parent / "shared" / "data")) / "dsb2018"
    if not data.is_dir():
        raise SystemExit(f"No benchmark data at {data}: set NAPARI_SAM_DATA to the folder holding dsb2018/.")
    image = to_rgb_uint8(tifffile.imread(data / "image.tif"))
    return image, tifffile.imread(data / "labels.tif")


def official_vit_b() -> tuple[torch.nn.Module, str]:
    checkpoint = os.environ.get("SAM_VIT_B_CHECKPOINT")
    if checkpoint:
        return sam_model_registry["vit_b"](checkpoint=checkpoint).eval(), f"official weights ({checkpoint})"
    model = randomize_(sam_model_registry["vit_b"]())
    return model.eval(), "random weights (every parameter randomised; set SAM_VIT_B_CHECKPOINT for real ones)"


def object_boxes(labels: np.ndarray) -> list[np.ndarray]:
    """XYXY bounding boxes of the objects with at least 30 pixels."""
    from scipy import ndimage

    boxes = []
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None or (labels[found] == index).sum() < 30:
            continue
        rows, cols = found
        boxes.append(np.array([cols.start, rows.start, cols.stop - 1, rows.stop - 1], dtype=float))
    return boxes


def measure_embedding(run, repeats: int) -> tuple[float, float]:
    """Median seconds of `repeats` calls after a first one, and the first one's seconds."""
    with torch.inference_mode():
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(times), first


def masked(pair: tuple[np.ndarray, np.ndarray]) -> dict:
    """`predict`'s arguments for one mask from a (box, mask input) pair."""
    box, mask_input = pair
    return {"box": box, "mask_input": mask_input, "multimask_output": False}


def time_decoding(run, prompts: list) -> float:
    """Median seconds of `run(prompt)` over the prompts, after three warm-up calls."""
    for prompt in prompts[:3]:
        run(prompt)
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        run(prompt)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def print_machine(weights: str, image: np.ndarray) -> None:
    print(machine_line())
    print(f"weights: {weights}")
    print(f"image: dsb2018 {image.shape} uint8 RGB (converted once from uint16, same input for both)")


if __name__ == "__main__":
    main()
