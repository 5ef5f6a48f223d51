"""Per-slice embedding stores: memory, zarr on disk, keys that refuse foreign caches."""

import numpy as np
import pytest
import torch

from samcore import Predictor, build_sam
from samcore.embeddings import (
    EmbeddingStore, StackView, embed_slices, model_key, nearest_first, stack_key, store_path,
)


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return Predictor(build_sam("vit_test"), precision="fp32")


@pytest.fixture(scope="module")
def view():
    return StackView.of(np.random.default_rng(0).integers(0, 3000, size=(5, 40, 50)).astype(np.uint16))


def test_nearest_first_starts_at_the_displayed_slice():
    assert nearest_first(2, 5) == [2, 3, 1, 4, 0]
    assert nearest_first(0, 3) == [0, 1, 2]


def test_one_contrast_for_the_whole_stack():
    stack = np.zeros((2, 8, 8), np.uint16)
    stack[0] = 100
    stack[1] = 1000
    view = StackView.of(stack)
    assert view.rgb_slice(0).max() < view.rgb_slice(1).max()  # a dim slice stays dim


def test_a_slice_edited_in_place_changes_its_fingerprint_only():
    stack = np.random.default_rng(1).integers(0, 3000, size=(3, 16, 16)).astype(np.uint16)
    view = StackView.of(stack)  # reads the array itself, as the widget reads a layer's data
    before = [view.fingerprint(z) for z in range(3)]
    assert before == [StackView.of(stack.copy()).fingerprint(z) for z in range(3)]  # the pixels, not the array
    stack[1, 7, 7] += 1
    assert [view.fingerprint(z) == f for z, f in enumerate(before)] == [True, False, True]


