"""`napari-sam segment --prompts PROMPTS.json [--propagate]` on files the tests write."""

import functools
import json

import numpy as np
import pytest
import tifffile

import samcore.propagation
from samcore.cli import main
from samcore.synthetic import nuclei_stack


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory):
    image, truth = nuclei_stack((6, 40, 50), n_nuclei=2, radius=(7, 10), seed=2)
    path = tmp_path_factory.mktemp("data") / "stack.tif"
    tifffile.imwrite(path, image)
    return path, truth


def box_of(mask, z):
    rows, cols = np.nonzero(mask)
    return [[z, int(rows.min()), int(cols.min())], [z, int(rows.max()), int(cols.max())]]


def write_prompts(folder, objects):
    path = folder / "prompts.json"
    path.write_text(json.dumps({"objects": objects}))
    return path


def segment(*args):
    return main(["segment", *map(str, args)])


def test_round_trip_writes_labels_of_the_stack_shape(tmp_path, stack_file, checkpoint, capsys, monkeypatch):
    stack, truth = stack_file
    z = 3
    ids = [int(i) for i in np.unique(truth[z]) if i]
    objects = [{"id": 10 * object_id, "boxes": [box_of(truth[z] == object_id, z)]} for object_id in ids]
    objects.append({"id": 99, "points": [[1, 20, 25]], "negative": [[1, 2, 2]]})
    prompts = write_prompts(tmp_path, objects)

    once = tmp_path / "prompted.tif"
    code = segment(stack, "--prompts", prompts, "-o", once, "--checkpoint", checkpoint)
    assert code == 0, capsys.readouterr().err
    labels = tifffile.imread(once)
    assert labels.shape == truth.shape and labels.dtype == np.uint16
    assert set(np.unique(labels)) <= {0, 99, *(10 * i for i in ids)}
    assert not labels[[0, 2, 4, 5]].any()  # without --propagate, only the prompted slices

    spread = tmp_path / "propagated.tif"
    relaxed = functools.partial(
        samcore.propagation.PropagationSettings, min_score=0, min_iou=0, min_area=0, min_contrast=0
    )
    # random weights: keep every mask
    monkeypatch.setattr(samcore.propagation, "PropagationSettings", relaxed)
    code = segment(stack, "--prompts", prompts, "--propagate", "--mode", "box", "--z-range", 1, 5,
                   "-o", spread, "--checkpoint", checkpoint)
    err = capsys.readouterr().err
    assert code == 0, err
    propagated = tifffile.imread(spread)
    assert propagated.shape == truth.shape
    kept = labels > 0
    np.testing.assert_array_equal(propagated[kept], labels[kept])  # prompted masks are never overwritten
    assert not propagated[0].any()  # outside the z range
    assert propagated[[2, 4, 5]].any()  # filled by propagation
    assert set(np.unique(propagated)) <= {0, 99, *(10 * i for i in ids)}
    assert f"wrote {spread}" in err


def test_where_and_why_each_object_ended_is_printed(tmp_path, stack_file, checkpoint, capsys, monkeypatch):
    stack, truth = stack_file
    object_id = int(np.unique(truth[3])[1])
    prompts = write_prompts(tmp_path, [{"id": 7, "boxes": [box_of(truth[3] == object_id, 3)]}])
    strict = functools.partial(samcore.propagation.PropagationSettings, min_area=10**9)  # nothing spreads
    monkeypatch.setattr(samcore.propagation, "PropagationSettings", strict)
    code = segment(
        stack, "--prompts", prompts, "--propagate", "-o", tmp_path / "out.tif", "--checkpoint", checkpoint
    )
    err = capsys.readouterr().err
    assert code == 0, err
    line = next(line for line in err.splitlines() if line.startswith("object 7: slices 3 to 3"))
    assert "; ended on slice 2, " in line and "; ended on slice 4, " in line


def test_a_2d_image_gives_2d_labels(tmp_path, stack_file, checkpoint, capsys):
    stack, _ = stack_file
    image = tmp_path / "plane.tif"
    tifffile.imwrite(image, tifffile.imread(stack)[2])
    prompts = write_prompts(tmp_path, [{"id": 300, "points": [[20, 25]], "boxes": [[[5, 5], [30, 40]]]}])
    out = tmp_path / "plane_labels.tif"
    assert segment(image, "--prompts", prompts, "--propagate", "-o", out, "--checkpoint", checkpoint) == 0
    labels = tifffile.imread(out)
    assert labels.shape == (40, 50) and set(np.unique(labels)) <= {0, 300}


