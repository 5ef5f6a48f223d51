"""The demo opens the sample, docks the widget and computes embeddings with the chosen model."""

import pytest

from napari_sam._demo import open_demo


def test_demo_opens_sample_and_widget(make_napari_viewer, tiny_checkpoint):
    viewer = make_napari_viewer()
    widget = open_demo(viewer, checkpoint=tiny_checkpoint, sample="synthetic_nuclei_2d", compute=False)
    assert widget._image.value.name == "synthetic nuclei"
    widget.load(block=True)
    assert len(widget._session.store) == 1
    widget.add_point((128, 128))
    assert widget._candidates is not None


def test_demo_refuses_unknown_sample(make_napari_viewer):
    with pytest.raises(ValueError, match="Unknown sample"):
        open_demo(make_napari_viewer(), sample="cells")