class SliceReader:
    """A lazy stack (as a dask or zarr array is) that records what is read and cannot be read whole."""

    def __init__(self, stack):
        self._stack, self.reads = stack, []
        self.shape, self.dtype, self.ndim = stack.shape, stack.dtype, stack.ndim

    def __getitem__(self, key):
        self.reads.append(key)
        return self._stack[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole stack was read at once")


def test_a_lazy_stack_is_read_slice_by_slice_and_embeds_like_the_array(predictor, view):
    lazy = SliceReader(view.data)
    lazy_view = StackView.of(lazy)
    assert lazy_view.data is lazy and lazy_view.value_range == view.value_range
    assert stack_key(lazy_view, "m") == stack_key(view, "m")  # the same disk cache serves both
    assert all(key == z for key, z in zip(lazy.reads[-5:], range(5)))  # hashed one slice at a time
    lazy.reads.clear()
    store, reference = EmbeddingStore("k", 5), EmbeddingStore("k", 5)
    assert list(embed_slices(predictor, lazy_view, store, [2])) == [2]
    assert lazy.reads == [2]
    list(embed_slices(predictor, view, reference, [2]))
    torch.testing.assert_close(store.get(2).features, reference.get(2).features)
    assert lazy_view.fingerprint(2) is None and lazy.reads == [2]  # no read to check a lazy slice


def test_4d_data_is_refused_with_the_number_of_dimensions():
    with pytest.raises(ValueError, match="4 spatial dimensions"):
        StackView.of(np.zeros((2, 3, 8, 8)))


@pytest.mark.parametrize("shape", [(40, 50, 3), (40, 50, 2), (40, 50, 5)])
def test_an_image_with_channels_last_is_not_taken_for_a_stack_of_thin_slices(shape):
    with pytest.raises(ValueError, match="rgb=True"):
        StackView.of(np.zeros(shape, np.uint8))
    assert StackView.of(np.zeros((40, 50, 3), np.uint8), rgb=True).n_slices == 1
    assert StackView.of(np.zeros((3, 40, 50), np.uint8)).n_slices == 3


def test_a_mobile_sam_model_has_a_key_its_counters_included():
    model = build_sam("vit_t")  # its BatchNorm layers count batches in 0-d tensors
    key = model_key(model)
    assert key == model_key(model)
    buffer = next(b for name, b in model.named_buffers() if name.endswith("num_batches_tracked"))
    assert buffer.ndim == 0
    buffer += 1
    assert model_key(model) != key


def test_disk_store_resumes_and_matches_memory(tmp_path, predictor, view):
    key = stack_key(view, model_key(predictor.model))
    store = EmbeddingStore(key, view.n_slices, tmp_path / "cache.zarr")
    computed = list(embed_slices(predictor, view, store, [3, 1]))
    assert computed == [3, 1]
    reopened = EmbeddingStore(key, view.n_slices, tmp_path / "cache.zarr")
    assert 3 in reopened and 1 in reopened and 0 not in reopened
    torch.testing.assert_close(reopened.get(3).features, store.get(3).features)
    assert reopened.get(3).original_size == (40, 50)
    assert list(embed_slices(predictor, view, reopened, range(5))) == [0, 2, 4]  # nothing recomputed


def test_cache_of_other_data_or_model_is_refused(tmp_path, predictor, view):
    key = stack_key(view, model_key(predictor.model))
    EmbeddingStore(key, view.n_slices, tmp_path / "cache.zarr")
    other_view = StackView.of(view.data + 1)
    with pytest.raises(ValueError, match="other data or another model"):
        EmbeddingStore(stack_key(other_view, model_key(predictor.model)), view.n_slices, tmp_path / "cache.zarr")
    other_model = build_sam("vit_test")
    with pytest.raises(ValueError, match="other data or another model"):
        EmbeddingStore(stack_key(view, model_key(other_model)), view.n_slices, tmp_path / "cache.zarr")


def test_a_store_keeps_every_view_and_its_key_names_how_many(tmp_path, predictor, view):
    mirrored = Predictor(predictor.model, precision="fp32", views=2)
    key = stack_key(view, model_key(mirrored.model), mirrored.views)
    assert key != stack_key(view, model_key(mirrored.model))  # a one-view cache is another cache
    store = EmbeddingStore(key, view.n_slices, tmp_path / "cache.zarr")
    assert list(embed_slices(mirrored, view, store, [2])) == [2]
    read_back = EmbeddingStore(key, view.n_slices, tmp_path / "cache.zarr").get(2)
    assert read_back.views == 2
    torch.testing.assert_close(read_back.features, store.get(2).features)
    mirrored.set_embedding(read_back)  # decodes both views
    assert mirrored.predict(box=np.array([5, 5, 30, 30]), multimask_output=False)[0].shape == (1, 40, 50)
    with pytest.raises(ValueError, match="other data or another model"):
        EmbeddingStore(stack_key(view, model_key(mirrored.model)), view.n_slices, tmp_path / "cache.zarr")


def test_contrast_of_a_long_stack_comes_from_a_bounded_sample():
    from samcore.embeddings import contrast_sample
    from samcore.preprocess import MAX_PERCENTILE_PIXELS

    stack = np.random.default_rng(1).gamma(2.0, 300.0, size=(40, 300, 400)).astype(np.uint16)
    sample = contrast_sample(stack)
    assert sample.size <= MAX_PERCENTILE_PIXELS < stack.size
    exact = np.percentile(stack, (1.0, 99.8))
    np.testing.assert_allclose(StackView.of(stack).value_range, exact, rtol=0.02)
    small = stack[:2]
    assert contrast_sample(small) is small  # small stacks: every voxel, as before


def test_store_names_stay_inside_the_cache_folder(tmp_path):
    key = "0123456789abcdef"
    cases = [("exp1/cell A", "exp1_cell A"), ("a\\b:c?", "a_b_c_"), ("..", "_"), ("nuclei", "nuclei")]
    for name, stem in cases:
        path = store_path(tmp_path, name, key)
        assert path.parent == tmp_path and path.name == f"{stem}-{key[:12]}.zarr"
