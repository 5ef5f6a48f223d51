"""Make docs/widget.png: the widget in napari with objects committed on a real image.

The image is the DSB 2018 nuclei image of the benchmarks (`$NAPARI_SAM_DATA/dsb2018/image.tif`,
default ../shared/data; CC0), which the model never saw in training. Clicks go on the
nuclei's most interior pixels, found from an Otsu threshold, as a user would click; each is
segmented with the bundled model and committed as a new object. Needs a display (xvfb-run).

Run:  xvfb-run -a python docs/screenshot.py [--clicks 25] [--out docs/widget.png] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import napari
import numpy as np
import tifffile
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops


def click_targets(image: np.ndarray, count: int) -> list[tuple[int, int]]:
    """Most interior pixels of the largest Otsu components, at most `count` of them."""
    regions = regionprops(label(image > threshold_otsu(image)))
    regions = sorted(regions, key=lambda region: region.area, reverse=True)[:count]
    targets = []
    for region in regions:
        depth = ndimage.distance_transform_edt(region.image)
        y, x = np.unravel_index(np.argmax(depth), depth.shape)
        targets.append((region.bbox[0] + int(y), region.bbox[1] + int(x)))
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("widget.png"))
    parser.add_argument("--checkpoint", type=Path, help="a weight file instead of the bundled model")
    args = parser.parse_args()

    root = Path(__file__).resolve().parents[1]
    data = Path(os.environ.get("NAPARI_SAM_DATA", root.parent / "shared" / "data"))
    image = tifffile.imread(data / "dsb2018" / "image.tif")
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    viewer.add_image(image, name="dsb2018 nuclei")
    _, sam = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    if args.checkpoint:
        sam.set_model(checkpoint=args.checkpoint)
    sam.load(block=True)
    for y, x in click_targets(image, args.clicks):
        sam.add_point((y, x))
        sam.commit()
    objects = int(np.unique(sam.output_layer().data).size - 1)
    viewer.reset_view()
    napari.qt.get_qapp().processEvents()
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"{objects} objects committed; wrote {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
