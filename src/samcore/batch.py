"""TIFF files and folders for the command line: read stacks, name stores and outputs, write labels.

A stack is read as napari reads it, so a store made here is the one the widget finds: same pixels,
same RGB guess (last axis of 3 or 4), same name (`embeddings.store_path` with the file's stem, which
is the napari layer's name).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .automatic import AutoSettings
from .embeddings import EmbeddingStore, StackView, channels_last, guess_rgb_shape, stack_key, store_path
from .jobs import embed_stack, segment_stack
from .predictor import Predictor
from .progress import Job, Progress, T, run

if TYPE_CHECKING:
    from distributed import Client

IMAGE_SUFFIXES = (".tif", ".tiff")
# What reads a (Y, X, 2) image as one 2D image (red and green, `samcore.preprocess.to_rgb_uint8`).
CHANNELS_2D_READER = (
    "; `napari-sam segment --point/--box` (without --prompts) reads 2 to 4 channels as one 2D image"
)
LABELS_SUFFIX = "_labels"  # `NAME_labels.tif`: the labels `auto` writes beside `NAME.tif`


def input_files(path: Path) -> tuple[list[Path], dict[Path, Path]]:
    """The TIFF file at `path`, or the TIFF files of the folder `path`, sorted by name.

    Returns:
        The inputs, and the files of the folder left out because napari-sam wrote them, each with
        its image: the labels `NAME_labels.tif` of an image `NAME.tif` (or `.tiff`) beside them.
    """
    path = Path(path)
    if path.is_dir():
        tiffs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        by_stem = {p.stem: p for p in tiffs}
        written = {p: by_stem[p.stem.removesuffix(LABELS_SUFFIX)] for p in tiffs
                   if p.stem.endswith(LABELS_SUFFIX) and p.stem.removesuffix(LABELS_SUFFIX) in by_stem}
        files = [p for p in tiffs if p not in written]
        if not files:
            raise FileNotFoundError(f"The folder {path} holds no .tif or .tiff files"
                                    + (" other than labels napari-sam wrote." if written else "."))
        return files, written
    if not path.is_file():
        raise FileNotFoundError(f"No file or folder at {path}.")
    return [path], {}


def check_shape(shape: tuple[int, ...]) -> None:
    """Refuse the shape of an image that napari-sam cannot segment, with the shapes it reads.

    The message follows the file's name and a colon on the command line.
    """
    rgb = guess_rgb_shape(shape)
    if len(shape) - rgb not in (2, 3):
        raise ValueError(
            f"this is a {len(shape)}D image of shape {tuple(shape)}, but napari-sam reads 2D images (Y, X), "
            "RGB images (Y, X, 3 or 4), stacks (Z, Y, X) and RGB stacks (Z, Y, X, 3 or 4). "
            "Save one channel or time point per file first."
        )
    height, width = shape[-3:-1] if rgb else shape[-2:]
    if height < 2 or width < 2:
        raise ValueError(f"the image of shape {tuple(shape)} is too small: each side needs 2 pixels or more.")


def refuse_channels(shape: tuple[int, ...], two_d_reader: str = "") -> None:
    """Refuse an image that napari would read as a stack of slices a few pixels wide, being rather one
    image with its channels last (`channels_last`). `two_d_reader`: what reads it as one 2D image."""
    if channels_last(shape):
        raise ValueError(
            f"this image of shape {tuple(shape)} looks like a 2D image with {shape[-1]} channels (Y, X, C), "
            f"which napari, and so napari-sam's stacks, would read as {shape[0]} slices {shape[-1]} pixels "
            f"wide. Save the channel to segment on its own (or the image as RGB){two_d_reader}."
        )


def check_image_file(path: Path) -> tuple[int, ...]:
    """The shape of a TIFF, read from its header only; refuses a file napari-sam cannot segment.

    The message follows the file's name and a colon on the command line.
    """
    shape, dtype = tiff_header(path)
    if dtype.kind not in "buif":
        raise ValueError(f"its pixels are of type {dtype}; napari-sam reads whole or real numbers.")
    check_shape(shape)
    refuse_channels(shape, CHANNELS_2D_READER)
    return shape


def _not_a_tiff(error: Exception) -> ValueError:
    """The error for a file tifffile cannot read: in its words where it has some; a lookup that failed
    inside it ("list index out of range") says nothing to a user."""
    said = str(error) if isinstance(error, (ValueError, OSError)) and str(error) else "damaged, or not a TIFF"
    return ValueError(f"it cannot be read as a TIFF file ({said}).")


def tiff_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and pixel type of a TIFF's image, from its header; ValueError (the message follows the
    file's name and a colon) if it is not a TIFF, or holds less than its header announces."""
    import tifffile

    with _quiet_tifffile():  # its log lines on a damaged file would come before, and beside, ours
        try:
            with tifffile.TiffFile(path) as tiff:
                series = tiff.series[0]
                shape, dtype = tuple(series.shape), np.dtype(series.dtype)
                missing = _missing_data(tiff, series, Path(path).stat().st_size)
        except (ValueError, IndexError, KeyError, OSError) as error:  # tifffile.TiffFileError is a ValueError
            raise _not_a_tiff(error) from None
    if missing:
        raise ValueError(f"the file is damaged or was cut short (an interrupted copy?): {missing}.")
    return shape, dtype


