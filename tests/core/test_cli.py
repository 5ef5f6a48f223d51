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
        assert main([*command, "-o", str(tmp_path / "o.tif"), *extra]) == 0
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
