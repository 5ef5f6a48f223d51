"""Link the 2D objects of consecutive slices into 3D objects.

The rule: overlapping objects on adjacent slices are considered pair by pair, from the highest IoU of
their pixel sets (in Y, X) down. A pair is linked into one 3D object when neither object is linked to
another on that side yet and their overlap covers at least `min_overlap` of the smaller object.

So an object continues into at most one object of the next slice; after a split or before a merge
the pair with the larger IoU continues, and the small cap at the top or bottom of a nucleus, which
lies within its neighbour but has a low IoU with it, still joins it. An object linked to nothing on
the slice before starts a new 3D object. Only adjacent slices are compared: an object missing from
one slice continues as a new object after the gap.
"""

from __future__ import annotations

import numpy as np


def overlap_matches(previous: np.ndarray, current: np.ndarray, min_overlap: float) -> dict[int, int]:
    """One-to-one matches between the objects of two label images (see the module's rule).

    Args:
        previous: (Y, X) labels of one slice.
        current: (Y, X) labels of the next slice.
        min_overlap: Least fraction of the smaller object of a pair that the overlap must cover.

    Returns:
        {current label: previous label} for every matched pair.
    """
    both = (previous > 0) & (current > 0)
    if not both.any():
        return {}
    base = int(current.max()) + 1
    pairs, inter = np.unique(previous[both].astype(np.int64) * base + current[both], return_counts=True)
    prev_ids, cur_ids = pairs // base, pairs % base
    prev_area = _areas(previous, prev_ids)
    cur_area = _areas(current, cur_ids)
    iou = inter / (prev_area + cur_area - inter)
    covered = inter / np.minimum(prev_area, cur_area)
    matches: dict[int, int] = {}
    taken: set[int] = set()
    for k in np.lexsort((cur_ids, prev_ids, -iou)):  # ties: lower ids first, for a deterministic result
        if covered[k] < min_overlap:
            continue
        if cur_ids[k] not in matches and prev_ids[k] not in taken:
            matches[int(cur_ids[k])] = int(prev_ids[k])
            taken.add(int(prev_ids[k]))
    return matches


def _areas(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels.ravel(), minlength=int(ids.max()) + 1)
    return counts[ids]


class SliceLinker:
    """Links the slices of a stack into 3D objects one slice at a time, from the first slice on.

    The rule is the module's, so `link_slices` of a stack equals this fed with its slices in order;
    a viewer can show each slice's 3D objects as soon as the slice is segmented.

    Args:
        min_overlap: Least fraction of the smaller of two objects on adjacent slices that their
            overlap must cover for them to be one 3D object.
    """

    def __init__(self, min_overlap: float = 0.5) -> None:
        if not 0.0 < min_overlap <= 1.0:
            raise ValueError(f"min_overlap is a fraction above 0 and at most 1, not {min_overlap}.")
        self.min_overlap = min_overlap
        self.next_id = 1  # the id the next new 3D object gets
        self._previous: np.ndarray | None = None  # the last slice's own labels
        self._lookup = np.zeros(1, np.int32)  # its labels -> 3D ids

    def add(self, labels: np.ndarray) -> np.ndarray:
        """The 3D ids of the next slice's objects.

        Args:
            labels: (Y, X) non-negative integer labels of the slice, numbered on their own.

        Returns:
            (Y, X) int32 labels: objects continuing from the previous slice keep its 3D ids, the others
            get new ones (`next_id` on), in the order of their labels.
        """
        labels = np.asarray(labels)
        if labels.ndim != 2 or (self._previous is not None and labels.shape != self._previous.shape):
            expected = "(Y, X)" if self._previous is None else str(self._previous.shape)
            raise ValueError(f"Each slice's labels must have shape {expected}, not {labels.shape}.")
        ids = np.unique(labels)
        ids = ids[ids > 0]
        lookup = np.zeros(int(ids.max()) + 1 if ids.size else 1, np.int32)
        matches = {} if self._previous is None else overlap_matches(self._previous, labels, self.min_overlap)
        for label in ids:
            if int(label) in matches:
                lookup[label] = self._lookup[matches[int(label)]]
            else:
                lookup[label] = self.next_id
                self.next_id += 1
        self._previous, self._lookup = labels, lookup
        return lookup[labels]


def link_slices(labels: np.ndarray, min_overlap: float = 0.5) -> np.ndarray:
    """3D instance labels from per-slice 2D instance labels (see the module's rule).

    Args:
        labels: (Z, Y, X) non-negative integer labels, numbered independently on each slice.
        min_overlap: Least fraction of the smaller of two objects on adjacent slices that their
            overlap must cover for them to be one 3D object.

    Returns:
        (Z, Y, X) int32 labels, 3D objects numbered 1..K in order of their first slice.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"Linking needs a (Z, Y, X) stack of labels, not shape {labels.shape}.")
    linker = SliceLinker(min_overlap)
    linked = np.zeros(labels.shape, np.int32)
    for z in range(labels.shape[0]):
        linked[z] = linker.add(labels[z])
    return linked
