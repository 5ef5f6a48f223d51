"""`napari-sam embed` and `napari-sam auto` on TIFF files and folders the tests write."""

import numpy as np
import pytest
import tifffile
import torch

from samcore import Predictor
from samcore.build import ARCHITECTURES
from samcore.cli import main
from samcore.embeddings import EmbeddingStore, StackView, model_key, stack_key, store_path
from samcore.synthetic import nuclei_stack
from tiny_models import TINY_MICRO, tiny_sam

NAME = "micro_cli_test"


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The tiny architecture in the registry, so its checkpoints are recognised."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ARCHITECTURES, NAME, TINY_MICRO)
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(tiny_sam().state_dict(), path)
    return path


@pytest.fixture
def stack_file(tmp_path):
    stack = nuclei_stack((4, 40, 48), n_nuclei=4, radius=(5.0, 8.0), seed=4)[0]
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    return tmp_path / "stack.tif"


def cli(*args, checkpoint) -> int:
    return main([*map(str, args), "--checkpoint", str(checkpoint), "--precision", "fp32"])


def test_auto_writes_compressed_labels_of_the_stack_shape(tmp_path, stack_file, checkpoint, capsys):
    out = tmp_path / "out" / "labels.tif"
    assert cli("auto", stack_file, "-o", out, "--points-per-side", 4, checkpoint=checkpoint) == 0
    with tifffile.TiffFile(out) as tiff:
        labels = tiff.asarray()
        assert tiff.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    assert labels.shape == (4, 40, 48) and labels.dtype == np.uint16
    err = capsys.readouterr().err
    assert f"wrote {out}" in err and "stack.tif" in err  # the progress bar names the file


def test_auto_on_a_folder_of_2d_and_rgb_images_then_skips_finished_ones(tmp_path, checkpoint, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "gray.tif", rng.integers(0, 4000, (40, 48), dtype=np.uint16))
    tifffile.imwrite(folder / "rgb.tiff", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    args = ("auto", folder, "-o", tmp_path / "labels", "--points-per-side", 2)
    assert cli(*args, checkpoint=checkpoint) == 0
    for name in ("gray", "rgb"):
        assert tifffile.imread(tmp_path / "labels" / f"{name}_labels.tif").shape == (40, 48)
    capsys.readouterr()
    assert cli(*args, checkpoint=checkpoint) == 0
    assert capsys.readouterr().err.count("skipped") == 2


def test_embed_makes_the_store_the_widget_finds(tmp_path, stack_file, checkpoint):
    assert cli("embed", stack_file, "--cache-dir", tmp_path / "cache", checkpoint=checkpoint) == 0
    model = tiny_sam()  # the same weights, as the widget would load them
    view = StackView.of(tifffile.imread(stack_file))  # as napari reads the file
    key = stack_key(view, model_key(model))
    store = EmbeddingStore(key, view.n_slices, store_path(tmp_path / "cache", "stack", key))
    assert len(store) == 4 and store.dtype == "float16"
    expected = Predictor(model, "fp32").embed_rgb(view.rgb_slice(2)).features
    torch.testing.assert_close(store.get(2).features, expected, atol=2e-2, rtol=2e-3)


def test_interrupted_embed_resumes_without_recomputing(tmp_path, stack_file, checkpoint, monkeypatch, capsys):
    calls = []
    embed_rgb = Predictor.embed_rgb

    def counted(self, rgb):
        if len(calls) == limit:
            raise KeyboardInterrupt
        calls.append(1)
        return embed_rgb(self, rgb)

    monkeypatch.setattr(Predictor, "embed_rgb", counted)
    store = tmp_path / "stack.zarr"
    limit = 2
    # Ctrl-C while the third slice is embedded
    assert cli("embed", stack_file, "--store", store, checkpoint=checkpoint) == 130
    assert "interrupted" in capsys.readouterr().err
    calls.clear()
    limit = None
    assert cli("embed", stack_file, "--store", store, checkpoint=checkpoint) == 0
    assert len(calls) == 2
    assert "2 slices computed" in capsys.readouterr().err


def test_a_store_of_other_data_or_another_model_is_refused(tmp_path, stack_file, checkpoint, capsys):
    store = tmp_path / "stack.zarr"
    assert cli("embed", stack_file, "--store", store, checkpoint=checkpoint) == 0
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, tifffile.imread(stack_file) + 1, photometric="minisblack")
    capsys.readouterr()
    assert cli("auto", other, "--store", store, checkpoint=checkpoint) == 1
    err = capsys.readouterr().err
    assert "made for other data or another model" in err and "Traceback" not in err
    other_weights = tmp_path / "other.pth"
    torch.save(tiny_sam(seed=1).state_dict(), other_weights)
    assert cli("embed", stack_file, "--store", store, checkpoint=other_weights) == 1
    assert "made for other data or another model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["embed", "{folder}"], "--cache-dir DIR or --store"),
        (["embed", "{folder}", "--store", "{folder}/s.zarr"], "for a folder of inputs use --cache-dir"),
        (["auto", "{folder}/missing.tif"], "No file or folder"),
        (["auto", "{empty}"], "holds no .tif"),
    ],
)
def test_batch_errors_are_one_clear_line(tmp_path, stack_file, checkpoint, capsys, args, message):
    (tmp_path / "empty").mkdir()
    filled = [a.format(folder=tmp_path, empty=tmp_path / "empty") for a in args]
    assert cli(*filled, checkpoint=checkpoint) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["embed", "auto"])
def test_help_shows_examples(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--scheduler" in out and "--cache-dir" in out


def test_a_folder_that_is_no_store_is_left_alone(tmp_path, stack_file, checkpoint, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert cli("embed", stack_file, "--store", folder, checkpoint=checkpoint) == 1
    assert "is not an embedding store" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
