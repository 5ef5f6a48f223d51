"""Cancelling an embedding part-way: between encoder layers, for the cancelling thread only."""

import threading

import numpy as np
import pytest
import torch

from samcore import Predictor, build_sam, propagate
from samcore.cancel import Cancelled, stopping_on
from samcore.embeddings import EmbeddingStore, StackView, embed_slices, model_key, stack_key
from samcore.modeling.int8 import Int8ImageEncoder
from samcore.synthetic import nuclei_image, nuclei_stack
from tiny_models import tiny_sam
from weights import randomize_


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return randomize_(build_sam("vit_test").eval(), seed=0)


@pytest.fixture(scope="module")
def image():
    return nuclei_image((80, 96), n_nuclei=5, seed=1)[0]


class BlockLog:
    """Records the encoder blocks that ran; sets `cancel` when block `at` starts (as a user would)."""

    def __init__(self, encoder, cancel=None, at=None):
        self.ran, self.cancel, self.at = [], cancel, at
        self.handles = [
            block.register_forward_pre_hook(lambda module, args, i=i: self._start(i))
            for i, block in enumerate(encoder.blocks)
        ]

    def _start(self, index):
        self.ran.append(index)
        if index == self.at:
            self.cancel.set()

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("make_model", [lambda: None, tiny_sam], ids=["vit", "micro"])
def test_a_cancelled_embedding_stops_at_the_next_layer_and_keeps_the_current_image(vit, image, make_model):
    model = make_model() or vit
    predictor = Predictor(model, "fp32")
    predictor.set_image(image)
    before = predictor.predict(box=np.array([10, 10, 60, 60]), multimask_output=False)[0]
    cancel = threading.Event()
    log = BlockLog(model.image_encoder, cancel, at=0)  # set while the first block is about to run
    try:
        with pytest.raises(Cancelled):
            predictor.set_image(image[::-1].copy(), cancel=cancel)
    finally:
        log.remove()
    assert log.ran == [0]  # the first block's inner layers checked the event: no second block
    after = predictor.predict(box=np.array([10, 10, 60, 60]), multimask_output=False)[0]
    np.testing.assert_array_equal(after, before)  # still the image set before


def test_an_unset_event_changes_nothing(vit, image):
    plain, cancellable = Predictor(vit, "fp32"), Predictor(vit, "fp32")
    plain.set_image(image)
    cancellable.set_image(image, cancel=threading.Event())
    torch.testing.assert_close(cancellable.get_image_embedding(), plain.get_image_embedding(), rtol=0, atol=0)


def test_another_threads_cancel_does_not_stop_this_one(vit, image):
    """An interactive decode beside a cancelled background job on the same model carries on."""
    theirs = threading.Event()
    inside, go = threading.Event(), threading.Event()
    outcome = []

    def background():
        def pause(module, args):
            if threading.current_thread() is worker:
                inside.set()
                go.wait(30)

        handle = vit.image_encoder.blocks[0].register_forward_pre_hook(pause)
        try:
            Predictor(vit, "fp32").embed(image, cancel=theirs)
            outcome.append("finished")
        except Cancelled:
            outcome.append("cancelled")
        finally:
            handle.remove()

    worker = threading.Thread(target=background)
    worker.start()
    assert inside.wait(30)  # the background embedding is part-way, its event not yet set
    theirs.set()
    mine = Predictor(vit, "fp32").embed(image)  # this thread, no event: runs to its end
    go.set()
    worker.join(30)
    assert outcome == ["cancelled"]
    expected = Predictor(vit, "fp32").embed(image)
    torch.testing.assert_close(mine.features, expected.features, rtol=0, atol=0)


def test_the_int8_encoder_checks_between_blocks(vit, monkeypatch):
    """int8 runs each block's parts, not the blocks as modules, so it checks the event itself."""
    attended = []
    monkeypatch.setattr(type(vit.image_encoder.blocks[0].attn), "attend", lambda self, *args: attended.append(1))
    int8 = Int8ImageEncoder(vit.image_encoder, compiled=False)
    cancel = threading.Event()
    handle = vit.image_encoder.patch_embed.register_forward_hook(lambda *_: cancel.set())
    try:
        with pytest.raises(Cancelled), stopping_on(cancel):
            int8(torch.zeros(1, 3, 256, 256))
    finally:
        handle.remove()
    assert attended == []  # stopped before the first block's attention