@pytest.mark.parametrize(
    ("objects", "extra", "message"),
    [
        ([{"id": 1, "points": [[12, 5, 5]]}], [], "the point [12, 5, 5] is on slice 12, but the stack has 6"),
        ([{"id": 1, "boxes": [[[2, 5, 5], [2, 35, 60]]]}], [], "x = 60, but the image has 50 columns"),
        ([{"id": 1, "negative": [[2, 5, 5]]}], [], "only negative points on slice 2"),
        ([{"id": 1, "points": [[2, 5, 5]]}], ["--propagate", "--z-range", "3", "9"],
         "outside the stack's 6 slices"),
        ([{"id": 1, "points": [[2, 5, 5]]}], ["--propagate", "--mode", "boxes"],
         "Unknown propagation mode 'boxes'"),
        ([{"id": 1, "points": [[2, 5, 5]]}], ["--point", "3", "3"], "--prompts replaces"),
        ([{"id": 1, "points": [[2, 5, 5]]}], ["--mode", "box"], "add --propagate, or leave them out"),
        ([{"id": 1, "points": [[2, 5, 5]]}], ["--z-range", "1", "4"], "add --propagate, or leave them out"),
        ([{"id": 1, "points": [[2, 5, 5]]}], ["--min-contrast", "0"], "add --propagate, or leave them out"),
        ([{"id": 1, "points": [[2, 5, 5]]}], ["--propagate", "--min-contrast", "1.5"],
         "--min-contrast is a fraction between 0 and 1"),
        ([{"id": 1, "points": [[2, 5, 5]]}], ["--propagate", "--z-range", "3", "5"],
         "Object 1 is not on any slice between 3 and 5"),
    ],
)
def test_bad_prompts_are_one_clear_line(tmp_path, stack_file, checkpoint, capsys, no_model, objects, extra,
                                       message):
    stack, _ = stack_file
    prompts = write_prompts(tmp_path, objects)
    out = tmp_path / "labels.tif"
    code = segment(stack, "--prompts", prompts, *extra, "-o", out, "--checkpoint", checkpoint)
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_malformed_json_and_propagate_without_prompts(tmp_path, stack_file, checkpoint, capsys):
    stack, _ = stack_file
    broken = tmp_path / "broken.json"
    broken.write_text('{"objects": [')
    assert segment(stack, "--prompts", broken, "-o", tmp_path / "a.tif", "--checkpoint", checkpoint) == 1
    assert "broken.json is not a valid JSON file" in capsys.readouterr().err
    assert segment(stack, "--slice", 1, "--point", 3, 3, "--propagate", "-o", tmp_path / "b.tif") == 1
    assert "work on the objects of a --prompts file" in capsys.readouterr().err


def test_a_binary_prompts_file_or_a_4d_image_is_named_and_explained(tmp_path, stack_file, no_model, capsys):
    stack, _ = stack_file
    binary = tmp_path / "prompts.json"
    binary.write_bytes(bytes(range(256)))
    assert segment(stack, "--prompts", binary, "-o", tmp_path / "a.tif") == 1
    err = capsys.readouterr().err
    assert f"{binary} is not a text file; a prompts file is JSON text" in err and "codec" not in err
    fourd = tmp_path / "fourd.tif"
    tifffile.imwrite(fourd, np.zeros((2, 4, 20, 30), np.uint16), photometric="minisblack")
    prompts = write_prompts(tmp_path, [{"id": 1, "points": [[1, 5, 5]]}])
    assert segment(fourd, "--prompts", prompts, "-o", tmp_path / "a.tif") == 1
    err = capsys.readouterr().err
    assert f"{fourd}: this is a 4D image of shape (2, 4, 20, 30)" in err and "RGB image needs" not in err
    assert "stacks (Z, Y, X)" in err


def test_prompts_show_the_model_first_then_progress(tmp_path, stack_file, checkpoint, capsys):
    stack, truth = stack_file
    prompts = write_prompts(tmp_path, [{"id": 1, "boxes": [box_of(truth[3] == truth[3].max(), 3)]}])
    out = tmp_path / "labels.tif"
    assert segment(stack, "--prompts", prompts, "--propagate", "-o", out, "--checkpoint", checkpoint) == 0
    err = capsys.readouterr().err
    assert err.startswith("model ")  # said before any slice is embedded
    embedding, propagation, wrote = (err.index(s) for s in ("prompted slices", "propagation", f"wrote {out}"))
    assert embedding < propagation < wrote
    assert "100%" in err[embedding:propagation]  # a tqdm bar, as `embed` and `auto` show


def test_a_compressed_stack_and_its_slice_give_the_labels_of_the_plain_file(tmp_path, stack_file, checkpoint):
    stack, truth = stack_file
    packed = tmp_path / "packed.tif"
    tifffile.imwrite(packed, tifffile.imread(stack), compression="zlib")  # read page by page
    z = 3
    object_id = int(np.unique(truth[z])[1])
    (_, y0, x0), (_, y1, x1) = corners = box_of(truth[z] == object_id, z)
    prompts = write_prompts(tmp_path, [{"id": 7, "boxes": [corners]}])
    for image in (stack, packed):
        propagated, one_slice = (tmp_path / f"{image.stem}_{kind}.tif" for kind in ("labels", "slice"))
        weights = ("--checkpoint", checkpoint)
        assert segment(image, "--prompts", prompts, "--propagate", "-o", propagated, *weights) == 0
        assert segment(image, "--slice", z, "--box", y0, x0, y1, x1, "-o", one_slice, *weights) == 0
    for kind in ("labels", "slice"):
        np.testing.assert_array_equal(
            tifffile.imread(tmp_path / f"packed_{kind}.tif"), tifffile.imread(tmp_path / f"stack_{kind}.tif")
        )
