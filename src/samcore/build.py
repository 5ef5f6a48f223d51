"""Architectures by name: one registry dict of encoder configurations and a builder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

PROMPT_EMBED_DIM = 256
PATCH_SIZE = 16


@dataclass(frozen=True)
class ViTConfig:
    """A SAM ViT image encoder (windowed attention plus a few global blocks)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    img_size: int = 1024
    stride = PATCH_SIZE

    def build(self) -> nn.Module:
        return ImageEncoderViT(
            img_size=self.img_size,
            patch_size=PATCH_SIZE,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            out_chans=PROMPT_EMBED_DIM,
            window_size=self.window_size,
            global_attn_indexes=self.global_attn_indexes,
        )


@dataclass(frozen=True)
class TinyViTConfig:
    """MobileSAM's TinyViT image encoder."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    img_size: int = 1024
    stride = 16

    def build(self) -> nn.Module:
        from .modeling.tiny_vit import TinyViT

        return TinyViT(
            img_size=self.img_size,
            embed_dims=self.embed_dims,
            depths=self.depths,
            num_heads=self.num_heads,
            window_sizes=self.window_sizes,
        )


@dataclass(frozen=True)
class MicroConfig:
    """A small conv-stem + windowed-attention encoder for CPU use (see `modeling.micro_encoder`).

    The weights record neither img_size (the encoder has no position table) nor the stride, so registered
    MicroConfigs must differ in their widths or depth for `infer_architecture` to tell them apart.
    """

    embed_dim: int = 256
    depth: int = 6
    num_heads: int = 8
    global_attn_indexes: tuple[int, ...] = (2, 5)
    window_size: int = 8
    stem_dims: tuple[int, int, int] = (32, 64, 128)
    stem_blocks: tuple[int, int] = (1, 2)
    img_size: int = 512
    stride: int = 16
    # Training shows these encoders square scenes only, never SAM's zero padding; a non-square image
    # is best continued by its own mirror image (on generated scenes cropped to 128x512, a box
    # scored 0.584 mean IoU with zero padding and 0.803 mirrored, as much as on whole scenes).
    padding: str = "mirror"

    def build(self) -> nn.Module:
        from .modeling.micro_encoder import MicroEncoder

        return MicroEncoder(
            img_size=self.img_size,
            stride=self.stride,
            stem_dims=self.stem_dims,
            stem_blocks=self.stem_blocks,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            window_size=self.window_size,
            global_attn_indexes=self.global_attn_indexes,
            out_chans=PROMPT_EMBED_DIM,
        )

    def signature(self) -> tuple[int, ...]:
        """What the weights reveal: stem widths, stem block counts, width and depth."""
        return (*self.stem_dims, *self.stem_blocks, self.embed_dim, self.depth)


EncoderConfig = ViTConfig | TinyViTConfig | MicroConfig

ARCHITECTURES: dict[str, EncoderConfig] = {
    "vit_b": ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_t": TinyViTConfig(),
    # A tiny encoder for tests and quick experiments: every code path, little compute.
    "vit_test": ViTConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=6, img_size=256),
    # The project's own small model for CPUs, trained on synthetic scenes (samcore.training).
    # Tokens at stride 8 on a 512 px input: the 64x64 grid of the official models, on which
    # nuclei of 20-30 px span several tokens; windowed attention only, for speed.
    "micro_v1": MicroConfig(embed_dim=128, depth=4, num_heads=4, global_attn_indexes=(), stride=8),
}


def build_sam(arch: str | EncoderConfig) -> Sam:
    """Build a randomly initialised SAM.

    Args:
        arch: A name in ARCHITECTURES or an encoder configuration.

    Returns:
        The model (train mode, CPU, float32).
    """
    config = _config(arch)
    grid = config.img_size // config.stride
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(config.img_size, config.img_size),
        mask_in_chans=16,
    )
    transformer = TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, num_heads=8, mlp_dim=2048)
    mask_decoder = MaskDecoder(PROMPT_EMBED_DIM, transformer, num_multimask_outputs=3)
    model = Sam(config.build(), prompt_encoder, mask_decoder, padding=getattr(config, "padding", "zeros"))
    model.architecture = arch if isinstance(arch, str) else ""
    return model


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the registered architecture a SAM state dict (official keys) belongs to.

    Raises:
        ValueError: The weights match no registered architecture.
    """
    if MICRO_STEM_KEY in state_dict:
        return _infer_micro(state_dict)
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        dims = tuple(
            int(state_dict[f"image_encoder.layers.{i}.blocks.0.conv1.c.weight"].shape[1])
            if i == 0
            else int(state_dict[f"image_encoder.layers.{i}.blocks.0.attn.qkv.weight"].shape[1])
            for i in range(4)
            if f"image_encoder.layers.{i}.blocks.0.conv1.c.weight" in state_dict
            or f"image_encoder.layers.{i}.blocks.0.attn.qkv.weight" in state_dict
        )
        for name, config in ARCHITECTURES.items():
            if isinstance(config, TinyViTConfig) and config.embed_dims == dims:
                return name
        raise ValueError(f"These TinyViT weights (widths {dims}) match no known model.")
    proj = state_dict.get("image_encoder.patch_embed.proj.weight")
    pos = state_dict.get("image_encoder.pos_embed")
    if proj is None or pos is None:
        raise ValueError("These weights hold no SAM image encoder (no patch embedding found).")
    depth = len({key.split(".")[2] for key in state_dict if key.startswith("image_encoder.blocks.")})
    found = (int(proj.shape[0]), depth, int(pos.shape[1]) * PATCH_SIZE)
    for name, config in ARCHITECTURES.items():
        if isinstance(config, ViTConfig) and (config.embed_dim, config.depth, config.img_size) == found:
            return name
    raise ValueError(
        f"These ViT weights (width {found[0]}, {found[1]} blocks, {found[2]} px input) match no known model."
    )


