"""Training state on disk (resume) and the exported weight file (use).

The training state holds everything needed to continue a run exactly where it stopped: model,
optimiser and scheduler states, the step, the run's settings and the global torch RNG state.
The export is a plain state dict with the official SAM keys (optionally float16, half the
size), which `samcore.load_model(checkpoint=...)` reads and recognises by its shapes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_NAME = "last.pt"
FORMAT_VERSION = 1


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a training state atomically (a crash mid-write leaves the previous file intact).

    Args:
        path: Destination file.
        state: Tensors, numbers, strings and containers of them (see `training_state`).

    Returns:
        The path written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save({"format_version": FORMAT_VERSION, **state}, partial)
    os.replace(partial, target)
    return target


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state written by `save_state`.

    Raises:
        FileNotFoundError: No file at `path`.
        ValueError: The file is not a training state of this format.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"There is no training checkpoint at {source}.")
    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{source} is not a training checkpoint of format version {FORMAT_VERSION}.")
    return state


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as detached CPU tensors."""
    return {key: value.detach().cpu() for key, value in module.state_dict().items()}


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Collect what `save_state` writes.

    Args:
        model: The model being trained.
        optimizer: Its optimiser.
        scheduler: Its learning-rate scheduler.
        step: Number of completed steps.
        settings: The run's settings (plain values), restored on resume.

    Returns:
        A dict of CPU tensors and plain values.
    """
    return {
        "model": cpu_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": int(step),
        "settings": dict(settings),
        "torch_rng": torch.get_rng_state(),
    }


def export_weights(model: nn.Module, path: str | os.PathLike, half: bool = True) -> Path:
    """Write the model's weights as a plain official-key state dict.

    Args:
        model: A SAM model (`samcore.modeling.Sam`).
        path: Destination file (conventionally ``.pt``).
        half: Store floating-point tensors as float16 (loading casts them back to float32).

    Returns:
        The path written.
    """
    weights = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu()
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        weights[key] = tensor.contiguous()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save(weights, partial)
    os.replace(partial, target)
    return target
