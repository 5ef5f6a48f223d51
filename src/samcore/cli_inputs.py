"""The command line's own inputs, checked before any model loads: image files, prompts and outputs.

Coordinates are the command line's (napari's): `--point Y X`, `--box Y0 X0 Y1 X1`, `--slice Z`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")  # samcore.batch.IMAGE_SUFFIXES, without importing torch for --help
# What a reader's failure on a file of another kind is followed by.
READABLE = (
    " napari-sam reads TIFF files (.tif, .tiff) and the 2D formats scikit-image opens (PNG, JPEG, BMP, ...)."
)


def check_output(args: argparse.Namespace) -> None:
    """Refuse the -o of `segment` before any work: a folder, not a TIFF name, an input, an existing
    file without --overwrite, or a place it cannot be written."""
    from .batch import check_writable, refuse_input

    output = args.output
    if output.is_dir():
        raise ValueError(f"-o {output} is a folder; give a file name, such as {output / 'labels.tif'}.")
    if output.suffix.lower() not in TIFF_SUFFIXES:
        raise ValueError(f"-o {output}: labels are written as TIFF; give a name ending in .tif or .tiff.")
    inputs = [path for path in (args.image, args.prompts, args.checkpoint) if path is not None]
    refuse_input(output, inputs, f"-o {output}")
    if output.exists() and not args.overwrite:
        raise ValueError(f"-o {output} exists; give another name, or --overwrite to replace it.")
    check_writable(output, what=f"-o {output}")


def check_labels_option(args: argparse.Namespace, several: bool) -> None:
    """Refuse an -o of `auto` that cannot hold its labels: a TIFF name for a folder of inputs, a
    name of another format for one input, or a place it cannot be written."""
    from .batch import check_writable

    output = args.output
    if output is None or output.is_dir():
        return
    tiff = output.suffix.lower() in TIFF_SUFFIXES
    if several and (tiff or output.exists()):
        raise ValueError(f"-o {output} names a file, but {args.input} is a folder of inputs: "
                         "give a folder for their labels.")
    if not several and not tiff and (output.exists() or output.suffix):
        raise ValueError(f"-o {output}: labels are written as TIFF; give a file name ending in .tif or "
                         ".tiff, or a folder.")
    check_writable(output, folder=not tiff, what=f"-o {output}")


def engine_prompts(
    args: argparse.Namespace, height: int, width: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The clicks and box of the options, checked against the image, in the engine's (x, y) order.

    Returns:
        (N, 2) XY points and their (N,) labels (None without clicks), and the (4,) XYXY box or None.
    """
    clicks = [("--point", y, x) for y, x in args.point] + [("--negative", y, x) for y, x in args.negative]
    coords = [(_inside(f"{o} {y:g} {x:g}", "X", x, width), _inside(f"{o} {y:g} {x:g}", "Y", y, height))
              for o, y, x in clicks]
    labels = np.array([1] * len(args.point) + [0] * len(args.negative)) if clicks else None
    box = None
    if args.box is not None:
        text = "--box " + " ".join(f"{v:g}" for v in args.box)
        y0, x0, y1, x1 = (_inside(text, name, value, height if name[0] == "Y" else width)
                          for name, value in zip(("Y0", "X0", "Y1", "X1"), args.box))
        if args.box[2] < args.box[0] or args.box[3] < args.box[1]:
            raise ValueError(f"{text} is inverted: give the top-left corner first (Y0 X0), then the "
                             "bottom-right one (Y1 X1), so that Y0 <= Y1 and X0 <= X1.")
        box = np.array([x0, y0, x1, y1])
    return (np.array(coords) if coords else None), labels, box


def _inside(text: str, name: str, value: float, size: int) -> float:
    """One coordinate of an option, checked to lie on the image: on its pixels 0 to size - 1, or
    within half a pixel of them, as in prompts files; a value in that half pixel is moved onto the edge."""
    unit = "rows" if name[0] == "Y" else "columns"
    if not math.isfinite(value):
        raise ValueError(f"{text}: {name} must be a number, not {value:g}.")
    if not -0.5 <= value <= size - 0.5:
        raise ValueError(f"{text} lies outside the image: {name} = {value:g}, but the image has {size} "
                         f"{unit} ({name[0]} from 0 to {size - 1}).")
    return min(max(value, 0.0), size - 1.0)


def read_slice(args: argparse.Namespace) -> np.ndarray:
    """The 2D image (Y, X) or (Y, X, C) that --point and --box prompt: the image, or its --slice."""
    from .batch import refuse_channels

    image = read_image(args)
    name = "the sample" if args.image is None else args.image
    # The engine reads (Y, X, C) with at most 4 channels as one image, a longer last axis as a stack.
    stack = image.ndim == 4 or (image.ndim == 3 and image.shape[-1] > 4)
    if stack and image.shape[-1] > 4:
        try:
            refuse_channels(image.shape)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    if args.slice is None:
        if not stack:
            return image
        raise ValueError(f"{name}: this is a stack of {image.shape[0]} slices (shape {image.shape}): "
                         "pick one with --slice Z, or segment objects through the stack with "
                         "--prompts FILE (and --propagate).")
    if not stack:
        kind = "2D image" if image.ndim == 2 else f"2D image with {image.shape[-1]} channels"
        raise ValueError(f"{name}: --slice picks a slice of a stack, but this is a {kind} "
                         f"(shape {image.shape}); leave --slice out.")
    if not 0 <= args.slice < image.shape[0]:
        raise ValueError(f"--slice {args.slice} is outside the stack's {image.shape[0]} slices "
                         f"(0 to {image.shape[0] - 1}).")
    return image[args.slice]


def read_image(args: argparse.Namespace) -> np.ndarray:
    """The pixels of the image file (or the sample), refused if napari-sam cannot segment its shape."""
    from .batch import check_shape

    if args.sample:
        from .synthetic import nuclei_image

        return nuclei_image(seed=0)[0]
    if not args.image.is_file():
        raise FileNotFoundError(f"No image file at {args.image}.")
    tiff = args.image.suffix.lower() in TIFF_SUFFIXES
    try:
        image = _read_tiff(args.image) if tiff else _read_other(args.image)
    except ValueError as error:  # `batch.read_image` says what is wrong with a TIFF
        if tiff:
            raise ValueError(f"{args.image}: {error}") from None
        reason = _first_line(error)
        raise ValueError(f"{args.image}: it cannot be read as an image ({reason}).{READABLE}") from None
    except OSError as error:
        kind, readable = ("a TIFF file", "") if tiff else ("an image", READABLE)
        reason = _first_line(error)
        raise ValueError(f"{args.image}: it cannot be read as {kind} ({reason}).{readable}") from None
    try:
        check_shape(image.shape)
    except ValueError as error:
        raise ValueError(f"{args.image}: {error}") from None
    return image


def _first_line(error: Exception) -> str:
    """The reason a reader gives, without the lines of advice on plugins to install that may follow."""
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__


def _read_tiff(path: Path) -> np.ndarray:
    from .batch import read_image as read_tiff  # memory-mapped, or a compressed stack read page by page

    return read_tiff(path)


def _read_other(path: Path) -> np.ndarray:
    import warnings

    from skimage import io

    with warnings.catch_warnings():  # the reader's notes on its own plugins are no concern of the user
        warnings.simplefilter("ignore", DeprecationWarning)
        return io.imread(path)
