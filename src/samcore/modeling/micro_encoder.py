"""A small hybrid image encoder for CPU use: a convolutional stem, then attention at stride 8 or 16.

Layout, for an (B, 3, S, S) normalised image:

* stem: three stride-2 3x3 convolutions, each followed by GroupNorm and GELU, with
  inverted-residual blocks at stride 4 and 8 that keep fine detail (thin membranes, small nuclei),
  then a 3x3 convolution to the token width, of stride 2 (tokens at stride 16, as SAM's) or 1
  (tokens at stride 8: a finer grid, for objects only a few tokens wide at stride 16);
* blocks: pre-norm transformer blocks on the token grid, channels last; every block
  first adds a depthwise 3x3 convolution of its input (a position signal that needs no table, so
  the encoder works at any input size), then attends within windows, or over the whole grid in
  the global blocks;
* neck: SAM's 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d to the 256-channel embedding.

Attention uses `scaled_dot_product_attention` without a bias, the fast fused path on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock, encoder_neck
from .linear import Linear
from .winograd import Conv2d

STRIDES = (8, 16)  # token strides the stem can produce


#: Attention over at most this many tokens (a window) is computed with plain products.
SMALL_ATTENTION = 256


class MicroEncoder(nn.Module):
    """Conv-stem + windowed-attention encoder producing a SAM image embedding.

    Args:
        img_size: Side of the square model input in pixels (a multiple of 16).
        stride: Pixels per token, 8 or 16.
        stem_dims: Channels after the stride-2, -4 and -8 convolutions.
        stem_blocks: Inverted-residual blocks at stride 4 and at stride 8.
        embed_dim: Width of the transformer blocks.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        window_size: Side of the attention windows of non-global blocks, in tokens.
        global_attn_indexes: Blocks that attend over the whole grid.
        mlp_ratio: Feed-forward width relative to embed_dim.
        out_chans: Channels of the output embedding.
    """

    def __init__(
        self,
        img_size: int = 512,
        stride: int = 16,
        stem_dims: Sequence[int] = (32, 64, 128),
        stem_blocks: Sequence[int] = (1, 2),
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 6,
        window_size: int = 8,
        global_attn_indexes: Sequence[int] = (2, 5),
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        if img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16, not {img_size}.")
        if stride not in STRIDES:
            raise ValueError(f"The token stride must be one of {STRIDES}, not {stride}.")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        self.img_size = img_size
        self.stride = stride
        self.stem = ConvStem(3, tuple(stem_dims), tuple(stem_blocks), embed_dim, last_stride=stride // 8)
        self.blocks = nn.ModuleList(
            HybridBlock(embed_dim, num_heads, mlp_ratio, 0 if i in global_attn_indexes else window_size)
            for i in range(depth)
        )
        self.neck = encoder_neck(embed_dim, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images.

        Args:
            x: (B, 3, H, W) normalised float images, H and W multiples of the stride (img_size in use).

        Returns:
            (B, out_chans, H / stride, W / stride) embeddings.
        """
        # Channels-last: oneDNN's convolutions run two to three times as fast on it, and the
        # tokens come out contiguous in (B, h, w, C), as the blocks' norms and products want them.
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        x = x.permute(0, 2, 3, 1).contiguous()  # (B, h, w, C)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class ConvStem(nn.Sequential):
    """Convolutional stem: (B, in_chans, H, W) -> (B, out_dim, H / s, W / s), s = 8 * last_stride.

    Args:
        in_chans: Input channels.
        dims: Channels at stride 2, 4 and 8.
        blocks: Inverted-residual blocks after the stride-4 and stride-8 convolutions.
        out_dim: Channels of the tokens.
        last_stride: Stride of the final convolution, 2 (tokens at stride 16) or 1 (stride 8).
    """

    def __init__(
        self,
        in_chans: int,
        dims: tuple[int, int, int],
        blocks: tuple[int, int],
        out_dim: int,
        last_stride: int = 2,
    ) -> None:
        if len(dims) != 3 or len(blocks) != 2:
            raise ValueError(f"The stem needs 3 widths and 2 block counts, not {dims} and {blocks}.")
        layers: list[nn.Module] = [ConvNormAct(in_chans, dims[0], stride=2)]
        layers.append(ConvNormAct(dims[0], dims[1], stride=2))
        layers.extend(InvertedResidual(dims[1]) for _ in range(blocks[0]))
        layers.append(ConvNormAct(dims[1], dims[2], stride=2))
        layers.extend(InvertedResidual(dims[2]) for _ in range(blocks[1]))
        layers.append(Conv2d(dims[2], out_dim, kernel_size=3, stride=last_stride, padding=1))
        super().__init__(*layers)


class ConvNormAct(nn.Sequential):
    """3x3 convolution, GroupNorm, GELU: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(_groups(out_ch), out_ch),
            nn.GELU(),
        )


class InvertedResidual(nn.Module):
    """x + project(depthwise(expand(x))), with a zero-initialised projection norm so it starts as identity.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim: int, expansion: int = 2) -> None:
        super().__init__()
        hidden = dim * expansion
        self.expand = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False), nn.GroupNorm(_groups(hidden), hidden), nn.GELU()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.GroupNorm(_groups(hidden), hidden),
            nn.GELU(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, dim, 1, bias=False), nn.GroupNorm(_groups(dim), dim))
        nn.init.zeros_(self.project[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class HybridBlock(nn.Module):
    """Depthwise-conv position signal, then windowed or global attention, then MLP; channels last.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: Feed-forward width relative to dim.
        window_size: Window side in tokens; 0 attends over the whole grid.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int) -> None:
        super().__init__()
        self.pos_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) tokens -> (B, H, W, C)."""
        x = x + self.pos_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        height, width = x.shape[1:3]
        y = self.norm1(x)
        if self.window_size > 0:
            y, padded = partition_windows(y, self.window_size)
            y = self.attn(y)
            y = merge_windows(y, self.window_size, padded, (height, width))
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token grid, without position bias."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu" and height * width <= SMALL_ATTENTION:
            # Windows of a few dozen tokens: plain fp32 products beat the fused kernel on the CPU
            # (about twice as fast) and keep the softmax in fp32 under autocast.
            q, k, v = qkv.float().unbind(0)
            weights = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).softmax(dim=-1)
            out = torch.matmul(weights, v).to(qkv.dtype)
        else:
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj(out)


def partition_windows(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split (B, H, W, C) into (B * windows, window, window, C), zero-padding bottom and right.

    Returns:
        The windows and the padded (H, W).
    """
    batch, height, width, channels = x.shape
    pad_h, pad_w = -height % window, -width % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = height + pad_h, width + pad_w
    x = x.view(batch, hp // window, window, wp // window, window, channels)
    return x.transpose(2, 3).reshape(-1, window, window, channels), (hp, wp)


def merge_windows(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `partition_windows`: (B * windows, window, window, C) -> (B, H, W, C)."""
    hp, wp = padded
    batch = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(batch, hp // window, wp // window, window, window, -1).transpose(2, 3)
    x = x.reshape(batch, hp, wp, -1)
    return x[:, : size[0], : size[1]]


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 channels per group (at least one group)."""
    return max(1, channels // 8)
