"""Whole-stack jobs: embed every slice into a store; segment every slice automatically and link them.

Each is a job (`samcore.progress`): the napari plugin runs it in a thread with a progress bar and a
cancel button, and `samcore.progress.run` drives it in scripts. With a Dask `client`, slices are
spread over the cluster's workers (`samcore.distributed`), with the same result.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .automatic import AutoSettings, segment_embedding
from .embeddings import EmbeddingStore, StackView, as_stored, embed_slices, model_key, stack_key
from .linking import link_slices
from .predictor import ImageEmbedding, Predictor
from .progress import Job, Progress, restepped, run

if TYPE_CHECKING:
    from distributed import Client


def embed_stack(
    predictor: Predictor,
    view: StackView,
    store: EmbeddingStore,
    order: Iterable[int] | None = None,
    client: Client | None = None,
    cancel: threading.Event | None = None,
) -> Job[int]:
    """Compute the embeddings the store lacks, one step per slice.

    Args:
        predictor: Holds the model and precision.
        view: The stack.
        store: Where embeddings go; slices already there are not recomputed.
        order: Slices to embed, in this order (default: all, first to last).
        client: A `dask.distributed.Client` to embed on its workers (the store needs a shared folder).
        cancel: Set it from another thread to stop within the slice being embedded (on this
            machine; on a cluster, stop by closing the job).

    Returns:
        The number of slices computed.
    """
    missing = store.missing(range(view.n_slices) if order is None else order)
    if client is not None:
        from .distributed import embed_on_cluster

        return (yield from embed_on_cluster(client, predictor, view, store, missing))
    done = 0
    for done, z in enumerate(embed_slices(predictor, view, store, missing, cancel), start=1):
        yield Progress("embedding", done, len(missing), z)
    return done


def slice_embedding(
    predictor: Predictor,
    rgb: np.ndarray,
    z: int,
    store: EmbeddingStore | None = None,
    done: bool = True,
    cancel: threading.Event | None = None,
) -> tuple[ImageEmbedding, bool]:
    """Slice z's embedding from the store, or computed (and stored) if missing.

    Returns:
        The embedding as stored (float16 values by default, with or without a store), and whether
        it was computed.

    Raises:
        samcore.cancel.Cancelled: `cancel` was set while the embedding was computed.
    """
    embedding = None if store is None else store.get(z)
    if embedding is not None:
        return embedding, False
    computed = predictor.embed_rgb(rgb, cancel)
    return (as_stored(computed) if store is None else store.put(z, computed, done=done)), True


def slice_labels(
    predictor: Predictor,
    rgb: np.ndarray,
    z: int,
    store: EmbeddingStore | None,
    settings: AutoSettings,
    done: bool = True,
    cancel: threading.Event | None = None,
) -> Job[tuple[np.ndarray, bool]]:
    """Automatic segmentation of slice z (its (Y, X, 3) uint8 image `rgb`), embedding it if needed.

    Returns:
        (Y, X) int32 labels and whether the embedding was computed.

    Raises:
        samcore.cancel.Cancelled: `cancel` was set while the slice was embedded.
    """
    embedding, computed = slice_embedding(predictor, rgb, z, store, done, cancel)
    job = segment_embedding(predictor.model, embedding, rgb, settings, predictor.precision)
    labels = yield from restepped(job, lambda step: dataclasses.replace(step, z=z))  # steps of slice z
    return labels, computed


def segment_stack(
    predictor: Predictor,
    view: StackView,
    store: EmbeddingStore | None = None,
    settings: AutoSettings | None = None,
    link_overlap: float = 0.5,
    client: Client | None = None,
) -> Job[np.ndarray]:
    """Automatic segmentation of every slice, linked into 3D objects (`samcore.linking`).

    Args:
        predictor: Holds the model and precision.
        view: The stack.
        store: Embeddings already computed are used, missing ones are computed and kept there. A
            store with a folder keeps each slice's labels too (`EmbeddingStore.use_labels`): slices
            segmented before with the same settings and precision are not segmented again.
        settings: Automatic segmentation parameters.
        link_overlap: Least fraction of the smaller of two objects on adjacent slices that their
            overlap must cover for them to be one 3D object (see `samcore.linking`).
        client: A `dask.distributed.Client` to segment slices on its workers.

    Returns:
        (Z, Y, X) int32 instance labels.
    """
    settings = (settings or AutoSettings()).resolved(predictor.model)
    labels = np.zeros(view.data.shape[:3], np.int32)
    kept = []  # slices segmented by an earlier run with these settings (a store with a folder keeps them)
    if store is not None:
        store.use_labels(labels_key(settings, predictor.precision), labels.shape[1:])
        for z in range(view.n_slices):
            found = store.get_labels(z)
            if found is not None:
                labels[z] = found
                kept.append(z)
    if client is not None:
        from .distributed import segment_on_cluster

        yield from segment_on_cluster(client, predictor, view, store, settings, labels, kept)
    else:
        yield Progress("slices", len(kept), view.n_slices, 0)  # the total, for a progress bar, at once
        done = len(kept)
        for z in sorted(set(range(view.n_slices)) - set(kept)):
            labels[z], _ = yield from slice_labels(predictor, view.rgb_slice(z), z, store, settings)
            if store is not None:
                store.put_labels(z, labels[z])
            done += 1
            yield Progress("slices", done, view.n_slices, z)
    if view.n_slices == 1:
        return labels
    yield Progress("linking", 0, 1)
    linked = link_slices(labels, link_overlap)
    yield Progress("linking", 1, 1)
    return linked


def labels_key(settings: AutoSettings, precision: str) -> str:
    """What decides automatic segmentation's labels of a slice besides its data and the model (the store's
    key): the settings, resolved, and the encoder's precision."""
    return json.dumps({"settings": dataclasses.asdict(settings), "precision": precision}, sort_keys=True)


def segment_everything(
    image: np.ndarray,
    model: torch.nn.Module,
    rgb: bool = False,
    settings: AutoSettings | None = None,
    store: str | Path | None = None,
    client: Client | None = None,
    precision: str = "auto",
    link_overlap: float = 0.5,
    on_progress: Callable[[Progress], None] | None = None,
) -> np.ndarray:
    """Automatic segmentation of a 2D image or a 3D stack, start to end.

    Args:
        image: (Y, X), (Y, X, C) RGB, (Z, Y, X) or (Z, Y, X, C) RGB; any numeric dtype.
        model: A SAM model.
        rgb: The last axis holds RGB channels.
        settings: Automatic segmentation parameters.
        store: A zarr folder for the embeddings and each slice's labels: an interrupted run resumes
            from it, a store of other data or another model is refused.
        client: A `dask.distributed.Client` to work on its workers (with a store on a shared disk).
        precision: Encoder precision.
        link_overlap: Least fraction of the smaller of two objects on adjacent slices that their
            overlap must cover for them to be one 3D object (see `samcore.linking`).
        on_progress: Called with each `Progress` step.

    Returns:
        Instance labels with the image's spatial shape ((Y, X) or (Z, Y, X)), int32.
    """
    if isinstance(model, Predictor):
        raise TypeError("segment_everything takes the model, not a Predictor: pass predictor.model.")
    view = StackView.of(image, rgb=rgb)
    predictor = Predictor(model, precision=precision)
    disk = None
    if store is not None:
        key = stack_key(view, model_key(model), predictor.views)
        disk = EmbeddingStore(key, view.n_slices, store, cache_slices=2)
    labels = run(segment_stack(predictor, view, disk, settings, link_overlap, client), on_progress)
    return labels[0] if np.ndim(image) - int(rgb) == 2 else labels
