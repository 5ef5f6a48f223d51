"""TIFF files and folders for the command line: read stacks, name stores and outputs, write labels.

A stack is read as napari reads it, so a store made here is the one the widget finds: same pixels,
same RGB guess (last axis of 3 or 4), same name (`embeddings.store_path` with the file's stem, which
is the napari layer's name).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .automatic import AutoSettings
from .embeddings import EmbeddingStore, StackView, stack_key, store_path
from .jobs import embed_stack, segment_stack
from .predictor import Predictor
from .progress import Job, Progress, T, run

if TYPE_CHECKING:
    from distributed import Client

IMAGE_SUFFIXES = (".tif", ".tiff")


def input_files(path: Path) -> list[Path]:
    """The TIFF file at `path`, or the TIFF files of the folder `path`, sorted by name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"The folder {path} holds no .tif or .tiff files.")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"No file or folder at {path}.")
    return [path]


def read_image(path: Path) -> np.ndarray:
    """A TIFF's pixels, memory-mapped where the file allows it (uncompressed), else read."""
    import tifffile

    try:
        return tifffile.memmap(path, mode="r")
    except (ValueError, TypeError, OSError):
        return tifffile.imread(path)


def guess_rgb(image: np.ndarray) -> bool:
    """napari's guess: an image of 3 or more axes whose last axis has 3 or 4 entries is RGB(A)."""
    return image.ndim >= 3 and image.shape[-1] in (3, 4)


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
    return EmbeddingStore(key, view.n_slices, path, cache_slices=2)


def labels_path(image: Path, output: Path | None, several: bool) -> Path:
    """Where the labels of `image` go: `output` itself for one file, else `<stem>_labels.tif` in a folder."""
    name = f"{image.stem}_labels.tif"
    if output is None:
        return image.with_name(name)
    if several or output.is_dir() or output.suffix.lower() not in IMAGE_SUFFIXES:
        return output / name
    return output


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Write instance labels as a zlib-compressed TIFF, uint16 when the labels fit, else uint32."""
    import tifffile

    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, labels.astype(dtype), compression="zlib", photometric="minisblack")


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


def with_progress_bar(job: Job[T], description: str) -> T:
    """Run a job with a progress bar on stderr: one tick per slice, the point batches alongside."""
    from tqdm import tqdm

    with tqdm(desc=description, unit="slice", file=sys.stderr, dynamic_ncols=True) as bar:

        def show(step: Progress) -> None:
            if step.stage in ("embedding", "slices"):
                bar.total = step.total
                bar.update(step.done - bar.n)
            elif step.stage == "masks":
                bar.set_postfix_str(f"point batch {step.done}/{step.total}", refresh=True)
            elif step.stage == "linking":
                bar.set_postfix_str("linking slices" if step.done == 0 else "linked", refresh=True)

        return run(job, show)
