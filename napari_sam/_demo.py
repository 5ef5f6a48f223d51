"""`napari-sam demo`: napari on a sample stack with the SAM widget docked and embeddings started."""

from __future__ import annotations

from pathlib import Path

import napari

from ._widget import SamWidget

SAMPLES = ("synthetic_nuclei_3d", "synthetic_nuclei_2d")


def open_demo(
    viewer: napari.Viewer,
    model: str | None = None,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    sample: str = SAMPLES[0],
    compute: bool = True,
) -> SamWidget:
    """Add the sample and the widget to `viewer`, choose the model and start the embeddings."""
    if sample not in SAMPLES:
        raise ValueError(f"Unknown sample {sample!r}; choose one of {', '.join(SAMPLES)}.")
    viewer.open_sample("napari-sam", sample)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    image = next(layer for layer in viewer.layers if isinstance(layer, napari.layers.Image))
    widget._image.value = image
    widget.set_model(model or "default", checkpoint, device)
    if compute:
        widget.load()
    return widget


def main(model: str | None, checkpoint: str | None, device: str, sample: str) -> int:
    """Run the demo until the window is closed."""
    viewer = napari.Viewer(title="napari-sam demo")
    open_demo(viewer, model, checkpoint, device, sample)
    napari.run()
    return 0
