"""Widget responsiveness while embeddings compute, and click-to-preview latency.

Run under a display (e.g. `xvfb-run -a python benchmarks/bench_plugin.py`). Prints:
  * the longest gap of a 10 ms Qt timer on the main thread while the widget embeds a stack in the
    background (how long the viewer would freeze), for `--slices` slices of nuclei3d;
  * click-to-preview time on the 512x512 DSB 2018 image with its embedding cached: from adding a
    point to the Points layer until the preview layer holds the mask (median over clicks);
  * the first click on a slice of the stack: right after moving to the slice, and after the slider
    has rested there (when the widget makes the slice's decoder contexts ahead of the click), the
    same slices both ways, alternated;
  * how long Cancel takes when pressed part-way through a slice's embedding, next to the time one
    slice takes (what a cancel that waits for the slice in progress would cost, at worst);
  * the same for segment all on the DSB image, next to the time one batch of its points takes (what a
    cancel that waits for the batch in progress would cost, at worst).

Weights: random ViT-B (or --checkpoint FILE); timing does not depend on the values.
Data: $NAPARI_SAM_DATA (default ../shared/data).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NAPARI_SAM_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="weights to use (default: random ViT-B written to a temp file)")
    parser.add_argument("--slices", type=int, default=4, help="slices of nuclei3d to embed while watching the UI")
    parser.add_argument("--clicks", type=int, default=30)
    parser.add_argument("--cancels", type=int, default=3, help="tries of Cancel during an embedding")
    parser.add_argument("--rounds", type=int, default=4, help="first clicks on each slice, each way")
    args = parser.parse_args()

    import napari

    checkpoint = args.checkpoint or random_checkpoint()
    stack = tifffile.imread(DATA / "nuclei3d" / "image.tif")[: args.slices]
    viewer = napari.Viewer()
    viewer.add_image(stack, name="nuclei3d")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget._model.value = "checkpoint file…"
    widget._checkpoint.value = checkpoint

    started = time.perf_counter()
    worst, gaps = watch_event_loop(widget)
    elapsed = time.perf_counter() - started
    print(f"embedding {args.slices} slices of {stack.shape[1]}x{stack.shape[2]} in the background: {elapsed:.1f} s")
    print(f"  Qt event loop: worst stall {worst * 1000:.0f} ms, 99th percentile gap "
          f"{np.percentile(gaps, 99) * 1000:.0f} ms over {len(gaps)} timer ticks (10 ms timer)")

    image = tifffile.imread(DATA / "dsb2018" / "image.tif")
    layer = viewer.add_image(image, name="dsb2018")
    widget._image.value = layer
    widget.load(block=True)
    latencies = click_latencies(widget, image.shape, args.clicks)
    print(f"click to preview on {image.shape[0]}x{image.shape[1]}, embedding cached: "
          f"median {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms "
          f"({len(latencies)} clicks)")

    stack_layer = viewer.layers["nuclei3d"]
    at_once, rested = first_click_latencies(viewer, widget, stack_layer, args.rounds)
    print(f"first click on a slice of nuclei3d ({len(at_once)} each way): right after moving to it "
          f"median {statistics.median(at_once) * 1000:.1f} ms, after the slider rested "
          f"{statistics.median(rested) * 1000:.1f} ms")
    widget._image.value = layer
    widget.load(block=True)

    waits, batch_seconds = segment_all_cancel_latencies(widget, args.cancels)
    print(f"Cancel pressed during segment all: returned in median {statistics.median(waits) * 1000:.0f} ms, "
          f"max {max(waits) * 1000:.0f} ms ({len(waits)} tries); one batch of points takes {batch_seconds:.1f} s")

    waits, slice_seconds = cancel_latencies(viewer, widget, stack, args.cancels)
    print(f"Cancel pressed part-way through a slice: returned in median {statistics.median(waits) * 1000:.0f} "
          f"ms, max {max(waits) * 1000:.0f} ms ({len(waits)} tries); one slice's embedding takes "
          f"{slice_seconds:.1f} s")
    viewer.close()


def random_checkpoint() -> str:
    from samcore import build_sam

    path = Path(tempfile.mkdtemp()) / "vit_b_random.pth"
    torch.manual_seed(0)
    torch.save(build_sam("vit_b").state_dict(), path)
    return str(path)


def watch_event_loop(widget) -> tuple[float, list[float]]:
    """Start embedding and record the gaps between ticks of a 10 ms timer until it finishes."""
    from qtpy.QtCore import QCoreApplication, QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    widget.load()
    while widget._embedding.running:
        QCoreApplication.processEvents()
        time.sleep(0.001)
    timer.stop()
    gaps = np.diff(ticks).tolist()
    return max(gaps), gaps


def click_latencies(widget, shape: tuple[int, int], clicks: int) -> list[float]:
    rng = np.random.default_rng(0)
    latencies = []
    for _ in range(clicks):
        widget.clear()
        y, x = rng.uniform(20, shape[0] - 20), rng.uniform(20, shape[1] - 20)
        start = time.perf_counter()
        widget.add_point((y, x))
        latencies.append(time.perf_counter() - start)
        assert widget._candidates is not None
    return latencies


def first_click_latencies(viewer, widget, stack_layer, rounds: int) -> tuple[list[float], list[float]]:
    """Click each slice of the stack right after moving to it, and after the slider rested there.

    Before each click the viewer shows another slice for a while, whose decoder contexts the widget
    then holds. Returns the latencies of the clicks made at once and of those made after resting.
    """
    from napari_sam._widget import REFOCUS_MS

    widget._image.value = stack_layer
    widget.load(block=True)  # the stack's embeddings, computed first, are taken up again
    slices = stack_layer.data.shape[0]
    rng = np.random.default_rng(3)
    at_once, rested = [], []
    for round_ in range(rounds):
        for z in range(slices):
            for rest in (False, True) if (round_ + z) % 2 else (True, False):
                widget.clear()
                viewer.dims.set_current_step(0, (z + 1) % slices)
                run_events(3 * REFOCUS_MS / 1000)
                viewer.dims.set_current_step(0, z)
                if rest:
                    run_events(3 * REFOCUS_MS / 1000)
                y, x = rng.uniform(20, stack_layer.data.shape[1] - 20, 2)
                start = time.perf_counter()
                widget.add_point((z, y, x))
                (rested if rest else at_once).append(time.perf_counter() - start)
                assert widget._candidates is not None
    widget.clear()
    return at_once, rested


def run_events(seconds: float) -> None:
    """Let the viewer run (timers fire, signals arrive) for `seconds`."""
    from qtpy.QtCore import QCoreApplication

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QCoreApplication.processEvents()
        time.sleep(0.002)


def segment_all_cancel_latencies(widget, tries: int) -> tuple[list[float], float]:
    """Segment all on the displayed image once, timed; then press Cancel at a random moment of it."""
    import math

    from samcore.automatic import AutoSettings

    widget.clear()
    settings = AutoSettings.for_model(widget._session.predictor.model)
    batches = math.ceil(settings.points_per_side**2 / settings.points_per_batch)
    started = time.perf_counter()
    widget.segment_all("slice", block=True)
    whole = time.perf_counter() - started
    widget.undo()
    rng = np.random.default_rng(2)
    waits = []
    for _ in range(tries):
        widget.segment_all("slice")
        waits.append(cancel_after(widget, rng.uniform(0.2, 0.8) * whole))
    return waits, whole / batches


def cancel_latencies(viewer, widget, stack: np.ndarray, tries: int) -> tuple[list[float], float]:
    """Press Cancel at a random moment of a slice's embedding, `tries` times; also time one slice."""
    widget.clear()  # the last click belongs to the DSB image
    layer = viewer.add_image(stack[0], name="one slice")
    widget._image.value = layer
    started = time.perf_counter()
    widget.load(block=True)
    slice_seconds = time.perf_counter() - started
    rng = np.random.default_rng(1)
    waits = []
    for _ in range(tries):
        layer.data = layer.data.copy()  # new data: the next Compute embeddings starts afresh
        widget.load()
        waits.append(cancel_after(widget, rng.uniform(0.2, 0.8) * slice_seconds))
    return waits, slice_seconds


def cancel_after(widget, seconds: float) -> float:
    """Let the viewer run for `seconds`, then press Cancel; returns how long Cancel took."""
    from qtpy.QtCore import QCoreApplication

    pressed = time.perf_counter() + seconds
    while time.perf_counter() < pressed:
        QCoreApplication.processEvents()
        time.sleep(0.005)
    start = time.perf_counter()
    widget.cancel()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