def _missing_data(tiff, series, size: int) -> str | None:
    """What a TIFF lacks of the image its header announces, or None: its header's shape (tifffile's
    own or ImageJ's slice count) against the pages found, and the pixels' place against the file's size."""
    announced = tiff.shaped_metadata[0].get("shape") if tiff.is_shaped and tiff.shaped_metadata else None
    if announced is not None and math.prod(announced) != math.prod(series.shape):
        return f"its header announces an image of shape {tuple(announced)}, and it holds {tuple(series.shape)}"
    planes = tiff.imagej_metadata.get("images") if tiff.is_imagej and tiff.imagej_metadata else None
    if planes is not None:
        plane_axes = 3 if series.keyframe.samplesperpixel > 1 else 2  # (Y, X, samples) or (Y, X)
        found = math.prod(series.shape[:-plane_axes])
        if int(planes) > found:
            return f"its header announces {planes} images, and it holds {found}"
    if series.dataoffset is not None:  # one contiguous block of pixels (uncompressed)
        end = series.dataoffset + series.nbytes
    else:
        last = tiff.pages[len(tiff.pages) - 1]
        end = max((o + n for o, n in zip(last.dataoffsets, last.databytecounts)), default=0)
    if end > size:
        return f"its pixels run to byte {end}, and the file ends at byte {size}"
    return None


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_image(path: Path) -> np.ndarray:
    """A TIFF's pixels, memory-mapped where the file allows it (uncompressed). A compressed stack is
    read page by page when its slices are used (`lazy_stack`), so it is never in memory whole; a
    compressed 2D image is read. A damaged or truncated file is refused (`tiff_header`)."""
    import tifffile

    tiff_header(path)
    try:
        return tifffile.memmap(path, mode="r")
    except (ValueError, TypeError, OSError):
        pass
    stack = lazy_stack(path)
    if stack is not None:
        return stack
    try:
        return tifffile.imread(path)
    except (ValueError, TypeError, IndexError, OSError) as error:
        raise _not_a_tiff(error) from None


def lazy_stack(path: Path):
    """A TIFF stack of 3 or more axes as a read-only zarr array through tifffile, which decodes the
    pages each read needs; None where the file does not open that way (a pyramid, an older tifffile)."""
    import tifffile
    import zarr

    try:
        store = tifffile.imread(path, aszarr=True)
    except (ValueError, TypeError, OSError, NotImplementedError):
        return None
    try:
        array = zarr.open(store, mode="r")
    except Exception:  # noqa: BLE001 (any failure: the store is not one this zarr reads; imread follows)
        store.close()
        return None
    if not isinstance(array, zarr.Array) or array.ndim < 3:
        store.close()
        return None
    return array


def guess_rgb(image: np.ndarray) -> bool:
    """napari's guess: an image of 3 or more axes whose last axis has 3 or 4 entries is RGB(A)."""
    return guess_rgb_shape(image.shape)


def open_view(path: Path) -> tuple[StackView, tuple[int, ...]]:
    """The stack of a TIFF file and the spatial shape of its labels ((Y, X) or (Z, Y, X))."""
    image = read_image(path)
    rgb = guess_rgb(image)
    return StackView.of(image, rgb=rgb), tuple(image.shape[:-1] if rgb else image.shape)


def open_store(
    view: StackView,
    model_id: str,
    name: str,
    cache_dir: Path | None = None,
    store: Path | None = None,
    views: int = 1,
) -> EmbeddingStore | None:
    """The disk store of a stack: the folder `store`, or one named after the stack in `cache_dir`.

    At most two slices are held in memory; None when neither folder is given. `views`: how many
    views of each slice the predictor embeds (`Predictor.views`).
    """
    if store is None and cache_dir is None:
        return None
    key = stack_key(view, model_id, views)
    path = store if store is not None else store_path(cache_dir, name, key)
    _check_views(path, key, views)
    return EmbeddingStore(key, view.n_slices, path, cache_slices=2)


