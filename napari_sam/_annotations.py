"""Committing masks into a labels array as new objects, with undo. No napari needed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Commit:
    """What one commit changed, enough to undo it.

    Attributes:
        object_id: The id given to the new object.
        index: Flat indices into the labels array that were written.
        previous: Their values before the commit.
        note: What the step was, for the status line, if not one new object.
        written: The values written at `index`; None if `object_id` everywhere.
    """

    object_id: int
    index: np.ndarray
    previous: np.ndarray
    note: str = ""
    written: np.ndarray | None = None


def commit_mask(labels: np.ndarray, mask: np.ndarray, where: tuple, overwrite: bool = False) -> Commit | None:
    """Write `mask` into `labels[where]` as a new object id (max + 1), in place.

    Args:
        labels: The whole labels array (e.g. ZYX).
        mask: Boolean mask of the region labels[where] covers (e.g. one YX slice).
        where: Index of the region, e.g. (z,) for slice z or () for a 2D image.
        overwrite: Also take pixels that belong to other objects; by default they are kept.

    Returns:
        The commit, or None if no pixel would change (empty mask, or all taken).
    """
    if not labels.flags.c_contiguous:
        raise ValueError("The labels array must be C-contiguous to be edited in place.")
    region = labels[where]
    if region.shape != mask.shape:
        raise ValueError(f"The mask has shape {mask.shape}, the labels region {region.shape}.")
    take = mask.astype(bool) if overwrite else mask.astype(bool) & (region == 0)
    if not take.any():
        return None
    object_id = int(labels.max()) + 1
    if object_id > np.iinfo(labels.dtype).max:
        raise ValueError(f"The labels layer ({labels.dtype}) has no room for another object id.")
    offset = np.ravel_multi_index(tuple(where) + (0,) * mask.ndim, labels.shape) if where else 0
    index = offset + np.flatnonzero(take)
    flat = labels.reshape(-1)
    previous = flat[index].copy()
    flat[index] = object_id
    return Commit(object_id, index, previous)


def undo_commit(labels: np.ndarray, commit: Commit) -> int:
    """Restore what `commit` overwrote, in place, where its pixels still hold what it wrote.

    Pixels edited since (painted by hand, erased, restored by napari's own undo) are kept.

    Returns:
        The number of the commit's pixels that were edited since, and so kept.
    """
    flat = labels.reshape(-1)
    written = commit.object_id if commit.written is None else commit.written
    still = flat[commit.index] == written
    flat[commit.index[still]] = commit.previous[still]
    return int(still.size - np.count_nonzero(still))
