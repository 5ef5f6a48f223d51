"""`napari-sam embed` and `napari-sam auto` on TIFF files and folders the tests write."""

import numpy as np
import pytest
import tifffile
import torch

from samcore import Predictor, load_model
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


def test_auto_says_which_thresholds_to_lower_when_it_keeps_nothing(tmp_path, stack_file, checkpoint, capsys):
    out = tmp_path / "labels.tif"
    options = ("--points-per-side", 2, "--min-iou", 1, "--min-stability", 1)
    assert cli("auto", stack_file, "-o", out, *options, checkpoint=checkpoint) == 0
    assert tifffile.imread(out).max() == 0
    assert "lower --min-iou or --min-stability" in capsys.readouterr().err


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
    model = load_model(checkpoint=checkpoint, device="cpu")  # as the widget loads the file
    predictor = Predictor(model, "fp32")  # the model's own views, as the widget's
    view = StackView.of(tifffile.imread(stack_file))  # as napari reads the file
    key = stack_key(view, model_key(model), predictor.views)
    store = EmbeddingStore(key, view.n_slices, store_path(tmp_path / "cache", "stack", key))
    assert len(store) == 4 and store.dtype == "float16"
    expected = predictor.embed_rgb(view.rgb_slice(2)).features
    torch.testing.assert_close(store.get(2).features, expected, atol=2e-2, rtol=2e-3)


def test_embed_in_passes_of_several_slices_stores_what_one_at_a_time_stores(tmp_path, stack_file, checkpoint):
    for batch in (1, 3):  # 3: a pass of three slices, then one of the last
        assert cli("embed", stack_file, "--store", tmp_path / f"{batch}.zarr", "--embed-batch", batch,
                   checkpoint=checkpoint) == 0
    model = load_model(checkpoint=checkpoint, device="cpu")
    view = StackView.of(tifffile.imread(stack_file))
    key = stack_key(view, model_key(model), Predictor(model, "fp32").views)
    one, three = (EmbeddingStore(key, view.n_slices, tmp_path / f"{batch}.zarr") for batch in (1, 3))
    assert len(one) == len(three) == 4
    for z in range(4):
        torch.testing.assert_close(three.get(z).features, one.get(z).features, atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("command", ["embed", "auto"])
def test_embed_batch_is_a_count_of_slices(tmp_path, stack_file, checkpoint, capsys, no_model, command):
    with pytest.raises(SystemExit):
        cli(command, stack_file, "--store", tmp_path / "s.zarr", "--embed-batch", 0, checkpoint=checkpoint)
    assert "argument --embed-batch: at least 1 is needed, not 0" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_interrupted_embed_resumes_without_recomputing(tmp_path, stack_file, checkpoint, monkeypatch, capsys):
    calls = []  # one per slice: on a CPU, a pass of the encoder embeds one
    embed_rgb_batch = Predictor.embed_rgb_batch

    def counted(self, images, cancel=None, crop=False):
        if len(calls) == limit:
            raise KeyboardInterrupt
        calls.extend([1] * len(images))
        return embed_rgb_batch(self, images, cancel, crop)

    monkeypatch.setattr(Predictor, "embed_rgb_batch", counted)
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
    calls.clear()
    assert cli("embed", stack_file, "--store", store, checkpoint=checkpoint) == 0  # all there now
    assert not calls
    assert "every slice was already there, none computed" in capsys.readouterr().err


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


def test_an_empty_folder_made_for_the_store_becomes_it_and_another_folder_is_refused(
    tmp_path, stack_file, checkpoint, capsys
):
    store = tmp_path / "stack.zarr"
    store.mkdir()
    assert cli("embed", stack_file, "--store", store, checkpoint=checkpoint) == 0
    assert any(store.iterdir())
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli("embed", stack_file, "--store", other, checkpoint=checkpoint) == 1
    assert "is not an embedding store" in capsys.readouterr().err
    assert [path.name for path in other.iterdir()] == ["notes.txt"]


def test_a_file_that_is_no_image_is_one_line_naming_it(tmp_path, capsys):
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    assert main(["segment", str(fake), "--point", "1", "1", "-o", str(tmp_path / "o.tif")]) == 1
    err = capsys.readouterr().err.strip()
    assert "fake.png: it cannot be read as an image" in err and len(err.splitlines()) == 1
    assert "reads TIFF files" in err  # and says what it can read


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["embed", "{folder}"], "--cache-dir DIR or --store"),
        (["embed", "{folder}", "--store", "{folder}/s.zarr"], "for a folder of inputs use --cache-dir"),
        (["auto", "{folder}/missing.tif"], "No file or folder"),
        (["auto", "{empty}"], "holds no .tif"),
        (["auto", "{folder}/stack.tif", "-o", "{folder}/stack.tif", "--overwrite"],
         "stack.tif is an input of this command; napari-sam never writes over its inputs"),
        (["auto", "{folder}/stack.tif", "-o", "{folder}/labels.png"], "labels are written as TIFF"),
        (["auto", "{folder}", "-o", "{folder}/labels.tif"], "is a folder of inputs: give a folder"),
        (["auto", "{folder}/stack.tif", "--link-overlap", "5"],
         "--link-overlap is a fraction of the smaller object, above 0 and at most 1, not 5"),
        (["embed", "{folder}/stack.tif", "--cache-dir", "{folder}/stack.tif"],
         "Cannot write --cache-dir {folder}/stack.tif: {folder}/stack.tif is a file, not a folder"),
        (["embed", "{folder}/stack.tif", "--store", "{folder}/stack.tif"],
         "--store {folder}/stack.tif is an input of this command"),
    ],
)
def test_batch_errors_are_one_clear_line(tmp_path, stack_file, checkpoint, capsys, no_model, args, message):
    (tmp_path / "empty").mkdir()
    before = stack_file.read_bytes()
    filled = [a.format(folder=tmp_path, empty=tmp_path / "empty") for a in args]
    assert cli(*filled, checkpoint=checkpoint) == 1
    err = capsys.readouterr().err
    assert message.format(folder=tmp_path) in err and "Traceback" not in err and "min_overlap" not in err
    assert stack_file.read_bytes() == before


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