MICRO_STEM_KEY = "image_encoder.stem.0.0.weight"


def _infer_micro(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the registered MicroConfig whose stem, width and depth match these weights."""
    signature = micro_signature(state_dict)
    for name, config in ARCHITECTURES.items():
        if isinstance(config, MicroConfig) and config.signature() == signature:
            return name
    raise ValueError(f"These micro-encoder weights (stem, width, depth {signature}) match no known model.")


def micro_signature(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """(stem widths x3, stem blocks x2, embed_dim, depth) read from a micro-encoder state dict."""
    stem = sorted({int(key.split(".")[2]) for key in state_dict if key.startswith("image_encoder.stem.")})
    widths = [int(state_dict[f"image_encoder.stem.{i}.0.weight"].shape[0]) for i in stem
              if f"image_encoder.stem.{i}.0.weight" in state_dict]
    residual = [i for i in stem if f"image_encoder.stem.{i}.expand.0.weight" in state_dict]
    convs = [i for i in stem if i not in residual]
    if len(convs) != 4:
        raise ValueError(f"These micro-encoder weights have {len(convs)} stem convolutions instead of 4.")
    blocks = (sum(convs[1] < i < convs[2] for i in residual), sum(convs[2] < i < convs[3] for i in residual))
    embed_dim = int(state_dict[f"image_encoder.stem.{convs[3]}.weight"].shape[0])
    depth = len({key.split(".")[2] for key in state_dict if key.startswith("image_encoder.blocks.")})
    return (*widths[:3], *blocks, embed_dim, depth)


def _config(arch: str | EncoderConfig) -> EncoderConfig:
    if isinstance(arch, (ViTConfig, TinyViTConfig, MicroConfig)):
        return arch
    if arch not in ARCHITECTURES:
        names = ", ".join(ARCHITECTURES)
        raise ValueError(f"Unknown model architecture {arch!r}. Known architectures: {names}.")
    return ARCHITECTURES[arch]
