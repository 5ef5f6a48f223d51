"""TinyViT image encoder of MobileSAM (the ``vit_t`` model).

A convolutional first stage (MBConv blocks) is followed by stages of windowed
self-attention blocks with learned relative-position biases and a depthwise
"local" convolution. Stages are joined by convolutional patch merging; the last
merge keeps the resolution, so the feature map has stride 16. A SAM-style neck
maps it to the ``out_chans``-channel image embedding.

Module and parameter names follow MobileSAM's checkpoint layout, so the
``image_encoder.*`` entries of ``mobile_sam.pt`` load with ``strict=True``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import encoder_neck
from .linear import Linear, cpu_autocast_dtype, inference_on_cpu, linear_gelu


class ConvBN(nn.Sequential):
    """Bias-free convolution ``c`` followed by BatchNorm ``bn``; padding keeps "same" size at stride 1.

    Shapes: (B, in_ch, H, W) -> (B, out_ch, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        )
        bn = nn.BatchNorm2d(out_ch)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gelu(x, None)

    def gelu(self, x: torch.Tensor, approximate: str | None = "none") -> torch.Tensor:
        """GELU(self(x)) with nn.GELU's `approximate` ("none" or "tanh"); None: self(x) alone.

        In eval mode the BatchNorm is a per-channel affine map, folded into the convolution: one pass
        over the activations instead of two (the largest maps are 256 x 256 x 256 values). In float32
        inference on a CPU, and in bf16 under its autocast, oneDNN applies the GELU as it writes the
        convolution's output (`conv_gelu_dtype`).
        """
        if self.training:
            y = super().forward(x)
        else:
            conv, bn = self.c, self.bn
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            weight = conv.weight * scale.view(-1, 1, 1, 1)
            bias = bn.bias - bn.running_mean * scale
            dtype = conv_gelu_dtype(x, weight) if approximate in ("none", "tanh") else None
            if dtype is not None:
                x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
                return torch.ops.mkldnn._convolution_pointwise(
                    x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "gelu", [],
                    approximate,
                )
            y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return y if approximate is None else F.gelu(y, approximate=approximate)


def conv_gelu_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype in which a 2-D convolution of `x` followed by a GELU goes through oneDNN's convolution
    with the GELU fused, or None: float32 inference on a CPU, or bf16 under the CPU's bf16 autocast.

    Fusing saves a pass over the output, and applies the GELU before bf16 rounds the sum, not after.
    A TinyViT MBConv layer of 256 x 256 x 256 took 37 instead of 60 ms in fp32, and 20 instead of 34 ms
    in bf16, on a 2-core EPYC (Zen 4).
    """
    if not (inference_on_cpu(x, weight) and x.dim() == 4 and conv_gelu_works()):
        return None
    autocast = cpu_autocast_dtype()
    if autocast is None and x.dtype == torch.float32:
        return torch.float32
    if autocast == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16):
        return torch.bfloat16
    return None


@functools.lru_cache(maxsize=1)
def conv_gelu_works() -> bool:
    """Whether oneDNN's convolution with a fused GELU runs here and gives the convolution's GELU, for a
    plain and a depthwise convolution (checked once per process, in a few hundredths of a second)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 9, 9, generator=generator).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(8, generator=generator)
    with torch.inference_mode():
        for groups in (1, 8):
            weight = torch.randn(8, 8 // groups, 3, 3, generator=generator) / 4
            expected = F.gelu(F.conv2d(x, weight, bias, padding=1, groups=groups))
            try:
                fused = torch.ops.mkldnn._convolution_pointwise(
                    x, weight, bias, [1, 1], [1, 1], [1, 1], groups, "gelu", [], "none"
                )
            except (RuntimeError, TypeError):  # a build or CPU whose oneDNN cannot
                return False
            if not torch.allclose(fused, expected, rtol=1e-4, atol=1e-4):
                return False
    return True


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 ConvBN layers with a GELU between: (B, C_in, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, dim // 2, 3, 2), nn.GELU(), ConvBN(dim // 2, dim, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, act, second = self.seq
        return second(first.gelu(x, act.approximate))


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project), GELU after the sum.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.conv2.gelu(self.conv1.gelu(x, self.act1.approximate), self.act2.approximate))
        return self.act3(x + y)


