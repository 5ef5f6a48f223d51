"""Objects on their prompted slices: the masks that a prompts file's points and boxes give.

They become the key slices a propagation starts from. The overlap rule is the propagation's: a
mask only fills background pixels, and objects prompted on the same slice share contested pixels
by the higher mask logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .prompts_file import ObjectPrompts
from .propagation_runs import share_by_logit
from .slice_decoder import SliceDecoder, SlicePrompt


def segment_key_slices(
    decoder: SliceDecoder, objects: Sequence[ObjectPrompts], labels: np.ndarray | None = None
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
    if labels is None:
        largest = max((o.object_id for o in objects), default=0)
        labels = np.zeros(decoder.shape, np.uint16 if largest <= np.iinfo(np.uint16).max else np.uint32)
    else:
        labels = np.array(labels, copy=True)
    by_slice: dict[int, list[tuple[int, SlicePrompt]]] = {}
    for entry in objects:
        for prompted in entry.slices:
            by_slice.setdefault(prompted.z, []).append((entry.object_id, prompted.engine_prompt()))
    for z, batch in sorted(by_slice.items()):
        outputs = decoder.decode(z, [prompt for _, prompt in batch])
        free = labels[z] == 0
        masks = share_by_logit([(o.logits > 0) & free for o in outputs], [o.logits for o in outputs])
        for (object_id, _), mask in zip(batch, masks):
            labels[z][mask] = object_id
    return labels
