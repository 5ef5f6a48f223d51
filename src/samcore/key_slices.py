"""Objects on their prompted slices: the masks that a prompts file's points and boxes give.

They become the key slices a propagation starts from. The overlap rule is the propagation's: a
mask only fills background pixels, and objects prompted on the same slice share contested pixels
by the higher mask logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .progress import Job, counted_on, run
from .prompts_file import ObjectPrompts
from .propagation_runs import share_by_logit
from .slice_decoder import SlicePrompt, StackDecoder


def segment_key_slices(
    decoder: StackDecoder, objects: Sequence[ObjectPrompts], labels: np.ndarray | None = None
) -> np.ndarray:
    """Segment every object on each slice it has prompts on, one decoder batch per slice.

    Args:
        decoder: The model on the stack; missing embeddings of prompted slices are computed.
        objects: The objects and their prompts (see `samcore.prompts_file`).
        labels: (Z, Y, X) labels to add to (not modified); by default empty labels of the
            smallest unsigned type that holds every id.

    Returns:
        (Z, Y, X) labels with each object's masks on its prompted slices. An object whose
        prompts gave empty masks everywhere is absent.
    """
    return run(segment_key_slices_steps(decoder, objects, labels))


def segment_key_slices_steps(
    decoder: StackDecoder, objects: Sequence[ObjectPrompts], labels: np.ndarray | None = None
) -> Job[np.ndarray]:
    """`segment_key_slices` as a job: it yields `Progress("prompts", done, total, z)`, counting the
    prompted object-slices decoded (a zoomed one embeds a crop: see `StackDecoder.decode_steps`)."""
    if labels is None:
        largest = max((o.object_id for o in objects), default=0)
        labels = np.zeros(decoder.shape, np.uint16 if largest <= np.iinfo(np.uint16).max else np.uint32)
    else:
        labels = np.array(labels, copy=True)
    by_slice: dict[int, list[tuple[int, SlicePrompt]]] = {}
    for entry in objects:
        for prompted in entry.slices:
            by_slice.setdefault(prompted.z, []).append((entry.object_id, prompted.engine_prompt()))
    total, before = sum(len(batch) for batch in by_slice.values()), 0
    for z, batch in sorted(by_slice.items()):
        prompts = [prompt for _, prompt in batch]
        outputs = yield from counted_on(decoder.decode_steps(z, prompts), before, total)
        before += len(batch)
        free = labels[z] == 0
        masks = share_by_logit([(o.logits > 0) & free for o in outputs], [o.logits for o in outputs])
        for (object_id, _), mask in zip(batch, masks):
            labels[z][mask] = object_id
    return labels
