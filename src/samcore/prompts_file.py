"""Prompts files: objects with ids and their points and boxes on slices, as JSON.

Coordinates are in napari's order, (z, y, x) in pixels, as napari's Points and Shapes layers hold
them::

    {
      "objects": [
        {
          "id": 1,
          "points":   [[12, 40.5, 52]],
          "negative": [[12, 30, 61]],
          "boxes":    [[[12, 30, 40], [12, 55, 70]]]
        },
        {"id": 2, "boxes": [[[20, 100, 90], [20, 130, 125]]]}
      ]
    }

* ``id``: the object's label, a whole number from 1.
* ``points``: clicks on the object; ``negative``: clicks on what is not the object.
* ``boxes``: opposite corners ``[[z, y0, x0], [z, y1, x1]]``, or the 4 corners of a napari rectangle;
  all corners on one slice; at most one box per object and slice.

Every slice an object has prompts on needs a point or a box on the object. For a 2D image, a
coordinate may leave out z: ``[y, x]``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from .slice_decoder import SlicePrompt

MAX_ID = 2**32 - 1
_KEYS = ("id", "points", "negative", "boxes")


@dataclass(frozen=True)
class PromptedSlice:
    """One object's prompts on one slice, in napari's order.

    Attributes:
        z: The slice.
        points: (N, 2) float (y, x) clicks on the object.
        negative: (M, 2) float (y, x) clicks beside it.
        box: (4,) float (y0, x0, y1, x1) with y0 <= y1 and x0 <= x1, or None.
    """

    z: int
    points: np.ndarray
    negative: np.ndarray
    box: np.ndarray | None

    def engine_prompt(self) -> SlicePrompt:
        """The same prompts in the engine's (x, y) convention; a lone click gives 3 candidates."""
        points = np.concatenate([self.points, self.negative])[:, ::-1].astype(float)
        labels = np.concatenate([np.ones(len(self.points), np.int64), np.zeros(len(self.negative), np.int64)])
        box = None if self.box is None else self.box[[1, 0, 3, 2]].astype(float)
        return SlicePrompt(points.reshape(-1, 2), labels, box, multimask=len(points) == 1 and box is None)


@dataclass(frozen=True)
class ObjectPrompts:
    """An object's id and its prompted slices, sorted by z."""

    object_id: int
    slices: tuple[PromptedSlice, ...]


def read_prompts(path: str | os.PathLike, shape: tuple[int, ...]) -> list[ObjectPrompts]:
    """Read and check a prompts file against the (Z, Y, X) or (Y, X) shape of its image.

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not text or not JSON, is not laid out as described in this module,
            or has a prompt outside the image; the message names the object and the prompt.
    """
    with open(path, encoding="utf-8") as file:
        try:
            text = file.read()
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a text file; a prompts file is JSON text such as "
                             '{"objects": [{"id": 1, "points": [[12, 40, 52]]}]}.') from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valid JSON file ({error}).") from None
    return parse_prompts(data, shape, source=str(path))


def parse_prompts(data: object, shape: tuple[int, ...], source: str = "the prompts") -> list[ObjectPrompts]:
    """Check prompts already loaded from JSON (see `read_prompts`)."""
    depth, height, width = (1, *shape) if len(shape) == 2 else tuple(shape)
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        raise ValueError(
            f'{source} must hold {{"objects": [...]}}: a list of objects with an "id" and their prompts.'
        )
    if not data["objects"]:
        raise ValueError(f"{source} lists no object.")
    objects, seen = [], set()
    for index, entry in enumerate(data["objects"], start=1):
        name = f"Object {index} in {source}"
        if not isinstance(entry, dict):
            raise ValueError(f"{name} must be a {{...}} entry with an id and prompts, not {entry!r}.")
        object_id = entry.get("id")
        if isinstance(object_id, bool) or not isinstance(object_id, int) or not 1 <= object_id <= MAX_ID:
            raise ValueError(f'{name} needs an "id": a whole number from 1 (its label), not {object_id!r}.')
        if object_id in seen:
            raise ValueError(f"Object id {object_id} appears twice in {source}: give each object one entry.")
        seen.add(object_id)
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise ValueError(f"Object {object_id} has unknown entries {unknown}; known: {', '.join(_KEYS)}.")
        grid = _Grid(f"Object {object_id}", depth, height, width)
        objects.append(ObjectPrompts(object_id, _slices(entry, grid)))
    return objects


