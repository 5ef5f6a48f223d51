"""Read SAM weight files of the common layouts and build a model from them.

Recognised layouts (all read into one state dict with the official
segment-anything keys ``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``):

* a plain state dict, as in Meta's ``sam_vit_*.pth`` and MobileSAM's
  ``mobile_sam.pt``;
* a micro-sam / torch_em training checkpoint: a dict whose ``model_state``
  holds the weights with keys prefixed ``sam.`` (other entries such as
  ``optimizer_state``, ``decoder_state`` or ``config`` are ignored);
* a dict whose ``state_dict`` or ``model`` entry holds the weights;
* keys wrapped in ``module.`` (DataParallel), ``sam.`` or ``model.`` prefixes.

Files are read with ``torch.load(weights_only=True)``, which cannot run code
hidden in a file. Some training checkpoints also store other Python objects
and cannot be read that way; such files are only opened with full unpickling
when the caller says the file was chosen by the user (``trusted=True``).
Full unpickling can run arbitrary code, so it must only be used for files
from a source you trust.
"""

from __future__ import annotations

import logging
import os
import pickle
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .build import build_sam, infer_architecture

logger = logging.getLogger(__name__)

#: Top-level module names of an official SAM state dict.
SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")

_CONTAINER_KEYS = ("model_state", "state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "sam.", "model.")
_LEGACY_MAGIC = b"\x80\x02"
_ZIP_MAGIC = b"PK"
_SHOWN = 5


class CheckpointError(ValueError):
    """A weight file cannot be used as a SAM model.

    Attributes:
        path: The file concerned.
    """

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)


class ArchitectureMismatchError(CheckpointError):
    """A weight file holds a different architecture than the one requested.

    Attributes:
        path: The file concerned.
        requested: The architecture that was asked for.
        found: The architecture the file holds.
    """

    def __init__(self, message: str, path: str | os.PathLike, requested: str, found: str) -> None:
        super().__init__(message, path)
        self.requested = requested
        self.found = found


def load_checkpoint(
    path: str | os.PathLike,
    architecture: str | None = None,
    *,
    trusted: bool = False,
    requested_as: str | None = None,
) -> nn.Module:
    """Build a SAM model from a weight file, all or nothing.

    A fresh model is built and filled with ``strict=True``; it is returned only
    when every weight was found with the right shape.

    Args:
        path: The weight file.
        architecture: The expected architecture (a key of
            ``samcore.build.ARCHITECTURES``); ``None`` infers it from the weights.
        trusted: The user chose this file and trusts its source. Only then is a
            file that holds more than weights opened with full unpickling,
            which can run code stored in the file.
        requested_as: The name the user gave for ``architecture`` (e.g. a
            model name such as ``"vit_b_lm"``), used in error messages.

    Returns:
        The SAM model (CPU, float32, train mode as built).

    Raises:
        FileNotFoundError: The file does not exist.
        ArchitectureMismatchError: The file holds another architecture.
        CheckpointError: The file is empty, damaged, not a SAM checkpoint, or
            its weights do not fit the architecture.
    """
    state = read_state_dict(path, trusted=trusted)
    arch = resolve_architecture(state, architecture, path, requested_as=requested_as)
    return build_from_state_dict(state, arch, path)


