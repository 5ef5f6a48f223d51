"""Large inputs: a click on a large 2D image, and a stack larger than it is sensible to load whole.

Prints, with the bundled model on generated images (no labels are needed):
  * one click's candidates on a large RGB image, embedding cached: `predict` (all three candidates
    upscaled to full resolution, as the widget did) against `predict_logits` plus `masks_from_logits`
    of the candidate shown (as the widget does now), median of `--clicks`, side by side;
  * a lazily read uint16 stack (a dask array): time to the first slice's embedding and peak resident
    memory when `StackView` keeps it lazy, against reading it into memory first (each in its own
    process, so that the peaks do not mix).

Run:  python benchmarks/bench_large_inputs.py [--clicks 8] [--slices 120]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from machine import machine_line  # noqa: E402

SIDE = 2048  # of the lazy stack's slices


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clicks", type=int, default=8, help="clicks timed per image size")
    parser.add_argument("--slices", type=int, default=120, help=f"slices of the {SIDE}x{SIDE} lazy stack")
    parser.add_argument("--stack-run", choices=("lazy", "in memory"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stack_run:
        stack_run(args.stack_run, args.slices)
        return
    print(machine_line())
    print("\nOne click on a large RGB image, bundled model, embedding cached (median ms):")
    print(f"  {'image':>11}  {'3 upscaled':>10}  {'1 upscaled':>10}  speed-up")
    for shape in ((2048, 2048), (3000, 4000)):
        every, shown = time_click(shape, args.clicks)
        print(f"  {shape[0]:>5}x{shape[1]:<5}  {every:>10.0f}  {shown:>10.0f}  {every / shown:6.2f}x")
    stack = f"{args.slices}x{SIDE}x{SIDE}"
    print(f"\nA lazily read {stack} uint16 stack (dask), bundled model, one slice embedded:")
    for mode in ("lazy", "in memory"):
        out = subprocess.run(
            [sys.executable, __file__, "--stack-run", mode, "--slices", str(args.slices)],
            capture_output=True, text=True, check=True,
        )
        print("  " + out.stdout.strip().splitlines()[-1])


def scene(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A dim RGB field with 40 bright round cells of 20 to 60 px radius."""
    rng = np.random.default_rng(seed)
    image = (rng.random((*shape, 3)) * 60).astype(np.uint8)
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    for _ in range(40):
        y, x, r = rng.integers(100, shape[0] - 100), rng.integers(100, shape[1] - 100), rng.integers(20, 60)
        image[(rows - y) ** 2 + (cols - x) ** 2 < r * r] = 200
    return image


def time_click(shape: tuple[int, int], clicks: int) -> tuple[float, float]:
    """Median ms of a click decoded with every candidate upscaled, and with the best one alone."""
    from samcore import Predictor, load_model

    predictor = Predictor(load_model("default"))
    predictor.set_image(scene(shape))
    points = np.random.default_rng(1).uniform(100, min(shape) - 100, size=(clicks + 1, 2))
    every, shown = [], []
    for point in points:
        prompt = {"point_coords": point[None], "point_labels": np.array([1]), "refine": False}
        start = time.perf_counter()
        predictor.predict(**prompt)
        middle = time.perf_counter()
        scores, low_res = predictor.predict_logits(**prompt)
        predictor.masks_from_logits(low_res[[int(np.argmax(scores))]])
        end = time.perf_counter()
        every.append(middle - start)
        shown.append(end - middle)
    # The first click warms up the decoder.
    return 1000 * statistics.median(every[1:]), 1000 * statistics.median(shown[1:])


def stack_run(mode: str, slices: int) -> None:
    """One process: open the stack lazily or in memory, embed its middle slice, print the figures."""
    import dask.array as da

    from samcore import Predictor, load_model
    from samcore.embeddings import EmbeddingStore, StackView, embed_slices

    def pixels(block, block_info=None):  # a slice "read from disk": made when asked for
        z = block_info[None]["chunk-location"][0]
        return np.random.default_rng(z).integers(0, 4000, block.shape, dtype=np.uint16)

    shape = (slices, SIDE, SIDE)
    lazy = da.zeros(shape, dtype=np.uint16, chunks=(1, SIDE, SIDE)).map_blocks(pixels, dtype=np.uint16)
    predictor = Predictor(load_model("default"), views=1)
    start = time.perf_counter()
    view = StackView.of(lazy if mode == "lazy" else np.asarray(lazy))
    opened = time.perf_counter() - start
    list(embed_slices(predictor, view, EmbeddingStore("bench", view.n_slices), [slices // 2]))
    first = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{mode:>9}: opened in {opened:.1f} s, first slice embedded at {first:.1f} s, "
          f"peak memory {peak:.0f} MB")


if __name__ == "__main__":
    main()
