"""Linking per-slice objects into 3D objects by overlap."""

import numpy as np
import pytest

from samcore.linking import SliceLinker, link_slices, overlap_matches
from samcore.synthetic import nuclei_stack


def per_slice_numbering(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Number each slice's objects independently and at random, as 2D segmentation does."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(labels)
    for z, plane in enumerate(labels):
        ids = np.unique(plane)[1:]
        lookup = np.zeros(int(labels.max()) + 1, labels.dtype)
        lookup[ids] = rng.permutation(len(ids)) + 1
        out[z] = lookup[plane]
    return out


def assert_same_partition(a: np.ndarray, b: np.ndarray) -> None:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))  # a one-to-one relabelling


def test_synthetic_nuclei_are_linked_back_into_their_3d_objects():
    _, truth = nuclei_stack((12, 64, 64), n_nuclei=5, radius=(6.0, 10.0), seed=1)
    linked = link_slices(per_slice_numbering(truth), min_overlap=0.5)
    assert linked.shape == truth.shape and linked.dtype == np.int32
    assert_same_partition(linked, truth)
    assert linked.max() == truth.max()


def test_a_split_continues_with_the_larger_part():
    stack = np.zeros((2, 10, 20), np.uint16)
    stack[0, 2:8, 2:18] = 1
    stack[1, 2:8, 2:12] = 5  # the larger part
    stack[1, 2:8, 14:18] = 2
    linked = link_slices(stack, min_overlap=0.5)
    assert linked[1, 4, 4] == linked[0, 4, 4] == 1
    assert linked[1, 4, 15] == 2


def test_a_small_object_inside_a_continuing_one_starts_anew():
    stack = np.zeros((2, 20, 20), np.uint16)
    stack[0, 2:18, 2:18] = 1
    stack[1, 3:17, 3:17] = 1
    stack[1, 8:10, 8:10] = 2  # e.g. a nucleolus segmented on its own
    linked = link_slices(stack)
    assert linked[1, 4, 4] == 1 and linked[1, 8, 8] == 2


def test_a_cap_joins_the_object_it_lies_in():
    stack = np.zeros((2, 20, 20), np.uint16)
    stack[0, 2:18, 2:18] = 4
    stack[1, 9:11, 9:11] = 7  # IoU 4 / 256, inside the slice below
    assert np.unique(link_slices(stack)).tolist() == [0, 1]


def test_no_link_below_the_overlap_threshold_or_across_a_gap():
    stack = np.zeros((4, 10, 10), np.uint16)
    stack[0, 0:4, 0:4] = 1
    stack[1, 2:6, 2:6] = 1  # the overlap covers a quarter of either
    stack[3, 2:6, 2:6] = 1  # after an empty slice
    linked = link_slices(stack, min_overlap=0.5)
    assert [linked[0, 0, 0], linked[1, 3, 3], linked[3, 3, 3]] == [1, 2, 3]
    assert link_slices(stack, min_overlap=0.2)[1, 3, 3] == 1


def test_matches_are_one_to_one_best_first():
    previous = np.array([[1, 1, 1, 2, 2, 0]])
    current = np.array([[3, 3, 4, 4, 4, 0]])
    assert overlap_matches(previous, current, 0.1) == {3: 1, 4: 2}


def test_linking_refuses_a_2d_image():
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        link_slices(np.zeros((5, 5)))


def test_linking_slice_by_slice_gives_the_stack_result():
    _, truth = nuclei_stack((10, 64, 64), n_nuclei=6, radius=(5.0, 10.0), seed=3)
    stack = per_slice_numbering(truth, seed=4)
    linker = SliceLinker(0.5)
    linked = np.stack([linker.add(plane) for plane in stack])
    np.testing.assert_array_equal(linked, link_slices(stack, 0.5))
    assert linker.next_id == linked.max() + 1
    with pytest.raises(ValueError, match="shape"):
        linker.add(np.zeros((32, 32), np.int32))
