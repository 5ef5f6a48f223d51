"""Sample data: synthetic fluorescence nuclei, generated on the fly (no download)."""

from __future__ import annotations

from typing import Any

from samcore.synthetic import nuclei_image, nuclei_stack


def synthetic_nuclei_2d() -> list[tuple[Any, dict, str]]:
    """A 256x256 uint16 image of synthetic nuclei and their instance labels."""
    image, labels = nuclei_image(shape=(256, 256), seed=0)
    return [
        (image, {"name": "synthetic nuclei"}, "image"),
        (labels, {"name": "synthetic nuclei labels", "visible": False}, "labels"),
    ]


def synthetic_nuclei_3d() -> list[tuple[Any, dict, str]]:
    """A 32x256x256 (ZYX) uint16 stack of synthetic nuclei and their 3D instance labels."""
    image, labels = nuclei_stack(shape=(32, 256, 256), seed=0)
    return [
        (image, {"name": "synthetic nuclei stack"}, "image"),
        (labels, {"name": "synthetic nuclei stack labels", "visible": False}, "labels"),
    ]
