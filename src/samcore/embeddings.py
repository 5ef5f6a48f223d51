"""Per-slice image embeddings of a stack: computed once, kept in memory and optionally on disk.

A store belongs to one stack, one model and one preprocessing. Its key (`stack_key`) is a hash of
all three, so an embedding made for other data or by another model is never used: opening a disk
store with another key raises an error instead.

Embeddings are kept in float16 by default, on disk and in memory alike, so that an embedding read
back from disk is the one that was used when it was computed (masks from float16 and float32
embeddings agree to within a few boundary pixels: tests/core/test_embeddings.py and
benchmarks/bench_automatic.py measure it). A disk store can hold only the last few slices in memory
(`cache_slices`), so a whole stack of embeddings is never in RAM.
"""

from __future__ import annotations

import hashlib
import math
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cancel import Cancelled
from .predictor import ImageEmbedding, Predictor
from .preprocess import MAX_PERCENTILE_PIXELS, percentile_range, to_rgb_uint8
from .transforms import model_input_size

FORMAT_VERSION = 2  # 2: each slice holds (V, C, h, w), its mirrored views (`Predictor.views`)
STORE_DTYPES = ("float16", "float32")
MAX_CHANNELS = 8  # see `channels_last`


def guess_rgb_shape(shape: tuple[int, ...]) -> bool:
    """`guess_rgb` from an image's shape alone."""
    return len(shape) >= 3 and shape[-1] in (3, 4)


def channels_last(shape: tuple[int, ...]) -> bool:
    """Whether a 3-axis image that napari would show as a stack (Z, Y, X) is rather one image with its
    channels last (Y, X, C): a last axis of at most `MAX_CHANNELS` entries that is not RGB(A), and two
    longer ones. Its "slices" would be a few pixels wide."""
    return len(shape) == 3 and shape[-1] <= MAX_CHANNELS < min(shape[:2]) and not guess_rgb_shape(shape)



@dataclass(frozen=True)
class StackView:
    """How a stack is read: (Z, Y, X) or (Z, Y, X, 3 RGB), with one intensity range for all slices.

    Attributes:
        data: The stack; a 2D image is seen as a stack of one slice. A lazy stack (a dask or zarr
            array) stays lazy: each slice is read when it is used, so a stack larger than memory
            is never loaded whole.
        rgb: The last axis holds RGB channels.
        value_range: Intensities mapped to 0 and 255 (None for uint8 data, used as is).
    """

    data: np.ndarray
    rgb: bool
    value_range: tuple[float, float] | None

    @classmethod
    def of(cls, image: np.ndarray, rgb: bool = False) -> StackView:
        """View a YX / YXC image or a ZYX / ZYXC stack; checks the shape and fixes the contrast."""
        lazy = is_lazy(image) and len(image.shape) - (1 if rgb else 0) == 3
        data = image if lazy else np.asarray(image)  # a 2D image is read whole for its one embedding
        spatial = data.ndim - (1 if rgb else 0)
        if rgb and data.shape[-1] not in (3, 4):
            raise ValueError(f"An RGB image needs 3 or 4 channels last, not shape {data.shape}.")
        if not rgb and data.ndim == 3 and data.shape[-1] <= MAX_CHANNELS < min(data.shape[:2]):
            raise ValueError(
                f"The image has shape {data.shape}: its last axis is {data.shape[-1]} long, so it looks like "
                "one image with its channels last (Y, X, C), not a (Z, Y, X) stack of slices that thin. For "
                "an RGB image pass rgb=True; otherwise pick one channel."
            )
        if spatial == 2:
            data = data[None]
        elif spatial != 3:
            raise ValueError(
                f"The image has {spatial} spatial dimensions (shape {data.shape}); SAM works on 2D images "
                "and 3D (Z, Y, X) stacks. Select a single time point or channel first."
            )
        value_range = None if data.dtype == np.uint8 else percentile_range(contrast_sample(data))
        return cls(data, rgb, value_range)

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[0])

    def rgb_slice(self, z: int) -> np.ndarray:
        """Slice z as SAM's (Y, X, 3) uint8 input."""
        return to_rgb_uint8(np.asarray(self.data[z]), value_range=self.value_range)

    def fingerprint(self, z: int) -> int | None:
        """A checksum of slice z's pixels, to notice data edited in place after it was embedded.

        None for a lazy stack: a dask array cannot be edited in place, and reading a slice of a
        zarr array from disk before each use would cost more than the check is worth.
        """
        return None if is_lazy(self.data) else slice_fingerprint(self.data[z])


