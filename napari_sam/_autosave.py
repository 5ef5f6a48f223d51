"""Autosave: the objects layer is written to disk as SAM and the user change it, to recover it after a crash.

napari keeps layers in memory: a crash, or a window closed without saving, loses every object. After each
commit, undo, slice painted by propagation or segment all, and stroke painted by hand in the objects
layer, the rows of the array that changed (slices of a stack, rows of a 2D image) are copied and written,
in a background thread, to the zarr folder `<image> - <objects>.sam.zarr` in the autosave folder:
``$NAPARI_SAM_AUTOSAVE``, else the platform's user data folder for napari-sam (for example
``~/.local/share/napari-sam/autosave`` on Linux). A layer's first write is the whole array; an autosave
of that name from an earlier session is first renamed "<image> - <objects> (<when>).sam.zarr" (the newest
five are kept), so starting again after a crash does not overwrite what the crash left. Opening the
folder in napari (File > Open Folder, or dragging it in) gives the objects back as a labels layer. The
folder's attributes name the image and the objects layer, and hold the slices where the user erased each
object by hand, which the layer opened from it keeps in its metadata (`erased_slices`).
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np

AUTOSAVE_ENV_VAR = "NAPARI_SAM_AUTOSAVE"
SUFFIX = ".sam.zarr"
KEEP_EARLIER = 5  # autosaves of earlier sessions kept per image and objects layer
TIME_PATTERN = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]-[0-9][0-9]-[0-9][0-9]"  # in their names


def autosave_dir() -> Path:
    """The folder autosaved objects go to (it may not exist yet)."""
    override = os.environ.get(AUTOSAVE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-sam", appauthor=False)) / "autosave"


def autosave_path(folder: Path, image_name: str, labels_name: str) -> Path:
    """Where the objects layer `labels_name`, drawn on the image `image_name`, is autosaved."""
    from samcore.embeddings import safe_file_name

    return folder / (safe_file_name(f"{image_name} - {labels_name}") + SUFFIX)


def earlier_autosaves(image_name: str, folder: Path | None = None) -> list[Path]:
    """The autosaves in `folder` (default `autosave_dir()`) of objects drawn on the image `image_name`."""
    from samcore.embeddings import safe_file_name

    folder = folder if folder is not None else autosave_dir()
    return sorted(folder.glob(f"{glob.escape(safe_file_name(image_name))} - *{SUFFIX}"))


def touched_rows(index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The positions along the first axis (slices of a stack, rows of an image) of flat indices."""
    return np.unique(np.asarray(index) // int(np.prod(shape[1:], dtype=np.int64)))


def painted_rows(atoms, shape: tuple[int, ...]) -> np.ndarray | None:
    """The first-axis positions a napari Labels paint event's history atoms changed; None if unknown.

    An atom starts with where it wrote: one index array per axis, or (a brush stroke or fill) a box of
    one slice per axis. Anything else is not read, and then the whole layer is written.
    """
    rows = []
    for atom in atoms:
        where = atom[0] if isinstance(atom, tuple) and atom and isinstance(atom[0], tuple) else ()
        first = where[0] if where else None
        if isinstance(first, slice):
            rows.append(np.arange(*first.indices(shape[0])))
            continue
        first = np.asarray(first) if first is not None else None
        if first is None or not np.issubdtype(first.dtype, np.integer):
            return None
        rows.append(np.unique(first))
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.intp)


def watch_history(layer, callback: Callable[[object], None]) -> None:
    """Call ``callback(layer)`` after napari's undo or redo in the Labels `layer`: napari sends no event
    for them (and what they replay is private to it). A later watch replaces an earlier one's callback."""
    for name in ("undo", "redo"):
        original = getattr(getattr(layer, name), "replayed", getattr(layer, name))

        def replay(original=original) -> None:
            original()
            callback(layer)

        replay.replayed = original
        setattr(layer, name, replay)


