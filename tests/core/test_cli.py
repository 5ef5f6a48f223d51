"""The `napari-sam` command line on files the tests write."""

import numpy as np
import pytest
import tifffile

from samcore.cli import main
from samcore.synthetic import nuclei_image


def test_segment_writes_labels_of_the_slice_shape(tmp_path, checkpoint, capsys):
    stack = np.random.default_rng(0).integers(0, 4000, size=(3, 50, 70), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    out = tmp_path / "out" / "mask.tif"
    code = main(["segment", str(tmp_path / "stack.tif"), "--slice", "1", "--point", "25", "30",
                 "--box", "10", "10", "40", "60", "-o", str(out), "--checkpoint", str(checkpoint)])
    assert code == 0, capsys.readouterr().err
    labels = tifffile.imread(out)
    assert labels.shape == (50, 70) and labels.dtype == np.uint16
    assert set(np.unique(labels)) <= {0, 1}
    assert "predicted IoU" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--slice", "7", "--point", "5", "5"], "outside the stack"),
        (["--slice", "1"], "at least one prompt"),
        (["--slice", "1", "--point", "500", "5"], "outside"),
    ],
)
def test_segment_errors_are_one_clear_line(tmp_path, checkpoint, capsys, extra, message):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 20, 20), dtype=np.uint8) + 7)
    code = main(["segment", str(tmp_path / "stack.tif"), "-o", str(tmp_path / "o.tif"),
                 "--checkpoint", str(checkpoint), *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "o.tif").exists()


def test_the_quickstart_command_segments_the_sample_with_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "nucleus.tif"
    assert main(["segment", "--sample", "nuclei", "--box", "76", "126", "115", "161", "-o", str(out)]) == 0
    mask = tifffile.imread(out) == 1
    _, truth = nuclei_image(seed=0)
    nucleus = truth == truth[95, 143]  # the nucleus the box encloses
    assert truth[95, 143] > 0 and (mask & nucleus).sum() / (mask | nucleus).sum() > 0.85


def test_models_lists_every_name(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("vit_b", "vit_t", "vit_b_lm", "vit_t_em_organelles"):
        assert name in out


def test_refine_is_the_models_choice_unless_asked(tmp_path, checkpoint, capsys):
    image = np.random.default_rng(3).integers(0, 255, (40, 60), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "image.tif", image)
    command = ["segment", str(tmp_path / "image.tif"), "--point", "20", "30", "--checkpoint", str(checkpoint)]
    for extra, said in (([], "one pass, 1 view"), (["--refine"], "refined, 1 view"),
                        (["--no-refine", "--views", "2"], "one pass, 2 mirrored views")):
        assert main([*command, "-o", str(tmp_path / "o.tif"), "--overwrite", *extra]) == 0
        assert f", {said})" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses a number of views it cannot make
        main([*command, "-o", str(tmp_path / "o.tif"), "--views", "3"])
    assert "invalid choice" in capsys.readouterr().err
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"objects": [{"id": 1, "points": [[20, 30]]}]}')
    code = main(["segment", str(tmp_path / "image.tif"), "--prompts", str(prompts), "--refine",
                 "-o", str(tmp_path / "p.tif"), "--checkpoint", str(checkpoint)])
    assert code == 1 and "decodes each slice once" in capsys.readouterr().err
    assert not (tmp_path / "p.tif").exists()


def test_zoom_on_a_small_box_is_asked_for_or_the_models_choice(tmp_path, checkpoint, capsys):
    image = np.random.default_rng(4).integers(0, 255, (300, 400), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "image.tif", image)
    command = ["segment", str(tmp_path / "image.tif"), "--box", "120", "150", "131", "165",
               "--checkpoint", str(checkpoint), "--overwrite"]
    masks = {}
    for extra in ([], ["--zoom"], ["--no-zoom"]):
        out = tmp_path / f"{''.join(extra) or 'default'}.tif"
        assert main([*command, "-o", str(out), *extra]) == 0
        masks[tuple(extra)] = tifffile.imread(out)
        err = capsys.readouterr().err
        assert ("zoom on small boxes" in err) == ("zoomed in on the box" in err) == (extra == ["--zoom"])
    np.testing.assert_array_equal(masks[()], masks[("--no-zoom",)])  # a weight file: SAM's way, no zoom
    # The same box in a prompts file: zoomed in as asked, the same mask as --box gives. The prompts file is
    # decoded in a batch, --box alone: a few pixels whose logit is within rounding of 0 may fall either way
    # on another CPU, far fewer than the pixels zooming changes.
    assert (masks[("--zoom",)] != masks[("--no-zoom",)]).mean() > 0.01
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"objects": [{"id": 7, "boxes": [[[120, 150], [131, 165]]]}]}')
    for extra in (["--zoom"], ["--no-zoom"]):
        out = tmp_path / f"prompts{extra[0]}.tif"
        assert main(["segment", str(tmp_path / "image.tif"), "--prompts", str(prompts), *extra,
                     "-o", str(out), "--checkpoint", str(checkpoint)]) == 0
        err = capsys.readouterr().err
        assert ("zoom on small boxes" in err) == (extra == ["--zoom"])
        assert f"wrote {out}: 1 object, shape (300, 400)" in err
        assert ((tifffile.imread(out) == 7) != (masks[tuple(extra)] > 0)).mean() < 0.001


