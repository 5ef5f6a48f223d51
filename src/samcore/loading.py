"""Load a ready-to-use SAM model by name, from a file, or the default one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import download, zoo
from .build import ARCHITECTURES
from .checkpoint import load_checkpoint
from .device import select_device
from .modeling.micro_encoder import MicroEncoder


@dataclass(frozen=True)
class ModelStatus:
    """A downloadable model and whether it is already on this computer.

    Attributes:
        entry: The registry entry.
        cached: True if the weight file is in the local cache folder.
        path: Where the weight file is (or would be) stored.
    """

    entry: zoo.ModelEntry
    cached: bool
    path: Path


def load_model(
    name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
) -> nn.Module:
    """Load a SAM model in evaluation mode, ready for prediction.

    * ``checkpoint`` given: the weights come from that file. ``name`` (an
      architecture such as ``"vit_b"`` or a model name such as
      ``"vit_b_lm"``) is checked against the file; without ``name`` the
      architecture is detected from the file. Because you chose the file, a
      training checkpoint that holds more than weights is also opened (which
      can run code stored in it: only use files from sources you trust).
      SAM's architectures decode as segment-anything does. A model of the
      bundled model's kind (``python -m samcore.training``) decodes as the
      bundled model does (refined, mirrored views, zoomed boxes), with the
      segment-all thresholds its calibration wrote beside the file
      (``DIR/micro_v1.json``), else the bundled model's.
    * only ``name``: the named model is taken from the local cache, or
      downloaded and verified first.
    * neither: the default model.

    Args:
        name: A model name (see ``list_models``) or an architecture name.
        checkpoint: A weight file of your own.
        device: ``"auto"`` (GPU if available), ``"cpu"``, ``"cuda"`` or ``"mps"``.

    Returns:
        The model, in eval mode, on the chosen device.

    Raises:
        ValueError: Unknown name or device, no GPU for a GPU request, or a file
            that does not fit (``samcore.checkpoint.CheckpointError`` and
            ``ArchitectureMismatchError`` are ValueErrors).
        FileNotFoundError: ``checkpoint`` does not exist.
        samcore.zoo.ModelNotIncludedError: The model named has no published
            weights (e.g. ``vit_h_lm``).
        samcore.download.WeightsUnavailableError: The weights are not cached and
            cannot be downloaded.
        samcore.download.HashMismatchError: The weights have the wrong hash.
    """
    target = select_device(device)
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, _architecture_for(name), trusted=True, requested_as=name)
        if isinstance(model.image_encoder, MicroEncoder) and zoo.BUNDLED_MODEL is not None:
            entry = zoo.BUNDLED_MODEL
            _decode_as(model, entry, _calibrated_thresholds(Path(checkpoint)) or entry.auto_thresholds)
    else:
        entry = zoo.get_entry(name)
        # The file matched its published hash, so it is the one its authors released.
        model = load_checkpoint(download.fetch(entry), entry.architecture, trusted=True)
        _decode_as(model, entry, entry.auto_thresholds)
    return model.to(target).eval()


class _RegistryBuilder:
    """One entry of `sam_model_registry`: called as segment-anything's builders are."""

    def __init__(self, architecture: str) -> None:
        self.architecture = architecture

    def __call__(self, checkpoint: str | os.PathLike | None = None) -> nn.Module:
        """The model with the weights of `checkpoint` (any layout `load_model` reads), on the CPU and in
        eval mode; without one, randomly initialised weights, as segment-anything gives."""
        if checkpoint is None:
            from .build import build_sam

            return build_sam(self.architecture).eval()
        return load_model(self.architecture, checkpoint, device="cpu")

    def __repr__(self) -> str:
        return f"sam_model_registry builder of {self.architecture!r}"


#: segment-anything's (and MobileSAM's) `sam_model_registry`, for code written for them:
#: ``sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")``. "default" is ViT-H there, as
#: in segment-anything; `load_model()` gives the bundled model.
sam_model_registry = {
    name: _RegistryBuilder("vit_h" if name == "default" else name)
    for name in ("default", "vit_h", "vit_l", "vit_b", "vit_t")
}


def _decode_as(model: nn.Module, entry: zoo.ModelEntry, thresholds: tuple[float, float] | None) -> None:
    """Give `model` the decoding defaults of `entry` and segment-all `thresholds` (None: SAM's)."""
    if thresholds is not None:
        model.auto_defaults = dict(zip(("min_predicted_iou", "min_stability"), thresholds))
    model.refine_masks = entry.refine
    model.views = entry.views
    model.zoom_boxes = entry.zoom
    model.max_enlargement = entry.max_enlargement


def _calibrated_thresholds(checkpoint: Path) -> tuple[float, float] | None:
    """The segment-all thresholds in the training notes beside a weight file, if there are any."""
    notes = checkpoint.with_suffix(".json")
    try:
        values = json.loads(notes.read_text()).get("auto_thresholds")
    except (OSError, ValueError, AttributeError):  # no notes, unreadable, or not an object
        return None
    if isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values):
        return float(values[0]), float(values[1])
    return None


def list_models() -> list[ModelStatus]:
    """List the models that can be loaded by name.

    Returns:
        One status per model, the default model first once it exists.
    """
    return [
        ModelStatus(entry=entry, cached=download.is_cached(entry), path=download.cached_path(entry))
        for entry in zoo.available_entries()
    ]


def _architecture_for(name: str | None) -> str | None:
    """Return the architecture a name implies for a user file, or None to infer it."""
    if name is None or (name == zoo.DEFAULT_MODEL_NAME and zoo.BUNDLED_MODEL is None):
        return None
    if not isinstance(name, str):
        raise TypeError(f"The model name must be text, e.g. 'vit_b', not {type(name).__name__}.")
    if name in ARCHITECTURES:
        return name
    if name in zoo.UNPUBLISHED:
        return zoo.UNPUBLISHED[name]
    if name == zoo.DEFAULT_MODEL_NAME or name in zoo.MODELS:
        return zoo.get_entry(name).architecture
    valid = ", ".join(list(ARCHITECTURES) + [n for n in zoo.model_names() if n not in ARCHITECTURES])
    raise ValueError(f"Unknown model name {name!r}. Valid names: {valid}.")
