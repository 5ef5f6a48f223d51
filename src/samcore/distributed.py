"""Spread per-slice work over a Dask distributed cluster.

The client sends the model to every worker once, then one task per slice with that slice's image
(never the whole stack), a few tasks per worker thread at a time. Workers write embeddings into the
shared zarr store; the client alone marks slices done, so no two processes write the same file.
Each task runs the same function as the single-machine run (`samcore.jobs.slice_labels`), so the
labels are identical to it when workers use the same device and precision as the client.

Workers need samcore installed and, when a store is used, the store's folder at the same path (a
shared file system); a relative path is made absolute, in the client's working folder, before it is
sent. Point the command line at a cluster with `--scheduler ADDRESS`, or pass a
`dask.distributed.Client` to the Python API.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .automatic import AutoSettings
from .embeddings import EmbeddingStore, StackView, embedding_geometry
from .predictor import Predictor
from .progress import Job, Progress, run

if TYPE_CHECKING:
    from distributed import Client, Future

StoreSpec = tuple[str, int, str, str]  # key, slices, folder, dtype: what a worker needs to open a store


def connect(address: str) -> Client:
    """A Dask client of the scheduler at `address` (e.g. "tcp://10.0.0.5:8786")."""
    try:
        from distributed import Client
    except ImportError as error:
        raise RuntimeError("Running on a cluster needs Dask: pip install 'napari-sam[cluster]'.") from error
    return Client(address)


def embed_on_cluster(
    client: Client, predictor: Predictor, view: StackView, store: EmbeddingStore, slices: list[int]
) -> Job[int]:
    """Embed `slices` of the stack on the cluster's workers into the store's folder.

    Returns:
        The number of slices embedded.
    """
    _check_shared(store)
    _prepare(store, predictor, view)
    model = client.scatter(ModelParcel(predictor.model), broadcast=True, hash=False)
    args = (_settings(predictor), _store_spec(store))

    def submit(z: int) -> Future:
        return client.submit(_embed_task, model, view.rgb_slice(z), z, *args, pure=False)

    results = _stream(client, submit, slices)
    try:
        for done, (z, _) in enumerate(results, start=1):
            store.mark_done(z)
            yield Progress("embedding", done, len(slices), z)
    finally:
        results.close()  # cancels the tasks still queued when the caller stops
    return len(slices)


def segment_on_cluster(
    client: Client,
    predictor: Predictor,
    view: StackView,
    store: EmbeddingStore | None,
    settings: AutoSettings,
    labels: np.ndarray,
    kept: Iterable[int] = (),
) -> Job[None]:
    """Automatic segmentation of every slice on the cluster's workers, into `labels` (Z, Y, X).

    The slices `kept` hold labels of an earlier run already and are left as they are; the others'
    labels go to the store too (`EmbeddingStore.put_labels`), written here by the client.
    """
    if store is not None:
        _check_shared(store)
        _prepare(store, predictor, view)
    model = client.scatter(ModelParcel(predictor.model), broadcast=True, hash=False)
    spec = None if store is None else _store_spec(store)

    def submit(z: int) -> Future:
        return client.submit(
            _segment_task, model, view.rgb_slice(z), z, _settings(predictor), spec, settings, pure=False
        )

    kept = set(kept)
    results = _stream(client, submit, [z for z in range(view.n_slices) if z not in kept])
    try:
        for done, (z, (found, computed)) in enumerate(results, start=len(kept) + 1):
            labels[z] = found
            if store is not None:
                if computed:
                    store.mark_done(z)
                store.put_labels(z, found)
            yield Progress("slices", done, view.n_slices, z)
    finally:
        results.close()


def _stream(
    client: Client, submit: Callable[[int], Future], items: Iterable[int], per_thread: int = 2
) -> Iterator[tuple[int, Any]]:
    """Results of `submit(item)` as they complete, at most `per_thread` tasks per worker thread at a time.

    Tasks still queued are cancelled when the caller stops early.
    """
    from distributed import as_completed

    pending = iter(items)
    running: dict[Future, int] = {}
    queue = as_completed()

    def start(item: int) -> None:
        future = submit(item)
        running[future] = item
        queue.add(future)

    try:
        for item in itertools.islice(pending, max(1, per_thread * sum(client.nthreads().values()))):
            start(item)
        for future in queue:
            item = running.pop(future)
            result = future.result()
            following = next(pending, None)
            if following is not None:
                start(following)
            yield item, result
    finally:
        if running:
            client.cancel(list(running))


def _store_spec(store: EmbeddingStore) -> StoreSpec:
    """The store as a worker opens it: its folder as an absolute path, since workers run in other folders."""
    return store.key, store.n_slices, os.path.abspath(store.path), store.dtype


def _open_spec(spec: StoreSpec | None) -> EmbeddingStore | None:
    if spec is None:
        return None
    key, n_slices, path, dtype = spec
    return EmbeddingStore(key, n_slices, path, dtype=dtype, cache_slices=0, create=False)


def _check_shared(store: EmbeddingStore) -> None:
    if store.path is None:
        raise ValueError("Workers share embeddings through a folder: give the store a path on a shared disk.")


def _prepare(store: EmbeddingStore, predictor: Predictor, view: StackView) -> None:
    """Create the store's arrays before workers write into them."""
    size = tuple(view.data.shape[1:3])
    features_shape, input_size = embedding_geometry(predictor.model, size, predictor.views)
    store.allocate(features_shape, size, input_size)


def _settings(predictor: Predictor) -> dict:
    """What a worker's `Predictor` needs besides the model to compute what the client's would."""
    return {"precision": predictor.precision, "views": predictor.views}


class ModelParcel:
    """A model on its way to the workers, pickled whole (as `torch.save` does).

    Dask's own serializer for a `torch.nn.Module` rebuilds its attributes one by one and turns the
    ordered dicts of its hooks into plain dicts, on which the worker's `Predictor` fails.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model


def _embed_task(parcel: ModelParcel, rgb: np.ndarray, z: int, settings: dict, spec: StoreSpec) -> int:
    """Worker: embed one slice into the shared store, without marking it done."""
    _open_spec(spec).put(z, Predictor(parcel.model, **settings).embed_rgb(rgb), done=False)
    return z


def _segment_task(
    parcel: ModelParcel,
    rgb: np.ndarray,
    z: int,
    predictor_settings: dict,
    spec: StoreSpec | None,
    settings: AutoSettings,
) -> tuple[np.ndarray, bool]:
    """Worker: the labels of one slice, and whether its embedding was computed (not read from the store)."""
    from .jobs import slice_labels

    predictor = Predictor(parcel.model, **predictor_settings)
    return run(slice_labels(predictor, rgb, z, _open_spec(spec), settings, done=False))
