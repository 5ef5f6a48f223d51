"""Prompts files: the layout, napari's (z, y, x) order, and errors a biologist can act on."""

import json
import pathlib
import re

import numpy as np
import pytest

from samcore.prompts_file import parse_prompts, read_prompts

SHAPE = (10, 40, 50)


def test_objects_are_grouped_by_slice_in_napari_order():
    data = {"objects": [
        {"id": 4, "points": [[3, 10, 20], [5, 12.5, 21]], "negative": [[3, 2, 2]],
         "boxes": [[[5, 30, 40], [5, 8, 10]]]},
        {"id": 9, "boxes": [[[7, 1, 2], [7, 1, 30], [7, 20, 30], [7, 20, 2]]]},  # a napari rectangle
    ]}
    first, second = parse_prompts(data, SHAPE)
    assert first.object_id == 4 and [s.z for s in first.slices] == [3, 5]
    on_3, on_5 = first.slices
    np.testing.assert_array_equal(on_3.points, [[10, 20]])
    np.testing.assert_array_equal(on_3.negative, [[2, 2]])
    assert on_3.box is None
    np.testing.assert_array_equal(on_5.box, [8, 10, 30, 40])  # corners in any order
    np.testing.assert_array_equal(second.slices[0].box, [1, 2, 20, 30])
    prompt = on_5.engine_prompt()  # the engine's (x, y) order
    np.testing.assert_array_equal(prompt.points, [[21, 12.5]])
    np.testing.assert_array_equal(prompt.box, [10, 8, 40, 30])
    assert not prompt.multimask and on_3.engine_prompt().labels.tolist() == [1, 0]


def test_a_lone_click_asks_for_three_candidates():
    (entry,) = parse_prompts({"objects": [{"id": 1, "points": [[0, 5, 5]]}]}, SHAPE)
    assert entry.slices[0].engine_prompt().multimask


def test_2d_images_take_y_x_points():
    data = {"objects": [{"id": 1, "points": [[5, 6]], "boxes": [[[0, 1, 1], [0, 9, 9]]]}]}
    (entry,) = parse_prompts(data, (40, 50))
    assert entry.slices[0].z == 0
    np.testing.assert_array_equal(entry.slices[0].points, [[5, 6]])


def test_edges_of_the_image_are_inside():
    (entry,) = parse_prompts({"objects": [{"id": 1, "points": [[9, -0.5, 49.5]]}]}, SHAPE)
    np.testing.assert_array_equal(entry.slices[0].points, [[0, 49]])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([{"id": 1}], 'must hold {"objects": [...]}'),
        ({"objects": []}, "lists no object"),
        ({"objects": [{"points": [[1, 2, 3]]}]}, 'Object 1 in the prompts needs an "id"'),
        ({"objects": [{"id": 0, "points": [[1, 2, 3]]}]}, "a whole number from 1"),
        ({"objects": [{"id": 2.5, "points": [[1, 2, 3]]}]}, "a whole number from 1"),
        ({"objects": [{"id": 1, "points": [[1, 2, 3]]}, {"id": 1, "points": [[2, 2, 3]]}]}, "appears twice"),
        ({"objects": [{"id": 1, "point": [[1, 2, 3]]}]}, "unknown entries ['point']"),
        ({"objects": [{"id": 1}]}, "Object 1 has no prompts"),
        ({"objects": [{"id": 1, "points": [[2, 3]]}]}, "needs 3 numbers (z, y, x)"),
        ({"objects": [{"id": 1, "points": [[1, "a", 3]]}]}, "finite numbers"),
        ({"objects": [{"id": 1, "points": [1, 2, 3]}]}, "needs 3 numbers"),
        ({"objects": [{"id": 1, "points": [[1.5, 2, 3]]}]}, "whole slice number"),
        ({"objects": [{"id": 1, "negative": [[1, 2, 3]]}]}, "only negative points on slice 1"),
        ({"objects": [{"id": 1, "boxes": [[[1, 2, 3], [2, 5, 6]]]}]}, "corners on different slices"),
        ({"objects": [{"id": 1, "boxes": [[[1, 2, 3], [1, 5, 6]], [[1, 0, 0], [1, 4, 4]]]}]}, "two boxes on slice"),
        ({"objects": [{"id": 1, "boxes": [[1, 2, 3]]}]}, "2 opposite corners"),
        ({"objects": [{"id": 1, "points": {"z": 1}}]}, '"points" must be a list'),
    ],
)
def test_malformed_files_are_explained(data, message):
    with pytest.raises(ValueError) as error:
        parse_prompts(data, SHAPE)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ([12, 5, 5], "Object 3: the point [12, 5, 5] is on slice 12, but the stack has 10 slices (0 to 9)."),
        ([-1, 5, 5], "is on slice -1"),
        ([2, 40, 5], "lies outside the image: y = 40, but the image has 40 rows (0 to 39)."),
        ([2, 5, -3], "x = -3, but the image has 50 columns"),
    ],
)
def test_prompts_outside_the_stack_are_explained(point, message):
    with pytest.raises(ValueError) as error:
        parse_prompts({"objects": [{"id": 3, "points": [point]}]}, SHAPE)
    assert message in str(error.value)


def test_files_that_are_not_json_name_the_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('{"objects": [{"id": 1,}]}')
    with pytest.raises(ValueError, match="prompts.json is not a valid JSON file"):
        read_prompts(path, SHAPE)
    path.write_text(json.dumps({"objects": [{"id": 1, "points": [[1, 2, 3]]}]}))
    assert read_prompts(path, SHAPE)[0].object_id == 1


def test_the_readme_example_is_a_valid_prompts_file():
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    example = re.search(r"```json\n(.*?)```", readme, re.S).group(1)
    first, second = parse_prompts(json.loads(example), (30, 200, 200))
    assert [s.z for s in first.slices] == [12] and second.slices[0].box is not None
