"""Plugin test set-up: a tiny SAM checkpoint and a synthetic stack, written by the tests."""

import pathlib
import sys

import numpy as np
import pytest

from samcore.synthetic import nuclei_stack

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))  # tests/tiny_models.py
from tiny_models import save_tiny_vit  # noqa: E402


@pytest.fixture(autouse=True)
def private_folders(tmp_path, monkeypatch):
    """A private, empty weights cache folder (any URL other than a local file is refused) and a private
    autosave folder, returned."""
    from offline import offline_cache

    from napari_sam._autosave import AUTOSAVE_ENV_VAR

    offline_cache(tmp_path / "weights-cache", monkeypatch)
    monkeypatch.setenv(AUTOSAVE_ENV_VAR, str(tmp_path / "autosave"))
    return tmp_path / "autosave"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("weights") / "tiny.pth")


@pytest.fixture(scope="session")
def stack():
    return nuclei_stack((4, 96, 96), n_nuclei=4, seed=0)[0]


@pytest.fixture
def messages(monkeypatch):
    """Notifications the widget shows, by kind."""
    import napari_sam._widget as widget_module

    seen = {"error": [], "warning": [], "info": []}
    for kind in seen:
        monkeypatch.setattr(widget_module, f"show_{kind}", seen[kind].append)
    return seen


@pytest.fixture
def sam(make_napari_viewer, tiny_checkpoint, stack):
    """A viewer with the stack and the widget opened from the plugin menu, model chosen."""
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
    widget._model.value = "checkpoint file…"
    widget._checkpoint.value = str(tiny_checkpoint)
    return viewer, widget


# A rectangle around a nucleus of the `stack` fixture on slice 2, as (z, y, x) corners.
BOX = np.array([[2, 5, 5], [2, 5, 80], [2, 80, 80], [2, 80, 5]])


def commit_box(viewer, widget):
    """Embed slice 2, commit the object in BOX there; the objects layer."""
    viewer.dims.set_current_step(0, 2)
    widget.load(block=True)
    widget._prompt_layers.boxes.add_rectangles(BOX)
    widget.commit()
    return widget.output_layer()


def preview_mask(widget, z):
    return np.asarray(widget._prompt_layers.preview.data[z]) > 0
