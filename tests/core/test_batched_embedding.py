"""Several images through the encoder in one pass (how a GPU embeds a stack), and the fused attention
that GPUs use for the global blocks: the same results as one image, and one query block, at a time."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_sam
from weights import randomize_

from samcore import Predictor, build_sam
from samcore.embeddings import EmbeddingStore, StackView, embed_slices
from samcore.modeling import image_encoder
from samcore.modeling.image_encoder import chunked_attention, grouped_attention, relative_position_bias


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"vit": randomize_(build_sam("vit_test").eval(), seed=0), "micro": tiny_sam()}


def random_rgb(count, height=40, width=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(count)]


def test_grouped_attention_gives_what_one_query_block_at_a_time_gives(monkeypatch):
    torch.manual_seed(0)
    size, heads, width = (40, 36), 3, 8
    q, k, v = (torch.randn(2, heads, size[0] * size[1], width) for _ in range(3))
    rel_h, rel_w = torch.randn(2 * size[0] - 1, width), torch.randn(2 * size[1] - 1, width)
    expected = chunked_attention(q, k, v, rel_h, rel_w, size)
    whole = F.scaled_dot_product_attention(q, k, v, attn_mask=relative_position_bias(q, rel_h, rel_w, size))
    torch.testing.assert_close(expected, whole, rtol=1e-4, atol=1e-5)
    for group in (1, 2, 3):  # heads per fused call: 3 groups, a group and a rest, all at once
        monkeypatch.setattr(image_encoder, "BIAS_VALUES", group * (size[0] * size[1]) ** 2)
        grouped = grouped_attention(q, k, v, rel_h, rel_w, size)
        torch.testing.assert_close(grouped, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vit", "micro"])
def test_images_embedded_together_match_one_at_a_time(models, name):
    predictor = Predictor(models[name], precision="fp32", views=2)
    images = random_rgb(3)
    together = predictor.embed_rgb_batch(images)
    assert len(together) == 3
    for rgb, embedding in zip(images, together):
        alone = predictor.embed_rgb(rgb)
        assert embedding.views == 2
        assert (embedding.original_size, embedding.input_size) == (alone.original_size, alone.input_size)
        torch.testing.assert_close(embedding.features, alone.features, rtol=1e-4, atol=1e-4)
    assert together[0].features.untyped_storage().nbytes() == together[0].features.nbytes  # not the batch's


def test_images_of_different_sizes_are_not_embedded_together(models):
    predictor = Predictor(models["vit"], precision="fp32")
    with pytest.raises(ValueError, match="one size"):
        predictor.embed_rgb_batch([*random_rgb(1), *random_rgb(1, height=41)])
    assert predictor.embed_rgb_batch([]) == []


@pytest.mark.parametrize("batch", [0, -2, 1.5, True, "4"])
def test_embed_batch_is_a_count_of_images(models, batch):
    with pytest.raises(ValueError, match="embed_batch is a number of images"):
        Predictor(models["vit"], precision="fp32", embed_batch=batch)


def test_a_cpu_embeds_one_slice_a_pass_unless_told(models):
    assert Predictor(models["vit"], precision="fp32").embed_batch == 1
    assert Predictor(models["vit"], precision="fp32", embed_batch=3).embed_batch == 3


def test_a_stack_embedded_in_batches_stores_what_one_at_a_time_stores(models):
    stack = np.random.default_rng(1).integers(0, 3000, size=(5, 40, 50)).astype(np.uint16)
    view = StackView.of(stack)
    order = [2, 3, 1, 4, 0]
    single = EmbeddingStore("key", 5)
    assert list(embed_slices(Predictor(models["vit"], precision="fp32"), view, single, order)) == order
    batched = EmbeddingStore("key", 5)
    predictor = Predictor(models["vit"], precision="fp32", embed_batch=2)
    seen = []
    for z in embed_slices(predictor, view, batched, order):
        seen.append(z)
        # A pass stores all its slices before the first is reported.
        assert all(done in batched for done in order[: 2 * ((len(seen) + 1) // 2)])
    assert seen == order
    for z in order:
        torch.testing.assert_close(batched.get(z).features, single.get(z).features, rtol=1e-4, atol=1e-4)


def test_a_cancelled_pass_stores_none_of_its_slices(models):
    view = StackView.of(np.random.default_rng(2).integers(0, 255, size=(4, 40, 50)).astype(np.uint8))
    store = EmbeddingStore("key", 4)
    cancel = threading.Event()
    cancel.set()
    predictor = Predictor(models["vit"], precision="fp32", embed_batch=4)
    assert list(embed_slices(predictor, view, store, range(4), cancel)) == []
    assert store.missing(range(4)) == [0, 1, 2, 3]


def test_a_pass_that_runs_out_of_memory_is_tried_again_with_half_as_many_slices(models, monkeypatch):
    view = StackView.of(np.random.default_rng(3).integers(0, 255, size=(5, 40, 50)).astype(np.uint8))
    embed_rgb_batch = Predictor.embed_rgb_batch
    passes = []

    def short_of_memory(self, images, cancel=None, crop=False):  # as a GPU with room for two slices
        passes.append(len(images))
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return embed_rgb_batch(self, images, cancel, crop)

    monkeypatch.setattr(Predictor, "embed_rgb_batch", short_of_memory)
    predictor = Predictor(models["vit"], precision="fp32", embed_batch=8)
    store = EmbeddingStore("key", 5)
    assert list(embed_slices(predictor, view, store, range(5))) == [0, 1, 2, 3, 4]
    assert passes == [5, 2, 2, 1] and predictor.embed_batch == 2  # all five, then two a pass
    assert store.missing(range(5)) == []
    one_a_pass = Predictor(models["vit"], precision="fp32", embed_batch=1)

    def no_memory(self, images, cancel=None, crop=False):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(Predictor, "embed_rgb_batch", no_memory)
    with pytest.raises(torch.OutOfMemoryError):  # one slice that does not fit: the error is the user's to see
        list(embed_slices(one_a_pass, view, EmbeddingStore("key", 5), range(5)))
