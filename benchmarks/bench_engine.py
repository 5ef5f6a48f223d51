"""Engine speed and fidelity, side by side with the official segment-anything predictor.

Prints, for the same weights and the same image:
  * ViT-B image embedding time: official fp32 vs ours (fp32, bf16, int8), with mask IoU against
    the official fp32 masks for one box prompt per labelled object, and the first call's time
    (int8 compiles then);
  * one prompt to full-resolution mask (median over prompts, embedding cached): a box, and a box
    with the previous mask's low-resolution logits as mask input (how SAM takes a further click,
    and how propagation prompts a slice); and a box as the first prompt on an image, for which our
    decoder also makes the image's per-image context.

Weights: the official `sam_vit_b_01ec64.pth` if SAM_VIT_B_CHECKPOINT points to it, else random
weights that exercise every parameter (same for both implementations).
Image: `$NAPARI_SAM_DATA/dsb2018` (default ../shared/data), 512x512 fluorescence nuclei.

Run:  python benchmarks/bench_engine.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reference"))  # torchvision stand-in for segment-anything
sys.path.insert(0, str(ROOT / "tests"))

from segment_anything import SamPredictor, sam_model_registry  # noqa: E402

from samcore import ImageEmbedding, Predictor, build_sam  # noqa: E402
from samcore.precision import SLOW_SPEEDUP, cpu_bf16_speedup, cpu_int8_speedup  # noqa: E402
from samcore.preprocess import to_rgb_uint8  # noqa: E402
from machine import machine_line  # noqa: E402
from weights import randomize_  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of timed embeddings (after one warm-up)")
    parser.add_argument("--prompts", type=int, default=40, help="objects used for mask IoU and decode timing")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "int8"), default=None,
                        help="our variants to time (default: those this CPU has the instructions for)")
    parser.add_argument("--seed", type=int, default=0,
                        help="of the random weights (the mask IoUs move by a few thousandths between draws)")
    args = parser.parse_args()

    image, labels = load_image()
    torch.manual_seed(args.seed)
    official_model, weights_name = official_vit_b()
    ours_model = build_sam("vit_b").eval()
    ours_model.load_state_dict(official_model.state_dict())
    boxes = object_boxes(labels)[: args.prompts]
    print_machine(weights_name, image)

    official = SamPredictor(official_model)
    # fp32 is always timed: decoding is timed on it, and it is the baseline for the others.
    precisions = ["fp32", *(p for p in args.precisions or default_precisions() if p != "fp32")]
    predictors = {precision: Predictor(ours_model, precision=precision) for precision in precisions}
    runs = {"official": lambda: official.set_image(image)}
    runs.update({precision: functools.partial(p.set_image, image) for precision, p in predictors.items()})
    timings = measure_embeddings(runs, args.repeats)

    outputs = [official.predict(box=box, multimask_output=False) for box in boxes]
    reference = [masks[0] for masks, _, _ in outputs]
    with_masks = [(box, low_res) for box, (_, _, low_res) in zip(boxes, outputs)]  # (box, mask input) pairs
    fp32 = predictors["fp32"]
    decode = time_decoding({"official": lambda box: official.predict(box=box, multimask_output=False),
                            "ours": lambda box: fp32.predict(box=box, multimask_output=False)}, boxes)
    with_mask = time_decoding({"official": lambda pair: official.predict(**masked(pair)),
                               "ours": lambda pair: fp32.predict(**masked(pair))}, with_masks)
    first = time_first_prompts(official, fp32, boxes[:10])

    auto = Predictor(ours_model).precision
    base = timings["official"]
    print(f"\nViT-B image embedding, {image.shape[0]}x{image.shape[1]} image, {args.repeats} rounds that time "
          "every variant in turn (medians):")
    print(f"  {'variant':<16}{'seconds':>9}{'speed-up':>10}{'per round':>16}{'mask IoU mean':>15}{'min':>7}"
          f"{'first call':>12}")
    print(f"  {'official fp32':<16}{statistics.median(base.seconds):>9.2f}{1.0:>9.2f}x{'':>16}{'1.000':>15}"
          f"{'1.000':>7}{base.first:>11.1f}s")
    for precision, predictor in predictors.items():
        masks = [predictor.predict(box=box, multimask_output=False)[0][0] for box in boxes]
        ious = [iou(a, b) for a, b in zip(reference, masks)]
        name = f"ours {predictor.precision}" + ("" if predictor.precision == precision else f" ({precision} failed)")
        timing = timings[precision]
        ratios = [a / b for a, b in zip(base.seconds, timing.seconds)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}x"
        print(f"  {name:<16}{statistics.median(timing.seconds):>9.2f}{statistics.median(ratios):>9.2f}x"
              f"{spread:>16}{np.mean(ious):>15.3f}{np.min(ious):>7.3f}{timing.first:>11.1f}s")
    print(f"  precision='auto' picks {auto} on this machine")
    print(f"\nOne box prompt to full-resolution mask, cached embedding (median of {len(boxes)} prompts, "
          "each decoded by both in turn):")
    print(f"  {'':10} {'box':>9} {'box + mask input':>27}")
    print(f"  official   {decode['official'] * 1000:7.1f} ms {with_mask['official'] * 1000:16.1f} ms")
    print(f"  ours       {decode['ours'] * 1000:7.1f} ms {with_mask['ours'] * 1000:16.1f} ms")
    print(f"  speed-up   {decode['official'] / decode['ours']:8.2f}x "
          f"{with_mask['official'] / with_mask['ours']:17.2f}x")
    print(f"  first box on an image (ours also makes the image's decoder context then; median of "
          f"{len(boxes[:10])}): official {first['official'] * 1000:.1f} ms, ours {first['ours'] * 1000:.1f} ms")


def default_precisions() -> list[str]:
    """fp32, bf16 and int8, less those this CPU emulates without their instructions (one ViT-B
    embedding would take many minutes, and `Predictor` would run fp32 instead anyway)."""
    precisions = ["fp32"]
    for name, speedup in (("bf16", cpu_bf16_speedup()), ("int8", cpu_int8_speedup())):
        if speedup >= SLOW_SPEEDUP:
            precisions.append(name)
        else:
            print(f"{name} not timed: this CPU runs {name} products {1 / speedup:.0f}x slower than fp32")
    return precisions


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
    return model.eval(), (f"random weights, seed {torch.initial_seed()} (every parameter randomised; set "
                          "SAM_VIT_B_CHECKPOINT for real ones)")


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


@dataclass
class Timing:
    """Seconds of one variant: its first call and one per round."""

    first: float
    seconds: list[float] = field(default_factory=list)


def measure_embeddings(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, Timing]:
    """Time each run once (first call), then `repeats` rounds in which every run is timed in turn.

    Interleaving puts every variant under the same load: on a shared machine the speed drifts
    over minutes, and timing one variant's repeats after another's would put the drift in the
    ratio.
    """
    with torch.inference_mode():
        timings = {name: Timing(timed(run)) for name, run in runs.items()}
        for _ in range(repeats):
            for name, run in runs.items():
                timings[name].seconds.append(timed(run))
    return timings


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def masked(pair: tuple[np.ndarray, np.ndarray]) -> dict:
    """`predict`'s arguments for one mask from a (box, mask input) pair."""
    box, mask_input = pair
    return {"box": box, "mask_input": mask_input, "multimask_output": False}