def test_clicks_of_a_prompts_file_on_a_large_image_are_zoomed_in_on_as_point_is(tmp_path, checkpoint, capsys):
    image = np.random.default_rng(4).integers(0, 255, (300, 600), dtype=np.uint8)  # over twice 256 px
    tifffile.imwrite(tmp_path / "image.tif", image)
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"objects": [{"id": 3, "points": [[150, 420]]}]}')
    masks = {}
    for extra in (["--zoom"], ["--no-zoom"]):
        out = tmp_path / f"point{extra[0]}.tif"
        assert main(["segment", str(tmp_path / "image.tif"), "--point", "150", "420", *extra, "-o", str(out),
                     "--checkpoint", str(checkpoint)]) == 0
        masks[extra[0]] = tifffile.imread(out) > 0
        assert ("decoded on a crop around the clicks" in capsys.readouterr().err) == (extra == ["--zoom"])
    assert (masks["--zoom"] != masks["--no-zoom"]).mean() > 0.01
    for extra in (["--zoom"], ["--no-zoom"]):
        out = tmp_path / f"prompts{extra[0]}.tif"
        assert main(["segment", str(tmp_path / "image.tif"), "--prompts", str(prompts), *extra,
                     "-o", str(out), "--checkpoint", str(checkpoint)]) == 0
        err = capsys.readouterr().err
        assert ("zoom on clicks on large images" in err) == (extra == ["--zoom"])
        assert "image.tif: prompts" in err  # its progress bar
        assert ((tifffile.imread(out) == 3) != masks[extra[0]]).mean() < 0.001


def test_segment_never_writes_over_its_input_and_asks_before_replacing(tmp_path, checkpoint, capsys):
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.random.default_rng(1).integers(0, 255, (40, 60), dtype=np.uint8))
    before = image.read_bytes()
    command = ["segment", str(image), "--point", "20", "30", "--checkpoint", str(checkpoint)]
    for extra in ([], ["--overwrite"]):
        assert main([*command, "-o", str(image), *extra]) == 1
        assert "is an input of this command" in capsys.readouterr().err
    assert image.read_bytes() == before
    out = tmp_path / "mask.tif"
    out.write_bytes(b"keep me")
    assert main([*command, "-o", str(out)]) == 1
    assert "exists; give another name, or --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main([*command, "-o", str(out), "--overwrite"]) == 0
    assert tifffile.imread(out).shape == (40, 60)