def read_state_dict(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Read a weight file into a state dict with official SAM keys.

    Args:
        path: The weight file.
        trusted: Allow full unpickling for files holding more than weights (see
            the module documentation); only for files the user chose.

    Returns:
        Parameter name to tensor (on the CPU).

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: The file is empty, damaged, or holds no SAM weights.
    """
    raw = load_raw(path, trusted=trusted)
    return normalise_state_dict(raw, path)


def load_raw(path: str | os.PathLike, *, trusted: bool = False) -> Any:
    """Read a PyTorch file as it is, safely unless ``trusted``.

    Args:
        path: The file.
        trusted: Fall back to full unpickling (can run code from the file) when
            the file holds more than tensors and plain containers.

    Returns:
        Whatever the file holds, tensors mapped to the CPU.

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: The file is empty, damaged, not a PyTorch file, or
            needs full unpickling while ``trusted`` is False.
    """
    file = Path(path)
    use_mmap = _check_container(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise _damaged(file, error) from error
        if not trusted:
            raise CheckpointError(
                f"The file {file} holds other Python objects besides model weights, so it was not "
                "opened: such files can run code when read. If you trust its source, load it by "
                "choosing the file yourself, e.g. load_model(checkpoint=...).",
                file,
            ) from error
    except Exception as error:  # torch raises many types for damaged files
        raise _damaged(file, error) from error
    return _load_unrestricted(file, use_mmap)


def normalise_state_dict(raw: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Pick the SAM weights out of a loaded file and give them official keys.

    Args:
        raw: What ``torch.load`` returned.
        path: The file it came from (for messages).

    Returns:
        Parameter name to tensor, with keys like ``image_encoder.pos_embed``.

    Raises:
        CheckpointError: No SAM weights were found.
    """
    weights = _unwrap(raw)
    if not isinstance(weights, Mapping):
        raise CheckpointError(
            f"The file {path} does not hold model weights (it holds a {type(weights).__name__}).", path
        )
    tensors = {str(key): value for key, value in weights.items() if isinstance(value, torch.Tensor)}
    tensors = _strip_wrappers(tensors)
    if not any(key.startswith(SAM_PARTS) for key in tensors):
        raise CheckpointError(
            f"The file {path} is not a Segment Anything checkpoint: none of its "
            f"{len(tensors)} weights belong to a SAM image encoder, prompt encoder or mask "
            f"decoder (first names: {_first(sorted(tensors)) or 'none'}).",
            path,
        )
    return tensors


def resolve_architecture(
    state: Mapping[str, torch.Tensor],
    requested: str | None,
    path: str | os.PathLike,
    *,
    requested_as: str | None = None,
) -> str:
    """Decide which architecture to build for a state dict.

    Args:
        state: Official-key state dict.
        requested: The architecture asked for, or ``None`` to infer it.
        path: The file the weights came from (for messages).
        requested_as: The name the user gave for ``requested`` (for messages).

    Returns:
        The architecture name.

    Raises:
        ArchitectureMismatchError: ``requested`` differs from what the weights hold.
        CheckpointError: Nothing was requested and the weights match no known
            architecture.
    """
    try:
        found: str | None = infer_architecture(state)
        reason = ""
    except ValueError as error:
        found, reason = None, str(error)
    if requested is None:
        if found is None:
            raise CheckpointError(
                f"Could not tell which SAM model the file {path} holds: {reason} "
                "The file may be damaged or for a model this version does not support.",
                path,
            )
        return found
    if found is not None and found != requested:
        asked = requested if requested_as in (None, requested) else f"{requested_as!r} (a {requested} model)"
        raise ArchitectureMismatchError(
            f"The file {path} holds a {found} model, but {asked} was requested. "
            f"Load it with the name {found!r} and this file, or leave the name out to detect it "
            "from the file.",
            path,
            requested=requested,
            found=found,
        )
    return requested


def build_from_state_dict(
    state: Mapping[str, torch.Tensor], architecture: str, path: str | os.PathLike
) -> nn.Module:
    """Build a fresh model and load every weight into it, or fail without returning one.

    Args:
        state: Official-key state dict.
        architecture: The architecture to build.
        path: The file the weights came from (for messages).

    Returns:
        The filled model.

    Raises:
        CheckpointError: Keys are missing or unexpected, or shapes differ.
    """
    model = build_sam(architecture)
    problems = describe_mismatch(state, model.state_dict())
    if problems:
        raise CheckpointError(
            f"The weights in {path} do not fit the {architecture} model: {problems}. "
            "The file may be damaged, or be for a different model.",
            path,
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"The weights in {path} could not be loaded: {error}", path) from error
    return model


def describe_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """Describe how a state dict differs from a model's, in one sentence.

    Args:
        state: The weights read from a file.
        expected: The model's own ``state_dict()``.

    Returns:
        An empty string if names and shapes all agree, else the differences
        (a few examples of each kind).
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing weight(s): {_first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weight(s): {_first(unexpected)}")
    if reshaped:
        parts.append(f"{len(reshaped)} weight(s) with the wrong shape: {_first(reshaped)}")
    return "; ".join(parts)


def _check_container(file: Path) -> bool:
    """Check that ``file`` looks like a complete PyTorch file; return whether it is a zip."""
    if not file.exists():
        raise FileNotFoundError(f"The model file {file} does not exist.")
    if file.is_dir():
        raise CheckpointError(f"{file} is a folder, not a model weight file.", file)
    if file.stat().st_size == 0:
        raise CheckpointError(
            f"The model file {file} is empty (0 bytes), for example after an interrupted download "
            "or copy. Replace it with a complete copy.",
            file,
        )
    with open(file, "rb") as stream:
        head = stream.read(2)
    if zipfile.is_zipfile(file):
        return True
    if head == _ZIP_MAGIC:
        raise CheckpointError(
            f"The model file {file} is incomplete or damaged (its end is missing, as after an "
            "interrupted download or copy). Replace it with a complete copy.",
            file,
        )
    if head != _LEGACY_MAGIC:
        raise CheckpointError(f"The file {file} is not a PyTorch model weight file (or it is damaged).", file)
    return False


def _damaged(file: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"The model file {file} could not be read; it is damaged or incomplete, or not a "
        f"PyTorch weight file ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}).",
        file,
    )


def _load_unrestricted(file: Path, use_mmap: bool) -> Any:
    logger.info("Reading %s with full unpickling, as it holds more than weights.", file)
    try:
        return torch.load(
            file, map_location="cpu", weights_only=False, mmap=use_mmap, pickle_module=_tolerant_pickle
        )
    except Exception as error:  # torch raises many types for damaged files
        raise _damaged(file, error) from error


def _unwrap(raw: Any) -> Any:
    if isinstance(raw, nn.Module):
        return raw.state_dict()
    if isinstance(raw, Mapping) and not any(str(key).startswith(SAM_PARTS) for key in raw):
        for key in _CONTAINER_KEYS:
            inner = raw.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if isinstance(inner, Mapping):
                return inner
    return raw


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for _ in range(len(_WRAPPER_PREFIXES) + 1):
        if any(key.startswith(SAM_PARTS) for key in state):
            return state
        prefix = next((p for p in _WRAPPER_PREFIXES if any(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


class _Unresolved:
    """Stands in for a class from a package that is not installed."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Unresolved:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _TolerantUnpickler(pickle.Unpickler):
    """Unpickler that replaces classes it cannot import by placeholders.

    Training checkpoints may reference classes of the training package (for
    example torch_em's trainer configuration); only the weights are needed.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            logger.info("Skipping %s.%s while reading a checkpoint (not installed).", module, name)
            return type(name, (_Unresolved,), {"__module__": module})


_tolerant_pickle = types.ModuleType("_samcore_tolerant_pickle")
_tolerant_pickle.Unpickler = _TolerantUnpickler  # type: ignore[attr-defined]
_tolerant_pickle.load = lambda file, **kwargs: _TolerantUnpickler(file, **kwargs).load()  # type: ignore[attr-defined]
