"""A micro-encoder SAM small enough for tests of whole pipelines: 64 px input, random weights;
and a weight file of the tiny `vit_test` ViT SAM."""

from pathlib import Path

import torch

from samcore import build_sam
from samcore.build import MicroConfig
from weights import randomize_

TINY_MICRO = MicroConfig(
    embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2,
    stem_dims=(8, 16, 24), stem_blocks=(1, 1), img_size=64,
)


def tiny_sam(seed: int = 0) -> torch.nn.Module:
    """The tiny model in eval mode, every parameter random (the same for the same seed)."""
    torch.manual_seed(seed)
    return randomize_(build_sam(TINY_MICRO).eval(), seed=seed)


def save_tiny_vit(path: Path) -> Path:
    """Write the weights of the tiny `vit_test` SAM, seeded random initialisation (seed 0), to `path`."""
    torch.manual_seed(0)
    torch.save(build_sam("vit_test").state_dict(), path)
    return path


def permissive_settings():
    """Automatic-segmentation settings that keep several objects of a random-weight model, whose
    masks are large, overlapping and of low predicted IoU."""
    from samcore.automatic import AutoSettings

    return AutoSettings(
        points_per_side=6, min_predicted_iou=0.0, min_stability=0.0, min_area=4,
        box_nms_iou=1.0, mask_nms_iou=0.9, min_visible=0.2,
    )