def test_a_folder_run_twice_leaves_the_labels_it_wrote_alone(tmp_path, checkpoint, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", np.random.default_rng(0).integers(0, 4000, (40, 48), dtype=np.uint16))
    for _ in range(2):
        assert cli("auto", folder, "--points-per-side", 2, "--overwrite", checkpoint=checkpoint) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["a.tif", "a_labels.tif"]
    err = capsys.readouterr().err
    assert f"skipped {folder / 'a_labels.tif'}: the labels napari-sam wrote for a.tif" in err
    assert cli("embed", folder, "--cache-dir", tmp_path / "cache", checkpoint=checkpoint) == 0
    assert [p.name[:2] for p in (tmp_path / "cache").iterdir()] == ["a-"]


def test_one_bad_file_does_not_stop_a_folder(tmp_path, checkpoint, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "0text.tif").write_text("hello, not an image")
    tifffile.imwrite(folder / "1fourd.tif", np.zeros((2, 4, 40, 48), np.uint16), photometric="minisblack")
    tifffile.imwrite(folder / "2good.tif", np.random.default_rng(0).integers(0, 4000, (40, 48), np.uint16))
    assert cli("auto", folder, "-o", tmp_path / "labels", "--points-per-side", 2, checkpoint=checkpoint) == 1
    assert [p.name for p in (tmp_path / "labels").iterdir()] == ["2good_labels.tif"]
    err = capsys.readouterr().err
    assert f"{folder / '0text.tif'}: it cannot be read as a TIFF file" in err
    assert f"{folder / '1fourd.tif'}: this is a 4D image" in err
    assert err.rstrip().endswith("2 of 3 files failed: 0text.tif, 1fourd.tif")


def test_a_store_made_with_other_views_says_so(tmp_path, stack_file, checkpoint, capsys):
    store = tmp_path / "stack.zarr"
    assert cli("embed", stack_file, "--store", store, "--views", 1, checkpoint=checkpoint) == 0
    capsys.readouterr()
    assert cli("embed", stack_file, "--store", store, "--views", 2, checkpoint=checkpoint) == 1
    err = capsys.readouterr().err
    said = f"{stack_file}: the embedding store {store} was made with --views 1, and this run uses --views 2"
    assert said in err


def test_workers_get_absolute_store_paths(tmp_path, stack_file, checkpoint, monkeypatch):
    import distributed

    import samcore.distributed

    opened = []
    open_spec = samcore.distributed._open_spec

    def recorded(spec):  # runs on the worker
        opened.append(spec[2])
        return open_spec(spec)

    monkeypatch.setattr(samcore.distributed, "_open_spec", recorded)
    monkeypatch.chdir(tmp_path)  # the store's folder is given relative to it
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        assert cli("embed", stack_file.name, "--cache-dir", "emb", "--scheduler", cluster.scheduler_address,
                   checkpoint=checkpoint) == 0
    (store,) = (tmp_path / "emb").iterdir()
    assert len(opened) == 4 and set(opened) == {str(store)}


def test_a_compressed_stack_is_read_page_by_page_and_segmented_like_the_plain_file(
    tmp_path, stack_file, checkpoint
):
    import zarr

    from samcore.batch import open_view

    stack = tifffile.imread(stack_file)
    packed = tmp_path / "packed" / "stack.tif"
    packed.parent.mkdir()
    tifffile.imwrite(packed, stack, photometric="minisblack", compression="zlib")
    view, shape = open_view(packed)
    assert isinstance(view.data, zarr.Array) and shape == stack.shape  # not read whole
    np.testing.assert_array_equal(view.data[2], stack[2])
    assert cli("auto", stack_file, "-o", tmp_path / "plain.tif", checkpoint=checkpoint) == 0
    assert cli("auto", packed, "-o", tmp_path / "packed.tif", checkpoint=checkpoint) == 0
    labels = [tifffile.imread(tmp_path / name) for name in ("packed.tif", "plain.tif")]
    np.testing.assert_array_equal(*labels)


def _cut(path, keep=0.5):
    """`path` as an interrupted copy leaves it: its first part only."""
    data = path.read_bytes()
    cut = path.with_name(f"cut_{path.name}")
    cut.write_bytes(data[: int(len(data) * keep)])
    return cut


@pytest.mark.parametrize("writer", [
    {"compression": "zlib"}, {}, {"imagej": True},
], ids=["compressed", "plain", "imagej"])
def test_a_stack_cut_short_is_refused_by_name_and_nothing_is_written(tmp_path, checkpoint, capsys, writer):
    stack = nuclei_stack((12, 64, 64), n_nuclei=4, radius=(5.0, 8.0), seed=4)[0]
    tifffile.imwrite(tmp_path / "stack.tif", stack, **writer)
    cut = _cut(tmp_path / "stack.tif")
    out = tmp_path / "labels.tif"
    assert cli("auto", cut, "-o", out, "--points-per-side", 2, checkpoint=checkpoint) == 1
    err = capsys.readouterr().err
    assert f"{cut.name}: the file is damaged or was cut short" in err and "Traceback" not in err
    assert "tifffile" not in err  # its own log lines are not shown beside the message
    assert not out.exists()
    assert main(["segment", str(cut), "--slice", "2", "--point", "20", "20", "-o", str(out),
                 "--checkpoint", str(checkpoint)]) == 1
    assert "damaged or was cut short" in capsys.readouterr().err and not out.exists()


def test_a_tiff_with_a_header_only_is_named_in_one_line(tmp_path, checkpoint, capsys):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"II*\x00\x08\x00\x00\x00")  # what a writer that failed at once leaves
    assert main(["segment", str(empty), "--point", "20", "20", "-o", str(tmp_path / "o.tif"),
                 "--checkpoint", str(checkpoint)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{empty}: it cannot be read as a TIFF file" in err[0]


def test_two_channels_saved_last_are_one_image_for_segment_and_refused_as_a_stack(
    tmp_path, checkpoint, capsys
):
    plane = nuclei_stack((1, 40, 48), n_nuclei=3, radius=(5.0, 8.0), seed=4)[0][0]
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, np.stack([plane, plane // 2], axis=-1), photometric="minisblack")
    out = tmp_path / "labels.tif"
    assert cli("auto", path, "-o", out, "--points-per-side", 2, checkpoint=checkpoint) == 1
    assert "looks like a 2D image with 2 channels" in capsys.readouterr().err and not out.exists()
    prompts = tmp_path / "p.json"
    prompts.write_text('{"objects": [{"id": 1, "points": [[20, 20]]}]}')
    assert cli("segment", path, "--prompts", prompts, "-o", out, checkpoint=checkpoint) == 1
    assert "looks like a 2D image with 2 channels" in capsys.readouterr().err and not out.exists()
    assert cli("segment", path, "--point", 20, 20, "-o", out, checkpoint=checkpoint) == 0
    assert tifffile.imread(out).shape == (40, 48)


def test_labels_stopped_while_written_leave_no_file_that_looks_finished(tmp_path, monkeypatch):
    from samcore.batch import write_labels

    out = tmp_path / "labels.tif"
    labels = np.arange(4 * 30 * 40, dtype=np.uint16).reshape(4, 30, 40)
    written = tifffile.imwrite

    def interrupted(path, data, **options):
        written(path, data[:1], **options)  # the first page is on disk when the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_labels(out, labels)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(tifffile, "imwrite", written)
    write_labels(out, labels)
    np.testing.assert_array_equal(tifffile.imread(out), labels)
    assert [path.name for path in tmp_path.iterdir()] == ["labels.tif"]


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--crop-layers", "-1"], "--crop-layers cannot be negative"),
        (["--points-per-side", "0"], "--points-per-side must be at least 1"),
        (["--min-iou", "1.5"], "--min-iou is a fraction"),
        (["--min-area", "-3"], "--min-area cannot be negative"),
    ],
)
def test_bad_auto_settings_are_named_by_their_option(tmp_path, capsys, option, said):
    tifffile.imwrite(tmp_path / "image.tif", np.zeros((20, 20), np.uint8))
    assert main(["auto", str(tmp_path / "image.tif"), *option]) == 1
    err = capsys.readouterr().err
    assert said in err and "_" not in err.split("error:")[-1]


def test_a_tiff_of_garbage_is_called_damaged_in_words_a_user_reads(tmp_path, capsys):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00garbage" * 6)  # a TIFF's first bytes, then nothing a reader can use
    assert main(["segment", str(broken), "--point", "1", "1", "-o", str(tmp_path / "o.tif")]) == 1
    err = capsys.readouterr().err
    assert "broken.tif: it cannot be read as a TIFF file (damaged, or not a TIFF)" in err and "index" not in err


def test_an_interrupted_auto_resumes_with_the_slices_it_segmented(
    tmp_path, stack_file, checkpoint, monkeypatch
):
    import samcore.jobs

    segmented = []
    segment_embedding = samcore.jobs.segment_embedding

    def counted(*args, **kwargs):
        if len(segmented) == limit:
            raise KeyboardInterrupt
        segmented.append(1)
        return segment_embedding(*args, **kwargs)

    monkeypatch.setattr(samcore.jobs, "segment_embedding", counted)
    store, output = tmp_path / "stack.zarr", tmp_path / "labels.tif"
    common = ["auto", stack_file, "-o", output, "--store", store, "--min-iou", "0", "--min-stability", "0",
              "--points-per-side", "8"]
    limit = None
    assert cli(*common, "--overwrite", checkpoint=checkpoint) == 0  # uninterrupted, for comparison
    whole = tifffile.imread(output)
    assert whole.any() and len(segmented) == 4
    assert cli(*common, "--overwrite", checkpoint=checkpoint) == 0
    assert len(segmented) == 4  # every slice's labels were kept: none is segmented again
    np.testing.assert_array_equal(tifffile.imread(output), whole)

    other = tmp_path / "other.zarr"
    common[common.index(store)] = other
    output.unlink()
    segmented.clear()
    limit = 3  # Ctrl-C while the fourth slice is segmented
    assert cli(*common, checkpoint=checkpoint) == 130
    assert not output.exists()
    segmented.clear()
    limit = None
    assert cli(*common, checkpoint=checkpoint) == 0
    assert len(segmented) == 1  # the fourth slice only
    np.testing.assert_array_equal(tifffile.imread(output), whole)

    # Other settings make other labels: every slice is segmented again.
    segmented.clear()
    assert cli(*common, "--overwrite", "--min-area", "5", checkpoint=checkpoint) == 0
    assert len(segmented) == 4
