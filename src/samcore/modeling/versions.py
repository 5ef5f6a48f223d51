"""Telling whether tensors were replaced or changed in place since they were last seen."""

from __future__ import annotations

import torch


def tensor_versions(tensors: list[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """Where each tensor's data lives and how often it was modified in place.

    Inference tensors (made under `torch.inference_mode`) keep no modification count: only their
    location is compared.
    """
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)