def _check_views(path: Path, key: str, views: int) -> None:
    """Refuse a store made with another number of views, saying so (its features hold one row per view)."""
    if not Path(path).is_dir():
        return
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except (ValueError, OSError):  # no store: `EmbeddingStore` refuses the folder with its own message
        return
    if group.attrs.get("key") == key or "features" not in group:
        return
    stored = group["features"].shape[1]  # (slices, views, channels, h, w)
    if stored != views:
        raise ValueError(
            f"the embedding store {path} was made with --views {stored}, and this run uses "
            f"--views {views}. Give --views {stored}, or another store."
        )


def labels_path(image: Path, output: Path | None, several: bool) -> Path:
    """Where the labels of `image` go: `output` itself for one file, else `<stem>_labels.tif` in a folder."""
    name = f"{image.stem}{LABELS_SUFFIX}.tif"
    if output is None:
        return image.with_name(name)
    if several or output.is_dir() or output.suffix.lower() not in IMAGE_SUFFIXES:
        return output / name
    return output


def refuse_input(output: Path, inputs: Iterable[Path], what: str | None = None) -> None:
    """Refuse to write `output` over one of the command's inputs (the same file by any name).

    `what` names the output in the message, e.g. "-o labels.tif"; by default its path.
    """
    if not output.exists():
        return
    for source in inputs:
        if source.exists() and os.path.samefile(output, source):
            same = "" if Path(output) == Path(source) else f" (the same file as {source})"
            raise ValueError(
                f"{what or output} is an input of this command{same}; napari-sam never writes over its "
                "inputs, even with --overwrite. Choose another name."
            )


def check_writable(path: Path, folder: bool = False, what: str | None = None) -> None:
    """Refuse a file (`folder`: a folder) that could not be written: a file where a folder of its
    path has to be, or a folder without write permission. Missing folders are fine (they are made).

    `what` names the path in the message, e.g. "--cache-dir emb"; by default the path itself.
    """
    existing = Path(path) if folder else Path(path).parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"Cannot write {what or path}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"Cannot write {what or path}: no permission to write in the folder {existing}.")


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Write instance labels as a zlib-compressed TIFF, uint16 when the labels fit, else uint32."""
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    write_tiff(path, labels.astype(dtype), photometric="minisblack")


def write_tiff(path: Path, data: np.ndarray, **options) -> None:
    """Write a zlib-compressed TIFF whole or not at all: into a hidden file beside it, renamed when done.

    A run stopped while writing (Ctrl-C) leaves no file that looks finished but holds part of the
    data, which a later run would take as done (or refuse to replace). `options` go to tifffile.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        tifffile.imwrite(partial, data, compression="zlib", **options)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def embed_file(
    path: Path,
    predictor: Predictor,
    model_id: str,
    cache_dir: Path | None = None,
    store: Path | None = None,
    client: Client | None = None,
) -> Job[tuple[Path, int]]:
    """Embed every slice of a TIFF into its store; slices already there are skipped.

    Returns:
        The store's folder and the number of slices computed.
    """
    view, _ = open_view(path)
    disk = open_store(view, model_id, path.stem, cache_dir, store, predictor.views)
    if disk is None:
        raise ValueError("Say where embeddings go: --cache-dir DIR or --store FOLDER.zarr.")
    computed = yield from embed_stack(predictor, view, disk, client=client)
    return disk.path, computed


def auto_file(
    path: Path,
    output: Path,
    predictor: Predictor,
    model_id: str,
    settings: AutoSettings,
    link_overlap: float = 0.5,
    cache_dir: Path | None = None,
    store: Path | None = None,
    client: Client | None = None,
) -> Job[int]:
    """Automatic segmentation of a TIFF into a labels TIFF of the same (Y, X) or (Z, Y, X) shape.

    Returns:
        The number of objects found.
    """
    view, shape = open_view(path)
    disk = open_store(view, model_id, path.stem, cache_dir, store, predictor.views)
    labels = yield from segment_stack(predictor, view, disk, settings, link_overlap, client)
    write_labels(output, labels.reshape(shape))
    return int(labels.max(initial=0))


def with_progress_bar(job: Job[T], description: str, unit: str = "slice") -> T:
    """Run a job with a progress bar on stderr: one tick per `unit` done, the point batches alongside.

    Ticks count the steps of the stages "embedding", "prompts", "slices" and "propagation"
    (`PropagationProgress`, whose steps are object-slices).
    """
    from tqdm import tqdm

    with tqdm(desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:

        def show(step: Progress) -> None:
            if step.stage in ("embedding", "prompts", "slices", "propagation"):
                bar.total = step.total
                bar.update(step.done - bar.n)
            elif step.stage == "masks":
                bar.set_postfix_str(f"point batch {step.done}/{step.total}", refresh=True)
            elif step.stage == "linking":
                bar.set_postfix_str("linking slices" if step.done == 0 else "linked", refresh=True)

        return run(job, show)