def test_embed_slices_stops_within_a_slice_and_stores_only_whole_ones(image):
    model = tiny_sam()
    stack = nuclei_stack((4, 48, 64), n_nuclei=5, radius=(5.0, 9.0), seed=2)[0]
    view = StackView.of(stack)
    predictor = Predictor(model, "fp32", views=1)
    store = EmbeddingStore(stack_key(view, model_key(model), predictor.views), view.n_slices)
    cancel = threading.Event()
    calls = []

    def third_slice_cancels(module, args):
        calls.append(1)
        if len(calls) == 3:
            cancel.set()

    handle = model.image_encoder.register_forward_pre_hook(third_slice_cancels)
    try:
        done = list(embed_slices(predictor, view, store, range(4), cancel))
    finally:
        handle.remove()
    assert done == [0, 1]
    assert sorted(store.missing(range(4))) == [2, 3]


def test_propagation_cancelled_in_an_embedding_keeps_what_it_filled():
    model = tiny_sam()
    stack, truth = nuclei_stack((6, 48, 64), n_nuclei=3, radius=(6.0, 9.0), seed=3)
    labels = np.zeros(truth.shape, np.int32)
    ids = [i for i in np.unique(truth[3]) if i][:1]
    labels[3][truth[3] == ids[0]] = ids[0]
    cancel = threading.Event()
    calls = []

    def second_embedding_cancels(module, args):
        calls.append(1)
        if len(calls) == 3:  # slice 3 (its key slice), one neighbour, then this one is abandoned
            cancel.set()

    predictor = Predictor(model, "fp32", views=1)
    view = StackView.of(stack)
    store = EmbeddingStore(stack_key(view, model_key(model), 1), view.n_slices)
    handle = model.image_encoder.register_forward_pre_hook(second_embedding_cancels)
    try:
        result = propagate(
            predictor, view, labels, store=store, cancel=cancel, mode="points",
            min_iou=0.0, min_score=0.0, min_area=0, min_contrast=0.0,  # a random model's masks go on
        )
    finally:
        handle.remove()
    assert result.cancelled
    assert len(calls) == 3
    assert len(store.missing(range(6))) == 4  # the abandoned embedding was not kept
    np.testing.assert_array_equal(result.labels[3], labels[3])  # the key slice is untouched
    assert labels[[0, 1, 2, 4, 5]].sum() == 0  # the caller's array is not written


def test_a_batch_of_points_stops_within_one_prompt(vit, image, monkeypatch):
    """Segment-all decodes its points in batches of seconds: the decoder checks before each prompt."""
    from samcore.automatic import EmbeddingDecoder
    from samcore.modeling import fast_decoder

    decoder = EmbeddingDecoder(vit, Predictor(vit, "fp32").embed(image))
    points = np.stack(np.meshgrid(np.arange(10, 90, 10), [20, 60]), -1).reshape(-1, 2)
    cancel, decoded, decode_one = threading.Event(), [], fast_decoder.decode_one

    def counted(*args):
        decoded.append(1)
        if len(decoded) == 3:
            cancel.set()  # the user presses Cancel while the third prompt is decoded
        return decode_one(*args)

    monkeypatch.setattr(fast_decoder, "decode_one", counted)
    with pytest.raises(Cancelled), stopping_on(cancel):
        decoder.decode(points)
    assert len(decoded) == 3
    decoded.clear()
    logits, _ = decoder.decode(points)  # outside the block the event is not looked at
    assert len(decoded) == len(points) == len(logits)


def test_a_zoomed_box_in_a_stack_decoder_stops_in_its_crop_embedding(vit):
    """Propagation with zoom embeds a crop per small box: that embedding stops on the decoder's event."""
    from samcore.mask_prompts import prompt_from_mask
    from samcore.slice_decoder import StackDecoder

    stack = nuclei_stack((2, 256, 256), n_nuclei=6, radius=(4.0, 6.0), seed=4)[0]
    cancel = threading.Event()
    decoder = StackDecoder(Predictor(vit, "fp32"), stack, zoom=True, cancel=cancel)
    decoder.embed(0)
    small = np.zeros((256, 256), bool)
    small[100:110, 120:130] = True
    prompt = prompt_from_mask("box", small)
    log = BlockLog(vit.image_encoder, cancel, at=0)  # Cancel pressed as the crop's first block starts
    try:
        with pytest.raises(Cancelled):
            decoder.decode(0, [prompt])
    finally:
        log.remove()
    assert log.ran == [0]  # the slice was embedded already: this is its crop, stopped after one block
    cancel.clear()
    (output,) = decoder.decode(0, [prompt])  # not cancelled: decoded on the crop
    assert output.logits.shape == (256, 256)
