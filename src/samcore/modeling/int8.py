"""Int8 matrix products for SAM's ViT image encoder on CPUs.

The encoder's time on a CPU is mostly its linear layers (qkv, proj and the two MLP layers of every
block). Here they run as int8 x int8 -> int32 products (`torch._int_mm`, VNNI dot products on
x86), about three times the fp32 rate on a 2-core Xeon:

* weights are quantised once, symmetrically, one scale per output channel;
* activations are quantised on the fly, symmetrically, one scale per token, so one bright token
  does not cost the others their precision;
* everything else (layer norms, attention with its relative positions, GELU, residuals, neck)
  stays in fp32.

Quantising and dequantising are passes over memory that cost as much as the products save unless
they are fused with their neighbours, so the two halves of each block (norm + qkv, and proj +
residual + MLP) are compiled with `torch.compile`. The encoder's own parameters are shared, not
copied: only the int8 weights are new (a quarter of the fp32 linear weights).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo.exc
import torch._inductor.exc
import torch.nn.functional as F
from torch import nn

from ..cancel import check as check_cancel
from .image_encoder import ImageEncoderViT, padded_size, window_partition, window_unpartition

# What a failed compilation raises (e.g. no C++ compiler on the machine).
COMPILE_ERRORS = (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError)


class Int8Linear:
    """A linear layer's weight as int8 (in x out, one scale per output) with its fp32 bias."""

    def __init__(self, layer: nn.Linear) -> None:
        weight = layer.weight.detach().float()
        self.scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.weight = torch.round(weight / self.scale[:, None]).to(torch.int8).t().contiguous()
        self.bias = torch.zeros(weight.shape[0]) if layer.bias is None else layer.bias.detach().float()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.weight, self.scale, self.bias


class Int8ImageEncoder(nn.Module):
    """Runs an `ImageEncoderViT` with int8 linear layers; same inputs and outputs.

    Args:
        encoder: The fp32 encoder; its parameters are used, not copied, and must not change
            afterwards (its int8 weights are made once per process and kept with it).
        compiled: Fuse the quantisation passes with `torch.compile` (needs a C++ compiler).
            Without it the result is the same but no faster than fp32.
    """

    def __init__(self, encoder: ImageEncoderViT, compiled: bool = True) -> None:
        super().__init__()
        if not isinstance(encoder, ImageEncoderViT):
            raise TypeError(f"int8 encoding is for SAM's ViT encoders, not {type(encoder).__name__}.")
        self.encoder = encoder
        self.img_size = encoder.img_size
        self._linears = quantized_linears(encoder)
        if compiled:
            self._before, self._after = compiled_halves()
        else:
            self._before, self._after = attention_inputs, attention_output_and_mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, 256, S / 16, S / 16) embeddings."""
        encoder = self.encoder
        x = encoder.patch_embed(x) + encoder.pos_embed
        for block, (qkv, proj, lin1, lin2) in zip(encoder.blocks, self._linears):
            check_cancel()  # the blocks are not called as modules, so their hooks do not run
            window, attn = block.window_size, block.attn
            q, k, v = self._before(
                x, block.norm1.weight, block.norm1.bias, *qkv.tensors(), attn.num_heads, window
            )
            if window > 0:
                size, padded = (window, window), padded_size(x.shape[1], x.shape[2], window)
            else:
                size = padded = (x.shape[1], x.shape[2])
            out = attn.attend(q, k, v, size)
            x = self._after(
                out,
                x,
                *proj.tensors(),
                block.norm2.weight,
                block.norm2.bias,
                *lin1.tensors(),
                *lin2.tensors(),
                window,
                *size,
                *padded,
            )
        return encoder.neck(x.permute(0, 3, 1, 2))


# int8 weights per encoder, made once per process: predictors made per slice or per task (Dask
# workers, crops) would otherwise quantise the weights again each time (2 s for ViT-B).
_QUANTIZED: weakref.WeakKeyDictionary[ImageEncoderViT, list[tuple[Int8Linear, ...]]]
_QUANTIZED = weakref.WeakKeyDictionary()
_QUANTIZING = threading.Lock()


def quantized_linears(encoder: ImageEncoderViT) -> list[tuple[Int8Linear, ...]]:
    """(qkv, proj, lin1, lin2) of every block as `Int8Linear`, cached for the encoder's lifetime."""
    with _QUANTIZING:
        linears = _QUANTIZED.get(encoder)
        if linears is None:
            linears = _QUANTIZED[encoder] = [
                tuple(
                    Int8Linear(layer)
                    for layer in (block.attn.qkv, block.attn.proj, block.mlp.lin1, block.mlp.lin2)
                )
                for block in encoder.blocks
            ]
        return linears


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of a (N, C) tensor with one scale per row."""
    peak = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.round(x * (127.0 / peak)).to(torch.int8), peak * (1.0 / 127)


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """`x @ W.T + b` with x quantised per token and W (given as int8, in x out) per output channel."""
    shape = x.shape
    quantized, row_scale = quantize_rows(x.reshape(-1, shape[-1]))
    out = torch._int_mm(quantized, weight).float() * row_scale * scale + bias
    return out.view(*shape[:-1], weight.shape[1])


def attention_inputs(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    heads: int,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First half of a block: norm, windows, qkv. Returns q, k, v as (B', heads, tokens, head_dim)."""
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, 1e-6)
    if window > 0:
        h, _ = window_partition(h, window)
    batch, height, width, _ = h.shape
    qkv = int8_linear(h, weight, scale, bias)
    qkv = qkv.reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def attention_output_and_mlp(
    out: torch.Tensor,
    x: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_scale: torch.Tensor,
    proj_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    weight1: torch.Tensor,
    scale1: torch.Tensor,
    bias1: torch.Tensor,
    weight2: torch.Tensor,
    scale2: torch.Tensor,
    bias2: torch.Tensor,
    window: int,
    height: int,
    width: int,
    padded_height: int,
    padded_width: int,
) -> torch.Tensor:
    """Second half of a block: heads merged, proj, windows undone, residual, then the MLP."""
    batch, heads, _, head_dim = out.shape
    out = out.view(batch, heads, height, width, head_dim).permute(0, 2, 3, 1, 4)
    y = int8_linear(out.reshape(batch, height, width, heads * head_dim), proj_weight, proj_scale, proj_bias)
    if window > 0:
        y = window_unpartition(y, window, (padded_height, padded_width), (x.shape[1], x.shape[2]))
    x = x + y
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, 1e-6)
    h = F.gelu(int8_linear(h, weight1, scale1, bias1))
    return x + int8_linear(h, weight2, scale2, bias2)


@functools.cache
def compiled_halves() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The two block halves under `torch.compile`, made once per process.

    Each is compiled on first use for each block kind and shape; shapes are fixed by the model's
    input size, so a ViT-B compiles four graphs (about 10 s on a 2-core CPU, then cached on disk).
    """
    return (
        torch.compile(attention_inputs, dynamic=False),
        torch.compile(attention_output_and_mlp, dynamic=False),
    )
