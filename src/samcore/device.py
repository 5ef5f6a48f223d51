"""Choose the torch device a model runs on."""

from __future__ import annotations

import torch

_VALID = "'auto', 'cpu', 'cuda' (or 'cuda:0', 'cuda:1', ...) or 'mps'"


def select_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device request into a usable ``torch.device``.

    ``"auto"`` picks an NVIDIA GPU (CUDA) if there is one, else an Apple GPU
    (MPS), else the CPU. An explicit GPU request is checked, so a missing GPU
    is reported here rather than as an obscure error later.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a
            ``torch.device``.

    Returns:
        The device to use.

    Raises:
        ValueError: The device is unknown, or the requested GPU is not available.
        TypeError: ``device`` is neither text nor a ``torch.device``.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return _best_available()
    requested = _parse(device)
    if requested.type == "cuda":
        _check_cuda(requested)
    elif requested.type == "mps":
        _check_mps()
    elif requested.type != "cpu":
        raise ValueError(f"Unsupported device {str(device)!r}. Use {_VALID}.")
    return requested


def mps_available() -> bool:
    """Return whether an Apple GPU (MPS) can be used.

    Returns:
        True if PyTorch was built with MPS support and the GPU is present.
    """
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _best_available() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _parse(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be text such as 'cpu' or a torch.device, not {type(device).__name__}.")
    try:
        return torch.device(device.strip().lower())
    except RuntimeError as error:
        raise ValueError(f"Unknown device {device!r}. Use {_VALID}.") from error


def _check_cuda(requested: torch.device) -> None:
    if not torch.cuda.is_available():
        raise ValueError(
            "No NVIDIA GPU (CUDA) was found on this computer, so device='cuda' cannot be used. "
            "Use device='cpu', or device='auto' to pick the best available device."
        )
    count = torch.cuda.device_count()
    if requested.index is not None and requested.index >= count:
        raise ValueError(
            f"GPU number {requested.index} was requested, but this computer has {count} GPU(s) "
            f"(numbered from 0). Use device='cuda:0', device='cpu' or device='auto'."
        )


def _check_mps() -> None:
    if not mps_available():
        raise ValueError(
            "No Apple GPU (MPS) was found on this computer, so device='mps' cannot be used. "
            "Use device='cpu', or device='auto' to pick the best available device."
        )