def unwatch_history(layer) -> None:
    """Give `layer` napari's own undo and redo back (see `watch_history`)."""
    for name in ("undo", "redo"):
        if hasattr(getattr(layer, name), "replayed"):
            delattr(layer, name)


class Session:
    """What one napari session (process) wrote: files written whole, and the array each holds."""

    def __init__(self) -> None:
        self.layouts: dict[Path, tuple] = {}  # (shape, dtype, array id) of each file written whole
        self.written: set[Path] = set()


# Shared by the widgets of this process: a dock closed and opened again goes on writing the same files,
# and does not take them for a crashed session's.
PROCESS = Session()


class Autosave:
    """Writes labels arrays, whole or by rows of their first axis, in one background thread.

    Args:
        folder: The autosave folder; default `autosave_dir()` when the first write is asked for.
        session: What this napari session wrote so far (`PROCESS`; another `Session` stands for a new
            napari session).
    """

    def __init__(self, folder: Path | None = None, session: Session = PROCESS) -> None:
        self.folder = folder
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-sam-autosave")
        self._layouts = session.layouts
        self.written = session.written  # the files of this session
        self._pending: list[Future] = []
        self._errors: list[str] = []
        self._lock = threading.Lock()

    def save(
        self, labels: np.ndarray, image_name: str, labels_name: str, rows=None, erased: dict | None = None
    ) -> tuple[Path, bool, bool]:
        """Copy `rows` of `labels` (None: all of it) now and write them in the background; `erased`: the
        objects the user erased by hand, as `erased_slices` gives them, kept with the array.

        Returns:
            The file's path, whether this is its first write in this session (the whole array), and
            whether an earlier autosave there is being renamed to keep it.
        """
        folder = self.folder if self.folder is not None else autosave_dir()
        path = autosave_path(folder, image_name, labels_name)
        layout = (labels.shape, labels.dtype.str, id(labels))  # a layer given a new array is written anew
        first = self._layouts.get(path) != layout
        if not first and rows is not None and len(rows) == 0:
            return path, False, False
        earlier = first and path.exists()
        if first or rows is None:
            # Read in the writer thread, a chunk at a time: no copy of a large layer at once. A chunk read
            # while it is being changed is written again by that change's own save, queued after this one.
            parts = [(0, labels)]
        else:
            parts = [(start, labels[start:stop].copy()) for start, stop in _runs(np.asarray(rows))]
        self._layouts[path] = layout
        self.written.add(path)
        saved = datetime.now().isoformat(timespec="seconds")
        attrs = {"image": image_name, "objects": labels_name, "saved": saved}
        attrs[ERASED_KEY] = {str(object_id): list(slices) for object_id, slices in (erased or {}).items()}
        future = self._executor.submit(_write, path, layout[:2], parts, first, attrs)
        future.add_done_callback(self._done)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]
        return path, first, earlier

    def errors(self) -> list[str]:
        """The failed writes since the last call (each a message), emptied."""
        with self._lock:
            errors, self._errors = self._errors, []
        return errors

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every write asked for so far is on disk (or has failed)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            try:
                future.result(timeout)
            except Exception:  # noqa: BLE001 - reported by `errors`
                pass

    def _done(self, future: Future) -> None:
        error = future.exception()
        if error is not None:
            with self._lock:
                self._errors.append(f"{type(error).__name__}: {error}")


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique positions as (start, stop) runs of consecutive ones."""
    rows = np.unique(rows)
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks)]


def _write(path: Path, layout: tuple, parts: list[tuple[int, np.ndarray]], whole: bool, attrs: dict) -> None:
    import zarr

    shape, dtype = layout
    if whole:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # an earlier session's, perhaps the one a crash left: kept beside
            _keep_earlier(path)
        chunks = (1, *shape[1:]) if len(shape) == 3 else (min(shape[0], 256), *shape[1:])
        array = zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
    else:
        array = zarr.open_array(str(path), mode="r+")
    for start, rows in parts:
        step = array.chunks[0]
        for offset in range(0, len(rows), step):
            array[start + offset : start + min(offset + step, len(rows))] = rows[offset : offset + step]
    array.attrs.update(attrs)


def _keep_earlier(path: Path) -> Path:
    """Rename the autosave at `path` to "<name> (<when it was saved>).sam.zarr", keeping the newest
    `KEEP_EARLIER` such copies of that name."""
    import shutil

    import zarr

    try:
        saved = str(zarr.open_array(str(path), mode="r").attrs.get("saved", ""))
    except Exception:  # noqa: BLE001 - not readable as an array: named by its time on disk
        saved = ""
    if not saved:
        saved = datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
    stem = path.name[: -len(SUFFIX)]
    kept = path.with_name(f"{stem} ({saved.replace(':', '-')}){SUFFIX}")
    if kept.exists():
        shutil.rmtree(kept)
    path.rename(kept)
    # Only names with a time: another layer's "<image> - <objects> (2)" is not one of these.
    earlier = sorted(path.parent.glob(f"{glob.escape(stem)} ({TIME_PATTERN}){SUFFIX}"))
    for old in earlier[:-KEEP_EARLIER]:
        shutil.rmtree(old, ignore_errors=True)
    return kept


# Where an objects layer's metadata says which image it belongs to: {"image": unique id} for a layer the
# widget made, {"image_name": name} for one opened from an autosave; and, under "erased", the slices
# where the user erased each object by hand ({"3": [4, 5]}: object 3 on slices 4 and 5).
OBJECTS_KEY = "napari-sam"
ERASED_KEY = "erased"


def erased_slices(layer) -> dict[int, list[int]]:
    """Object id -> the slices of the objects layer `layer` where the user erased it by hand."""
    own = layer.metadata.get(OBJECTS_KEY)
    erased = own.get(ERASED_KEY, {}) if isinstance(own, dict) else {}
    return {int(object_id): sorted(int(z) for z in slices) for object_id, slices in erased.items() if slices}


def note_erased(layer, object_id: int, z: int) -> None:
    """Remember in `layer`'s metadata that the user erased object `object_id` from slice `z`: it travels
    with the layer, and with its autosave."""
    own = layer.metadata.setdefault(OBJECTS_KEY, {})
    slices = own.setdefault(ERASED_KEY, {}).setdefault(str(int(object_id)), [])
    if int(z) not in slices:
        slices.append(int(z))


def forget_erased(layer, object_id: int) -> None:
    """Forget object `object_id`'s erasures in `layer` (a new object was given its id)."""
    own = layer.metadata.get(OBJECTS_KEY)
    if isinstance(own, dict):
        own.get(ERASED_KEY, {}).pop(str(int(object_id)), None)


def read_objects(path: str | Path) -> np.ndarray:
    """The labels array of an autosaved objects folder."""
    import zarr

    return np.asarray(zarr.open_array(str(path), mode="r")[...])


def get_reader(path):
    """napari reader hook: an autosaved objects folder (``*.sam.zarr``) opens as a labels layer."""
    if isinstance(path, (list, tuple)) or not str(path).rstrip("/\\").endswith(SUFFIX):
        return None
    return _read_layer


def _read_layer(path):
    import zarr

    path = str(path).rstrip("/\\")
    attrs = dict(zarr.open_array(path, mode="r").attrs)
    name = attrs.get("objects", Path(path).name[: -len(SUFFIX)])
    saved = f", autosaved {attrs['saved']}" if "saved" in attrs else ""
    image = attrs.get("image", "image")
    # The image's name tells the widget whose objects these are: it picks the layer for that image.
    metadata = {OBJECTS_KEY: {"image_name": image, ERASED_KEY: dict(attrs.get(ERASED_KEY, {}))}}
    return [(read_objects(path), {"name": f"{name} ({image}{saved})", "metadata": metadata}, "labels")]
