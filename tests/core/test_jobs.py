"""Whole-stack automatic segmentation through the Python API, with a tiny random-weight model:
shapes, linking, stores that resume, float16 embeddings that keep the masks."""

import dataclasses

import numpy as np
import pytest

from samcore import Predictor
from samcore.automatic import AutoSettings, segment_embedding
from samcore.embeddings import EmbeddingStore, StackView, as_stored, model_key, stack_key
from samcore.jobs import embed_stack, segment_everything, segment_stack
from samcore.preprocess import to_rgb_uint8
from samcore.progress import run
from samcore.synthetic import nuclei_image, nuclei_stack
from tiny_models import permissive_settings, tiny_sam

PERMISSIVE = permissive_settings()


@pytest.fixture(scope="module")
def model():
    return tiny_sam()


@pytest.fixture(scope="module")
def stack():
    return nuclei_stack((4, 48, 64), n_nuclei=5, radius=(5.0, 9.0), seed=2)[0]


class EncoderCalls:
    """Counts the image encoder's forward passes while in a `with` block."""

    def __init__(self, model):
        self.model, self.count = model, 0

    def __enter__(self):
        self.handle = self.model.image_encoder.register_forward_pre_hook(lambda *_: self._add())
        return self

    def _add(self):
        self.count += 1

    def __exit__(self, *exc):
        self.handle.remove()


def test_labels_have_the_input_shape_and_objects_span_slices(model, stack):
    labels = segment_everything(stack, model, settings=PERMISSIVE, precision="fp32")
    assert labels.shape == stack.shape and labels.dtype == np.int32
    per_slice = sum(len(np.unique(plane)) - 1 for plane in labels)
    assert 0 < labels.max() < per_slice  # some 3D objects were linked across slices
    image = stack[1]
    assert segment_everything(image, model, settings=PERMISSIVE, precision="fp32").shape == image.shape
    rgb = np.stack([image, image // 2, image // 3], axis=-1)
    labels = segment_everything(rgb, model, rgb=True, settings=PERMISSIVE, precision="fp32")
    assert labels.shape == image.shape


def test_interrupted_run_resumes_without_recomputing_and_gives_the_same_labels(tmp_path, model, stack):
    reference = segment_everything(stack, model, settings=PERMISSIVE, precision="fp32")  # no store at all
    view = StackView.of(stack)
    key = stack_key(view, model_key(model))
    predictor = Predictor(model, precision="fp32")

    store = EmbeddingStore(key, 4, tmp_path / "s.zarr", cache_slices=1)
    job = segment_stack(predictor, view, store, PERMISSIVE)
    with EncoderCalls(model) as first:
        for step in job:
            if step.stage == "slices" and step.done == 2:
                job.close()  # what a cancel button, or Ctrl-C between slices, does
                break
    assert first.count == 2

    with EncoderCalls(model) as second:
        store = EmbeddingStore(key, 4, tmp_path / "s.zarr", cache_slices=1)
        labels = run(segment_stack(predictor, view, store, PERMISSIVE))
    assert second.count == 2  # only the two slices not reached before
    np.testing.assert_array_equal(labels, reference)


def test_embed_stack_streams_to_disk_with_bounded_memory(tmp_path, model, stack):
    view = StackView.of(stack)
    store = EmbeddingStore(stack_key(view, model_key(model)), 4, tmp_path / "s.zarr", cache_slices=1)
    steps = []
    assert run(embed_stack(Predictor(model, "fp32"), view, store), steps.append) == 4
    assert [s.z for s in steps] == [0, 1, 2, 3] and len(store._memory) == 1
    assert store.dtype == "float16" and len(store) == 4
    assert run(embed_stack(Predictor(model, "fp32"), view, store)) == 0


def test_float16_embeddings_keep_the_masks(model):
    image, _ = nuclei_image((48, 64), n_nuclei=5, radius=(5.0, 9.0), seed=2)
    predictor = Predictor(model, precision="fp32")
    full = predictor.embed_rgb(to_rgb_uint8(image))
    points = np.stack(np.meshgrid(np.arange(4, 64, 8), np.arange(4, 48, 8)), axis=-1).reshape(-1, 1, 2)
    masks = []
    for embedding in (full, as_stored(full, "float16")):
        predictor.set_embedding(embedding)
        masks.append(np.array([predictor.predict(p, np.array([1]))[0] for p in points]))
    assert masks[0].any(axis=(2, 3)).all()
    assert (masks[0] != masks[1]).mean() < 1e-3  # a few boundary pixels at most


def test_stores_refuse_a_memory_limit_without_a_folder():
    with pytest.raises(ValueError, match="give a path"):
        EmbeddingStore("k", 3, None, cache_slices=1)


def test_crops_need_the_image(model):
    embedding = as_stored(Predictor(model, "fp32").embed_rgb(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(ValueError, match="pass the image"):
        run(segment_embedding(model, embedding, None, AutoSettings(crop_layers=1)))


def test_crops_run_on_a_real_model(model):
    image, _ = nuclei_image((48, 64), n_nuclei=5, radius=(5.0, 9.0), seed=2)
    settings = dataclasses.replace(PERMISSIVE, crop_layers=1, points_per_side=4)
    with EncoderCalls(model) as calls:
        labels = segment_everything(image, model, settings=settings, precision="fp32")
    assert labels.shape == image.shape and calls.count == 1 + 4  # the whole image, then 2x2 crops


def test_the_number_of_slices_is_told_before_the_first_is_segmented():
    from tiny_models import permissive_settings, tiny_sam

    stack = nuclei_stack((3, 40, 48), n_nuclei=3, radius=(5.0, 8.0), seed=7)[0]
    steps = []
    segment_everything(
        stack, tiny_sam(), settings=permissive_settings(), precision="fp32", on_progress=steps.append
    )
    first = next(step for step in steps if step.stage in ("slices", "masks"))
    assert (first.stage, first.done, first.total) == ("slices", 0, 3)  # a progress bar shows 0/3 at once
    assert [step.done for step in steps if step.stage == "slices"] == [0, 1, 2, 3]


def test_a_predictor_given_for_the_model_is_refused_with_the_fix():
    from tiny_models import tiny_sam

    with pytest.raises(TypeError, match=r"pass predictor.model"):
        segment_everything(np.zeros((32, 32), np.uint8), Predictor(tiny_sam(), precision="fp32"))