def is_lazy(image) -> bool:
    """Whether `image` is an array read on demand (dask, zarr, ...) rather than one in memory."""
    return not isinstance(image, np.ndarray) and all(
        hasattr(image, name) for name in ("shape", "dtype", "ndim", "__getitem__")
    )


def slice_fingerprint(pixels: np.ndarray) -> int:
    """CRC-32 of an array's bytes: about 2 GB/s, so an 8 MB slice costs a few milliseconds."""
    return zlib.crc32(np.ascontiguousarray(pixels).data)


def contrast_sample(stack: np.ndarray) -> np.ndarray:
    """The (Z, Y, X[, C]) stack, or a regular grid of at most `MAX_PERCENTILE_PIXELS` of its voxels.

    The grid takes every n-th slice, row and column (the smallest n that is enough), so the intensity
    range of a long stack is found without a float64 copy of it (8 bytes per voxel).
    """
    step = 1
    while math.prod(math.ceil(n / step) for n in stack.shape[:3]) > MAX_PERCENTILE_PIXELS:
        step += 1
    if step == 1 and isinstance(stack, np.ndarray):
        return stack
    return np.asarray(stack[::step, ::step, ::step])  # of a lazy stack, the slices read by indexing


def model_key(model: torch.nn.Module) -> str:
    """A short hash of a model's architecture, every weight and how it pads its input."""
    digest = hashlib.blake2b(digest_size=16)
    padding = getattr(model, "padding", "zeros")
    if padding != "zeros":  # SAM's padding leaves the keys of stores made before there was a choice
        digest.update(f"padding={padding}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        # reshape: a 0-d tensor (BatchNorm's counter in TinyViT) cannot be viewed as bytes.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stack_key(view: StackView, model_id: str, views: int = 1) -> str:
    """Hash of the stack's pixels, its reading (RGB, contrast), the model and the number of views."""
    digest = hashlib.blake2b(digest_size=16)
    reading = f"{view.data.shape}|{view.data.dtype}|{view.rgb}|{view.value_range}"
    digest.update(f"v{FORMAT_VERSION}|{reading}|{model_id}|views={views}".encode())
    for z in range(view.n_slices):
        digest.update(np.ascontiguousarray(view.data[z]).tobytes())
    return digest.hexdigest()


def as_stored(embedding: ImageEmbedding, dtype: str = "float16") -> ImageEmbedding:
    """The embedding as a store of `dtype` keeps it: values rounded to `dtype`, held in float32."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"Embeddings are stored as {' or '.join(STORE_DTYPES)}, not {dtype!r}.")
    features = embedding.features.detach()
    if dtype == "float16":
        features = features.to(torch.float16)
    return ImageEmbedding(features.float(), embedding.original_size, embedding.input_size)


# Characters that some file system does not allow in a file name.
UNSAFE_IN_NAMES = frozenset('/\\<>:"|?*')


def store_path(folder: str | Path, name: str, key: str) -> Path:
    """The store of the stack `name` (a layer's name, a file's stem) in `folder`, as the widget and
    `napari-sam embed` name it.

    Characters a file name cannot hold on some system (path separators, ``<>:"|?*``, control
    characters) become ``_``, so a layer named "exp1/cell A" is stored in `folder` itself.
    """
    return Path(folder) / f"{safe_file_name(name)}-{key[:12]}.zarr"


def safe_file_name(name: str) -> str:
    """`name` with every character that some file system refuses in a file name replaced by ``_``."""
    return "".join("_" if ch in UNSAFE_IN_NAMES or ord(ch) < 32 else ch for ch in name).strip(" .") or "_"


class EmbeddingStore:
    """Embeddings of the slices of one stack by one model, in memory and optionally in a zarr folder.

    Args:
        key: `stack_key` of the stack and model.
        n_slices: Number of slices Z.
        path: A zarr folder to keep the embeddings in across sessions; created if missing, reused
            if it was made for the same key, refused otherwise.
        dtype: "float16" (default) or "float32": the precision embeddings are kept in. An existing
            folder keeps the precision it was made with.
        cache_slices: With a folder, how many slices to keep in memory as well (the most recently
            used); None keeps every slice.
        create: Create the folder if it is missing; False raises FileNotFoundError instead (a Dask
            worker that does not see the client's folder must not start a store of its own).
    """

    def __init__(
        self,
        key: str,
        n_slices: int,
        path: str | Path | None = None,
        dtype: str = "float16",
        cache_slices: int | None = None,
        create: bool = True,
    ) -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"Embeddings are stored as {' or '.join(STORE_DTYPES)}, not {dtype!r}.")
        if cache_slices is not None and (path is None or cache_slices < 0):
            raise ValueError("cache_slices bounds the memory of a store with a folder: give a path and 0 or more.")
        self.key = key
        self.n_slices = n_slices
        self.path = None if path is None else Path(path)
        self.cache_slices = cache_slices
        self._memory: OrderedDict[int, ImageEmbedding] = OrderedDict()
        self._group = None if path is None else self._open(Path(path), create)
        on_disk = self._group is not None and "features" in self._group
        self.dtype = str(self._group["features"].dtype) if on_disk else dtype

    def __contains__(self, z: int) -> bool:
        if z in self._memory:
            return True
        return self._group is not None and bool(self._group["done"][z])

    @property
    def memory_bytes(self) -> int:
        """Bytes of the embeddings held in memory."""
        return sum(embedding.features.nbytes for embedding in self._memory.values())

    def __len__(self) -> int:
        if self._group is None:
            return len(self._memory)
        return int(np.count_nonzero(self._group["done"][:]))

    def get(self, z: int) -> ImageEmbedding | None:
        """The embedding of slice z, or None if it has not been computed."""
        self._check_index(z)
        if z in self._memory:
            self._memory.move_to_end(z)
            return self._memory[z]
        if self._group is None or not self._group["done"][z]:
            return None
        attrs = self._group.attrs
        features = torch.from_numpy(np.asarray(self._group["features"][z])).float()  # (V, C, h, w)
        embedding = ImageEmbedding(features, tuple(attrs["original_size"]), tuple(attrs["input_size"]))
        return self._remember(z, embedding)

    def put(self, z: int, embedding: ImageEmbedding, done: bool = True) -> ImageEmbedding:
        """Keep the embedding of slice z (and write it to disk if the store has a folder).

        Args:
            z: Slice index.
            embedding: The embedding, of any precision.
            done: Mark the slice complete on disk. Dask workers write features only (done=False)
                and the client marks them (`mark_done`), so that one writer owns the flags.

        Returns:
            The embedding as stored (see `as_stored`).
        """
        self._check_index(z)
        stored = as_stored(embedding, self.dtype)
        if self._group is not None:
            self._write(z, stored, done)
        return self._remember(z, stored)

    def mark_done(self, z: int) -> None:
        """Record that slice z's features on disk are complete."""
        self._check_index(z)
        if self._group is not None:
            self._group["done"][z] = True

    def allocate(
        self, features_shape: tuple[int, ...], original_size: tuple[int, int], input_size: tuple[int, int]
    ) -> None:
        """Create the on-disk features array (done once, before several writers share the folder)."""
        if self._group is None or "features" in self._group:
            return
        self._group.attrs.update({"original_size": list(original_size), "input_size": list(input_size)})
        self._group.create_array(
            "features", shape=(self.n_slices, *features_shape), chunks=(1, *features_shape), dtype=self.dtype
        )

    def missing(self, order: Iterable[int]) -> list[int]:
        """The slices of `order` that have no embedding yet, in that order."""
        done = None if self._group is None else self._group["done"][:]
        return [z for z in order if z not in self._memory and (done is None or not done[z])]

    # -- automatic segmentation's slice labels, kept beside the embeddings ----------------------

    def use_labels(self, settings_key: str, shape: tuple[int, int]) -> int:
        """Keep the labels that automatic segmentation finds on each slice, made with `settings_key`.

        Only a store with a folder keeps them; labels made with other settings (or none yet) are
        cleared here, so a run with new settings segments every slice again.

        Args:
            settings_key: What decides the labels besides the data and the model: the segmentation
                settings and the encoder's precision.
            shape: (Y, X) of a slice.

        Returns:
            How many slices have labels already.
        """
        group = self._group
        if group is None:
            return 0
        if group.attrs.get("labels_settings") == settings_key and "labels" in group:
            return int(np.count_nonzero(group["labels_done"][:]))
        group.attrs["labels_settings"] = None  # while the arrays are made anew: no half-made set is taken
        group.create_array(
            "labels_done", shape=(self.n_slices,), chunks=(self.n_slices,), dtype="bool", fill_value=False,
            overwrite=True,
        )
        group.create_array(
            "labels", shape=(self.n_slices, *shape), chunks=(1, *shape), dtype="int32", fill_value=0,
            overwrite=True,
        )
        group.attrs["labels_settings"] = settings_key
        return 0

    def get_labels(self, z: int) -> np.ndarray | None:
        """Slice z's labels kept by `use_labels`'s run, or None."""
        self._check_index(z)
        group = self._group
        if group is None or group.attrs.get("labels_settings") is None or "labels_done" not in group:
            return None
        return np.asarray(group["labels"][z]) if group["labels_done"][z] else None

    def put_labels(self, z: int, labels: np.ndarray) -> None:
        """Keep slice z's labels (after `use_labels`; without a folder, nothing is kept)."""
        self._check_index(z)
        group = self._group
        if group is None or group.attrs.get("labels_settings") is None or "labels" not in group:
            return
        group["labels"][z] = labels
        group["labels_done"][z] = True  # after the labels: an interrupted write is segmented again

    def _remember(self, z: int, embedding: ImageEmbedding) -> ImageEmbedding:
        self._memory[z] = embedding
        self._memory.move_to_end(z)
        while self.cache_slices is not None and len(self._memory) > self.cache_slices:
            self._memory.popitem(last=False)
        return embedding

    def _check_index(self, z: int) -> None:
        if not 0 <= z < self.n_slices:
            raise IndexError(f"Slice {z} is outside the stack's {self.n_slices} slices.")

    def _open(self, path: Path, create: bool):
        import zarr

        if not path.exists() and not create:
            raise FileNotFoundError(
                f"The embedding store {path} is not here: on a cluster, put it on a disk every worker shares."
            )
        empty = path.is_dir() and not any(path.iterdir())  # made for the store (mkdir): a new one
        if path.exists() and not (create and empty):
            try:
                group = zarr.open_group(str(path), mode="r+")
            except (ValueError, OSError) as error:  # nothing is written into a folder that is no store
                raise ValueError(f"{path} is not an embedding store; choose another folder.") from error
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

    def _write(self, z: int, embedding: ImageEmbedding, done: bool) -> None:
        features = embedding.features.detach().cpu().numpy()
        self.allocate(features.shape, embedding.original_size, embedding.input_size)
        self._group["features"][z] = features.astype(self.dtype)
        if done:  # written after the features: an interrupted write is recomputed
            self._group["done"][z] = True


def embedding_geometry(
    model: torch.nn.Module, original_size: tuple[int, int], views: int = 1
) -> tuple[tuple[int, ...], tuple[int, int]]:
    """The (V, C, h, w) features shape of `views` views, and the model-input (h', w'), of an image of
    `original_size` (H, W)."""
    features = (views, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size)
    return features, model_input_size(model, original_size)


def nearest_first(center: int, n_slices: int) -> list[int]:
    """Slice indices ordered by distance from `center` (center, center+1, center-1, ...)."""
    return sorted(range(n_slices), key=lambda z: (abs(z - center), z < center))


def embed_slices(
    predictor: Predictor,
    view: StackView,
    store: EmbeddingStore,
    order: Iterable[int],
    cancel: threading.Event | None = None,
) -> Iterator[int]:
    """Compute the missing embeddings of `order`, `predictor.embed_batch` slices an encoder pass (one
    on a CPU, several on a GPU). A pass that runs out of memory is tried again with half as many slices,
    and `predictor.embed_batch` keeps the smaller number.

    A generator, so callers can show progress and stop between passes.

    Args:
        cancel: Set it from another thread to stop within the pass in progress (whose embeddings
            are dropped) instead of after it.

    Yields:
        Each slice index once its embedding is in the store.
    """
    missing = store.missing(order)
    start = 0
    while start < len(missing):
        group = missing[start : start + predictor.embed_batch]
        try:
            embeddings = predictor.embed_rgb_batch([view.rgb_slice(z) for z in group], cancel)
        except Cancelled:
            return
        except torch.OutOfMemoryError:
            if len(group) == 1:
                raise
            # A GPU short of memory for this many slices a pass: half as many, from now on.
            if predictor.device.type == "cuda":
                torch.cuda.empty_cache()
            predictor.embed_batch = max(1, len(group) // 2)
            continue
        for z, embedding in zip(group, embeddings):  # all stored before the caller hears of one
            store.put(z, embedding)
        start += len(group)
        yield from group
