"""Shared test set-up: the reference implementation's torchvision stand-in on sys.path."""

import pathlib
import sys

REFERENCE = pathlib.Path(__file__).parents[1] / "reference"
sys.path.insert(0, str(REFERENCE.parent))  # tests/weights.py

from weights import randomize_  # noqa: E402,F401  (re-exported for the tests)

try:  # segment-anything imports torchvision, which has no CPU build here.
    import torchvision  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REFERENCE))

import numpy as np
import pytest


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


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private weights cache folder; any URL other than a local file is refused (no test downloads)."""
    from offline import offline_cache

    return offline_cache(tmp_path / "cache", monkeypatch)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A weight file of the tiny `vit_test` SAM with seeded random weights (a module may override it)."""
    from tiny_models import save_tiny_vit

    return save_tiny_vit(tmp_path_factory.mktemp("weights") / "tiny.pth")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command loads a model: its errors must come before that."""
    import samcore.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(samcore.loading, "load_model", refuse)