def time_decoding(runs: dict[str, Callable[[object], object]], prompts: list) -> dict[str, float]:
    """Median seconds of each `run(prompt)` over the prompts, every run in turn on each prompt,
    after three warm-up prompts."""
    for prompt in prompts[:3]:
        for run in runs.values():
            run(prompt)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for prompt in prompts:
        for name, run in runs.items():
            times[name].append(timed(functools.partial(run, prompt)))
    return {name: statistics.median(values) for name, values in times.items()}


def time_first_prompts(official: SamPredictor, ours: Predictor, boxes: list) -> dict[str, float]:
    """Median seconds of a box decoded as the first prompt on an image: ours is handed a copy of its
    embedding before each (untimed), so each prompt makes the image's decoder context anew."""
    embedding = ours.get_image_embedding()
    times: dict[str, list[float]] = {"official": [], "ours": []}
    for box in boxes:
        ours.set_embedding(ImageEmbedding(embedding.clone(), ours.original_size, ours.input_size))
        times["ours"].append(timed(lambda: ours.predict(box=box, multimask_output=False)))
        times["official"].append(timed(lambda: official.predict(box=box, multimask_output=False)))
    return {name: statistics.median(values) for name, values in times.items()}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def print_machine(weights: str, image: np.ndarray) -> None:
    print(machine_line())
    print(f"weights: {weights}")
    print(f"image: dsb2018 {image.shape} uint8 RGB (converted once from uint16, same input for both)")


if __name__ == "__main__":
    main()
