"""Per-slice image embeddings of a stack: computed once, kept in memory and optionally on disk.

A store belongs to one stack, one model and one preprocessing. Its key (`stack_key`) is a hash of
all three, so an embedding made for other data or by another model is never used: opening a disk
store with another key raises an error instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .predictor import ImageEmbedding, Predictor
from .preprocess import percentile_range, to_rgb_uint8

FORMAT_VERSION = 1


@dataclass(frozen=True)
class StackView:
    """How a stack is read: (Z, Y, X) or (Z, Y, X, 3 RGB), with one intensity range for all slices.

    Attributes:
        data: The stack; a 2D image is seen as a stack of one slice.
        rgb: The last axis holds RGB channels.
        value_range: Intensities mapped to 0 and 255 (None for uint8 data, used as is).
    """

    data: np.ndarray
    rgb: bool
    value_range: tuple[float, float] | None

    @classmethod
    def of(cls, image: np.ndarray, rgb: bool = False) -> StackView:
        """View a YX / YXC image or a ZYX / ZYXC stack; checks the shape and fixes the contrast."""
        data = np.asarray(image)
        spatial = data.ndim - (1 if rgb else 0)
        if rgb and data.shape[-1] not in (3, 4):
            raise ValueError(f"An RGB image needs 3 or 4 channels last, not shape {data.shape}.")
        if spatial == 2:
            data = data[None]
        elif spatial != 3:
            raise ValueError(
                f"The image has {spatial} spatial dimensions (shape {data.shape}); SAM works on 2D images "
                "and 3D (Z, Y, X) stacks. Select a single time point or channel first."
            )
        value_range = None if data.dtype == np.uint8 else percentile_range(data)
        return cls(data, rgb, value_range)

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[0])

    def rgb_slice(self, z: int) -> np.ndarray:
        """Slice z as SAM's (Y, X, 3) uint8 input."""
        return to_rgb_uint8(np.asarray(self.data[z]), value_range=self.value_range)


def model_key(model: torch.nn.Module) -> str:
    """A short hash of a model's architecture and every weight."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stack_key(view: StackView, model_id: str) -> str:
    """Hash of the stack's pixels, its reading (RGB, contrast) and the model."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"v{FORMAT_VERSION}|{view.data.shape}|{view.data.dtype}|{view.rgb}|{view.value_range}|{model_id}".encode())
    for z in range(view.n_slices):
        digest.update(np.ascontiguousarray(view.data[z]).tobytes())
    return digest.hexdigest()


class EmbeddingStore:
    """Embeddings of the slices of one stack by one model, in memory and optionally in a zarr folder.

    Args:
        key: `stack_key` of the stack and model.
        n_slices: Number of slices Z.
        path: A zarr folder to keep the embeddings in across sessions; created if missing, reused
            if it was made for the same key, refused otherwise.
    """

    def __init__(self, key: str, n_slices: int, path: str | Path | None = None) -> None:
        self.key = key
        self.n_slices = n_slices
        self._memory: dict[int, ImageEmbedding] = {}
        self._group = None if path is None else self._open(Path(path))

    def __contains__(self, z: int) -> bool:
        if z in self._memory:
            return True
        return self._group is not None and bool(self._group["done"][z])

    def __len__(self) -> int:
        return sum(z in self for z in range(self.n_slices))

    def get(self, z: int) -> ImageEmbedding | None:
        """The embedding of slice z, or None if it has not been computed."""
        self._check_index(z)
        if z in self._memory:
            return self._memory[z]
        if self._group is None or not self._group["done"][z]:
            return None
        attrs = self._group.attrs
        features = torch.from_numpy(np.asarray(self._group["features"][z])).float()[None]
        embedding = ImageEmbedding(features, tuple(attrs["original_size"]), tuple(attrs["input_size"]))
        self._memory[z] = embedding
        return embedding

    def put(self, z: int, embedding: ImageEmbedding) -> None:
        """Keep the embedding of slice z (and write it to disk if the store has a folder)."""
        self._check_index(z)
        self._memory[z] = embedding
        if self._group is not None:
            self._write(z, embedding)

    def missing(self, order: Iterable[int]) -> list[int]:
        """The slices of `order` that have no embedding yet, in that order."""
        return [z for z in order if z not in self]

    def _check_index(self, z: int) -> None:
        if not 0 <= z < self.n_slices:
            raise IndexError(f"Slice {z} is outside the stack's {self.n_slices} slices.")

    def _open(self, path: Path):
        import zarr

        if path.exists():
            group = zarr.open_group(str(path), mode="a")
            found = group.attrs.get("key")
            if found != self.key:
                raise ValueError(
                    f"The embedding cache {path} was made for other data or another model "
                    f"(its key {found}, this image and model {self.key}). Choose another folder or delete it."
                )
            return group
        group = zarr.open_group(str(path), mode="w")
        group.attrs.update({"key": self.key, "n_slices": self.n_slices, "format": FORMAT_VERSION})
        group.create_array("done", shape=(self.n_slices,), chunks=(self.n_slices,), dtype="bool", fill_value=False)
        return group

    def _write(self, z: int, embedding: ImageEmbedding) -> None:
        features = embedding.features[0].detach().float().cpu().numpy()
        if "features" not in self._group:
            self._group.attrs.update(
                {"original_size": list(embedding.original_size), "input_size": list(embedding.input_size)}
            )
            self._group.create_array(
                "features", shape=(self.n_slices, *features.shape), chunks=(1, *features.shape), dtype="float32"
            )
        self._group["features"][z] = features
        self._group["done"][z] = True  # written after the features: an interrupted write is recomputed


def nearest_first(center: int, n_slices: int) -> list[int]:
    """Slice indices ordered by distance from `center` (center, center+1, center-1, ...)."""
    return sorted(range(n_slices), key=lambda z: (abs(z - center), z < center))


def embed_slices(
    predictor: Predictor, view: StackView, store: EmbeddingStore, order: Iterable[int]
) -> Iterator[int]:
    """Compute the missing embeddings of `order`, one slice at a time.

    A generator, so callers can show progress and stop between slices.

    Yields:
        Each slice index once its embedding is in the store.
    """
    for z in store.missing(order):
        store.put(z, predictor.embed_rgb(view.rgb_slice(z)))
        yield z
