"""Shared test set-up: the reference implementation's torchvision stand-in on sys.path."""

import pathlib
import sys

REFERENCE = pathlib.Path(__file__).parents[1] / "reference"

try:  # segment-anything imports torchvision, which has no CPU build here.
    import torchvision  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REFERENCE))

import numpy as np
import pytest
import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value, including those initialised to constants
    (zero relative-position tables and absolute positions, unit LayerNorm weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "rel_pos" in name or "pos_embed" in name:
                param.copy_(0.5 * noise)
            elif param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.add_(0.1 * noise)
    return model


@pytest.fixture(scope="session")
def real_rgb() -> np.ndarray:
    """A real microscopy image (immunohistochemistry, 512x512 RGB uint8) shipped with scikit-image."""
    import skimage.data

    return skimage.data.immunohistochemistry()


@pytest.fixture(scope="session")
def real_gray() -> np.ndarray:
    """A real, non-square grayscale microscopy image (660x550 uint8) shipped with scikit-image."""
    import skimage.data

    return skimage.data.cell()