class PatchMerging(nn.Module):
    """1x1 ConvBN, depthwise 3x3 ConvBN with the given stride, 1x1 ConvBN (GELU between).

    Shapes: (B, dim, H, W) -> (B, out_dim, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1.gelu(x, self.act.approximate)
        x = self.conv2.gelu(x, self.act.approximate)
        return self.conv3(x)


class Mlp(nn.Module):
    """Pre-norm feed-forward: LayerNorm, Linear, GELU, Linear. Shapes: (..., C) -> (..., C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(linear_gelu(self.fc1, self.norm(x), self.act.approximate))


class Attention(nn.Module):
    """Pre-norm multi-head self-attention inside one square window, with a learned bias per head
    for every (|dy|, |dx|) offset between two window positions.

    The fused ``qkv`` projection is laid out head by head: for each head its query, key and
    value slices of ``dim // num_heads`` features follow each other.

    Shapes: (B, window_size**2, dim) -> (B, window_size**2, dim).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # Offset (|dy|, |dx|) of two positions is stored at column |dy| * window_size + |dx|.
        coords = torch.arange(window_size)
        rows = coords.repeat_interleave(window_size)
        cols = coords.repeat(window_size)
        idxs = (rows[:, None] - rows[None, :]).abs() * window_size + (cols[:, None] - cols[None, :]).abs()
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # The index table is derived from the window size; tolerate checkpoints that stored it.
        state_dict.pop(prefix + "attention_bias_idxs", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        # (1, heads, N, N): PyTorch's fused CPU kernel takes a 4-D mask; a 3-D one sends the call to
        # the unfused path, 3.5x slower here.
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise local convolution and MLP, with residuals around attention and MLP.

    Windows tile the map from the top-left; the map is zero-padded at the bottom/right to whole
    windows (the padding takes part in attention, as in MobileSAM) and cropped afterwards.

    Shapes: (B, H, W, C) -> (B, H, W, C).
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // ws, (w + pad_w) // ws
        windows = x.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        windows = self.attn(windows)
        x = windows.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        return x[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """MBConv blocks, then an optional PatchMerging. Shapes: (B, C, H, W) -> (B, C', H', W')."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TransformerStage(nn.Module):
    """TinyViT blocks, then an optional PatchMerging. Shapes: (B, C, H, W) -> (B, C', H', W')."""

    def __init__(self, blocks: Sequence[TinyViTBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """MobileSAM's TinyViT encoder: image (B, in_chans, S, S) -> embedding (B, out_chans, S/16, S/16).

    Stage 0 is convolutional, the others are windowed transformers. Every stage but the last ends in
    a PatchMerging; all merges halve the resolution except the one into the last stage (so four
    stages give stride 16).
    ``norm_head`` and ``head`` (the classifier of the original TinyViT) are kept only so that the
    checkpoint loads strictly; ``forward`` does not use them.

    Args:
        img_size: Side S of the square input image.
        in_chans: Input channels.
        embed_dims: Channels of each stage.
        depths: Blocks in each stage.
        num_heads: Attention heads of each stage (entry 0 is unused).
        window_sizes: Attention window side of each stage (entry 0 is unused).
        mlp_ratio: MLP width relative to the stage width.
        mbconv_expand_ratio: Hidden width of the MBConv blocks relative to their input.
        local_conv_size: Kernel of the depthwise convolution inside each transformer block.
        num_classes: Outputs of the unused classifier head (0 makes it an Identity).
        out_chans: Channels of the output embedding.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        num_classes: int = 1000,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        if n < 2 or not len(depths) == len(num_heads) == len(window_sizes) == n:
            raise ValueError(
                "embed_dims, depths, num_heads and window_sizes must have the same length of at least 2, "
                f"got {len(embed_dims)}, {len(depths)}, {len(num_heads)} and {len(window_sizes)}."
            )
        for i in range(1, n):
            if embed_dims[i] % num_heads[i] != 0:
                raise ValueError(
                    f"embed_dims[{i}]={embed_dims[i]} is not divisible by num_heads[{i}]={num_heads[i]}."
                )
            if window_sizes[i] < 1:
                raise ValueError(f"window_sizes[{i}] must be positive, got {window_sizes[i]}.")
        if img_size < 1:
            raise ValueError(f"img_size must be positive, got {img_size}.")
        self.img_size = img_size
        self.in_chans = in_chans

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        for i in range(n):
            merge = None
            if i < n - 1:
                merge = PatchMerging(embed_dims[i], embed_dims[i + 1], stride=1 if i == n - 2 else 2)
            if i == 0:
                self.layers.append(ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, merge))
            else:
                blocks = [
                    TinyViTBlock(embed_dims[i], num_heads[i], window_sizes[i], mlp_ratio, local_conv_size)
                    for _ in range(depths[i])
                ]
                self.layers.append(TransformerStage(blocks, merge))
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head: nn.Module = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.neck = encoder_neck(embed_dims[-1], out_chans)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            x: Normalised images, (B, in_chans, img_size, img_size).

        Returns:
            Image embedding, (B, out_chans, img_size / 16, img_size / 16) (sides rounded up).
        """
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"Expected an image batch of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}."
            )
        # Channels-last: oneDNN's convolutions (patch embedding, MBConv stage) run faster on it
        # (a 1024 px image: 2.1 -> 1.8 s in fp32, 1.1 -> 0.8 s in bf16 on a 2-core CPU).
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)