class _Grid:
    """Checks coordinates of one object against the image."""

    def __init__(self, name: str, depth: int, height: int, width: int) -> None:
        self.name, self.depth, self.height, self.width = name, depth, height, width

    def coordinate(self, value: object, what: str) -> tuple[int, float, float]:
        """(z, y, x) of one point, checked to lie inside the image."""
        sizes = "3 numbers (z, y, x)" + (" or 2 (y, x)" if self.depth == 1 else "")
        if not isinstance(value, list) or len(value) not in ((2, 3) if self.depth == 1 else (3,)):
            raise ValueError(f"{self.name}: each {what} needs {sizes}, not {value!r}.")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in value):
            raise ValueError(f"{self.name}: the {what} {value!r} must hold finite numbers.")
        z, y, x = value if len(value) == 3 else (0, *value)
        if z != int(z):
            raise ValueError(
                f"{self.name}: the {what} {value!r} has z = {z}; z must be a whole slice number."
            )
        if not 0 <= z < self.depth:
            raise ValueError(
                f"{self.name}: the {what} {value!r} is on slice {int(z)}, but the stack has {self.depth} "
                f"slices (0 to {self.depth - 1})."
            )
        for axis, coordinate, size, unit in (("y", y, self.height, "rows"), ("x", x, self.width, "columns")):
            if not -0.5 <= coordinate <= size - 0.5:
                raise ValueError(
                    f"{self.name}: the {what} {value!r} lies outside the image: {axis} = {coordinate:g}, "
                    f"but the image has {size} {unit} (0 to {size - 1})."
                )
        return int(z), min(max(float(y), 0.0), self.height - 1.0), min(max(float(x), 0.0), self.width - 1.0)


def _slices(entry: dict, grid: _Grid) -> tuple[PromptedSlice, ...]:
    points: dict[int, list[list[tuple[float, float]]]] = {}
    for slot, key in ((0, "points"), (1, "negative")):
        for value in _list(entry, key, grid.name):
            z, y, x = grid.coordinate(value, "point" if key == "points" else "negative point")
            points.setdefault(z, [[], []])[slot].append((y, x))
    boxes: dict[int, np.ndarray] = {}
    for value in _list(entry, "boxes", grid.name):
        if not isinstance(value, list) or len(value) not in (2, 4):
            raise ValueError(f"{grid.name}: each box needs 2 opposite corners (or 4 corners), not {value!r}.")
        corners = [grid.coordinate(corner, "box corner") for corner in value]
        if len({z for z, _, _ in corners}) != 1:
            raise ValueError(
                f"{grid.name}: the box {value!r} has corners on different slices; a box lies on one slice."
            )
        z = corners[0][0]
        if z in boxes:
            raise ValueError(f"{grid.name} has two boxes on slice {z}; give one box per object and slice.")
        ys, xs = [c[1] for c in corners], [c[2] for c in corners]
        boxes[z] = np.array([min(ys), min(xs), max(ys), max(xs)])
    slices = []
    for z in sorted(set(points) | set(boxes)):
        positive, negative = points.get(z, [[], []])
        if not positive and z not in boxes:
            raise ValueError(
                f"{grid.name} has only negative points on slice {z}: "
                "add a point on the object or a box around it."
            )
        slices.append(PromptedSlice(z, _array(positive), _array(negative), boxes.get(z)))
    if not slices:
        raise ValueError(f"{grid.name} has no prompts: give it points or a box.")
    return tuple(slices)


def _list(entry: dict, key: str, name: str) -> list:
    value = entry.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f'{name}: "{key}" must be a list, not {value!r}.')
    return value


def _array(points: list[tuple[float, float]]) -> np.ndarray:
    return np.array(points, dtype=float).reshape(-1, 2)