@pytest.fixture
def images(tmp_path):
    """Files of every kind the segment command meets, all 20 rows by 30 columns."""
    rng = np.random.default_rng(2)
    tifffile.imwrite(tmp_path / "image.tif", rng.integers(0, 255, (20, 30), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "stack.tif", rng.integers(0, 255, (5, 20, 30), dtype=np.uint8),
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / "rgb.tif", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "fourd.tif", rng.integers(0, 255, (2, 5, 20, 30), dtype=np.uint8),
                     photometric="minisblack")
    (tmp_path / "text.tif").write_text("hello, not an image")
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["image.tif", "--point", "5", "5", "-o", "x.png"], "-o x.png: labels are written as TIFF"),
        (["image.tif", "--point", "5", "5", "-o", "folder"], "-o folder is a folder; give a file name"),
        (["image.tif", "--point", "5", "5", "-o", "image.tif/x.tif"], "image.tif is a file, not a folder"),
        (["image.tif", "--point", "25", "5", "-o", "x.tif"],
         "--point 25 5 lies outside the image: Y = 25, but the image has 20 rows (Y from 0 to 19)"),
        (["image.tif", "--box", "2", "3", "10", "35", "-o", "x.tif"],
         "--box 2 3 10 35 lies outside the image: X1 = 35, but the image has 30 columns"),
        (["image.tif", "--box", "12", "3", "10", "25", "-o", "x.tif"], "--box 12 3 10 25 is inverted"),
        (["image.tif", "--box", "nan", "3", "10", "25", "-o", "x.tif"],
         "--box nan 3 10 25: Y0 must be a number"),
        (["image.tif", "--negative", "10", "10", "-o", "x.tif"], "add a point on the object"),
        (["image.tif", "--slice", "0", "--point", "5", "5", "-o", "x.tif"], "leave --slice out"),
        (["rgb.tif", "--slice", "0", "--point", "5", "5", "-o", "x.tif"],
         "--slice picks a slice of a stack, but this is a 2D image with 3 channels"),
        (["stack.tif", "--point", "5", "5", "-o", "x.tif"],
         ("stack of 5 slices (shape (5, 20, 30)): pick one with --slice Z, or segment objects through the "
          "stack with --prompts FILE (and --propagate)")),
        (["fourd.tif", "--slice", "0", "--point", "5", "5", "-o", "x.tif"],
         "this is a 4D image of shape (2, 5, 20, 30), but napari-sam reads 2D images (Y, X)"),
        (["text.tif", "--point", "5", "5", "-o", "x.tif"], "text.tif: it cannot be read as a TIFF file"),
    ],
)
def test_segment_refuses_bad_options_before_the_model_loads(images, no_model, capsys, monkeypatch, args,
                                                            message):
    monkeypatch.chdir(images)
    assert main(["segment", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "Errno" not in err
    assert not (images / "x.tif").exists() and not (images / "x.png").exists()


def test_a_system_error_is_a_sentence_that_names_the_path(tmp_path, monkeypatch, capsys):
    tifffile.imwrite(tmp_path / "image.tif", np.zeros((20, 30), np.uint8))
    not_a_folder = tmp_path / "weights.txt"
    not_a_folder.write_text("a file")
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(not_a_folder))  # where downloaded weights go
    code = main(["segment", str(tmp_path / "image.tif"), "--point", "5", "5", "-o", str(tmp_path / "x.tif"),
                 "--model", "vit_t"])
    err = capsys.readouterr().err
    assert code == 1 and f"{not_a_folder} is a file, where napari-sam needs a folder" in err
    assert "NAPARI_SAM_CACHE" in err and "Errno" not in err


def test_a_closed_pipe_ends_the_listing_quietly():
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "samcore.cli", "models"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # as `napari-sam models | head -0` does, before the listing is written
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and err == ""


def test_an_error_about_the_pixels_names_the_file(tmp_path, checkpoint, capsys):
    image = tmp_path / "nan.tif"
    tifffile.imwrite(image, np.full((20, 30), np.nan, np.float32))
    code = main(["segment", str(image), "--point", "5", "5", "-o", str(tmp_path / "x.tif"),
                 "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert code == 1 and f"napari-sam: error: {image}: " in err and "Traceback" not in err


def test_a_precision_this_cpu_lacks_is_one_warning_line_and_runs_fp32(tmp_path, capsys, monkeypatch):
    from samcore import precision

    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.0125)  # as on an AVX2-only CPU
    out = tmp_path / "nucleus.tif"
    code = main(["segment", "--sample", "nuclei", "--box", "76", "126", "115", "161", "--precision", "bf16",
                 "-o", str(out)])
    assert code == 0 and out.exists()
    err = capsys.readouterr().err
    assert "napari-sam: warning: precision='bf16' would make the image encoder about 80 times slower" in err
    assert "UserWarning" not in err and "cli.py" not in err  # no Python source lines for the user
    assert "(fp32," in err  # the model line says what ran


def test_an_lzw_compressed_stack_is_read(tmp_path, checkpoint, capsys):
    stack = np.random.default_rng(0).integers(0, 4000, size=(3, 50, 70), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack, compression="lzw")  # as microscope software writes it
    out = tmp_path / "mask.tif"
    code = main(["segment", str(tmp_path / "stack.tif"), "--slice", "1", "--point", "25", "30", "-o", str(out),
                 "--checkpoint", str(checkpoint)])
    assert code == 0, capsys.readouterr().err
    assert tifffile.imread(out).shape == (50, 70)
