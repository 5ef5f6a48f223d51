"""SAM's ViT image encoder: patch embedding, windowed/global attention blocks, neck."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..cancel import check as check_cancel
from .common import MLPBlock, encoder_neck
from .linear import Linear, onednn_linear, through_onednn


class ImageEncoderViT(nn.Module):
    """Vision transformer that turns a normalised image into a SAM embedding.

    Args:
        img_size: Side of the square input image in pixels.
        patch_size: Side of a patch; the embedding is img_size / patch_size per side.
        in_chans: Input channels.
        embed_dim: Transformer width.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: Feed-forward width relative to embed_dim.
        out_chans: Channels of the output embedding.
        window_size: Side of the attention windows of non-global blocks.
        global_attn_indexes: Blocks that attend over the whole image.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                grid_size=grid,
            )
            for i in range(depth)
        )
        self.neck = encoder_neck(embed_dim, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images.

        Args:
            x: (B, 3, img_size, img_size) normalised float images.

        Returns:
            (B, out_chans, img_size / 16, img_size / 16) embeddings.
        """
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block with windowed (window_size > 0) or global attention."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid_size: int
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = window_size if window_size > 0 else grid_size
        self.attn = Attention(dim, num_heads, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1:3]
            x, padded = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded, (height, width))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head attention with decomposed relative position biases on a 2D token grid.

    Args:
        dim: Token width.
        num_heads: Heads.
        size: Side of the (square) token grid the relative tables are made for.
    """

    def __init__(self, dim: int, num_heads: int, size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3, bias=True)
        self.proj = Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over a (B, H, W, C) token grid; returns the same shape."""
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        out = self.attend(q, k, v, (height, width))
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """Attention of (B, heads, H*W, head_dim) q, k, v on an (H, W) grid, relative positions included."""
        if size[0] * size[1] <= CHUNKED_ATTENTION_TOKENS:
            bias = relative_position_bias(q, self.rel_pos_h, self.rel_pos_w, size)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if q.device.type == "cpu":
            return chunked_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, size)
        return grouped_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, size)


# Above this many tokens, attention is computed a block of queries at a time on a CPU, so that the
# relative-position bias never exists as a whole (12 x 4096 x 4096 floats for ViT-B's global blocks).
CHUNKED_ATTENTION_TOKENS = 1024
QUERY_CHUNK = 256
# Elsewhere (a GPU), the bias of a few heads of one image is made at a time, at most this many values.
BIAS_VALUES = 2**27


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """`scaled_dot_product_attention` with `relative_position_bias` as mask, a group of heads of one
    image at a time.

    For GPUs: one fused attention call per group instead of the many small products of
    `chunked_attention`, with the bias bounded by `BIAS_VALUES` (256 MB in bf16) whatever the batch.
    Arguments and result as in `chunked_attention`.
    """
    batch, heads, tokens, _ = q.shape
    group = max(1, min(heads, BIAS_VALUES // (tokens * tokens)))
    out = torch.empty_like(q)
    for b in range(batch):
        for first in range(0, heads, group):
            check_cancel()
            part = (slice(b, b + 1), slice(first, first + group))
            bias = relative_position_bias(q[part], rel_pos_h, rel_pos_w, size)
            out[part] = F.scaled_dot_product_attention(q[part], k[part], v[part], attn_mask=bias)
    return out


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """Softmax attention with decomposed relative positions, one head and query block at a time.

    Same result as `scaled_dot_product_attention` with `relative_position_bias` as mask, with a
    working set that fits in the CPU cache instead of a bias tensor of heads x N x N.

    Args:
        q, k, v: (B, heads, N, head_dim) with N = H * W.
        rel_pos_h, rel_pos_w: (L, head_dim) relative-position tables.
        size: (H, W) of the token grid.

    Returns:
        (B, heads, N, head_dim).
    """
    height, width = size
    batch, heads, tokens, head_dim = q.shape
    table_h = relative_table(height, rel_pos_h).to(q.dtype)
    table_w = relative_table(width, rel_pos_w).to(q.dtype)
    grid_q = q.reshape(batch, heads, height, width, head_dim)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h).reshape(batch, heads, tokens, height)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w).reshape(batch, heads, tokens, width)
    # Scaled before the products: exact where the scale is a power of two (head_dim 64: ViT-B, ViT-L).
    q = q * head_dim**-0.5
    out = torch.empty_like(q)
    onednn = through_onednn(q, k)  # float32 inference where oneDNN multiplies faster (`linear`)
    if not onednn:
        # The bias is written first and the product added to it in one pass (addmm_), instead of
        # adding the two bias terms to the product afterwards: 15% less time per block in bf16.
        logits_buffer = q.new_empty(min(QUERY_CHUNK, tokens), tokens)
    for b in range(batch):
        for n in range(heads):
            check_cancel()  # a global block runs about a second here, with no module call inside
            keys, values = k[b, n], v[b, n]
            if onednn:  # both products as x W^T, with keys and values as the "weights"
                keys, values_t = keys.contiguous(), values.transpose(0, 1).contiguous()
            for start in range(0, tokens, QUERY_CHUNK):
                rows = slice(start, start + QUERY_CHUNK)
                queries = q[b, n, rows]
                terms_h, terms_w = bias_h[b, n, rows, :, None], bias_w[b, n, rows, None, :]
                if onednn:
                    logits = onednn_linear(queries, keys, None, "none", "")
                    logits.view(-1, height, width).add_(terms_h).add_(terms_w)
                else:
                    logits = logits_buffer[: len(queries)]
                    torch.add(terms_h, terms_w, out=logits.view(-1, height, width))
                    logits.addmm_(queries, keys.transpose(0, 1))
                weights = torch.softmax(logits.view(-1, tokens), dim=-1)
                if onednn:
                    out[b, n, rows] = onednn_linear(weights, values_t, None, "none", "")
                else:
                    torch.mm(weights, values, out=out[b, n, rows])
    return out


def relative_position_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias from decomposed relative positions (query-dependent).

    Args:
        q: (B, heads, H*W, head_dim) unscaled queries.
        rel_pos_h: (L, head_dim) table of vertical offsets.
        rel_pos_w: (L, head_dim) table of horizontal offsets.
        size: (H, W) of the token grid (queries and keys share it).

    Returns:
        (B, heads, H*W, H*W) bias, in q's dtype.
    """
    height, width = size
    table_h = relative_table(height, rel_pos_h).to(q.dtype)  # (H, H, head_dim)
    table_w = relative_table(width, rel_pos_w).to(q.dtype)
    grid_q = q.reshape(*q.shape[:2], height, width, -1)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w)
    shape = (*q.shape[:2], height * width, height * width)
    if q.dtype != torch.float32:
        # bf16 adds over rows as short as a window's are slow. As a product with a 0/1 matrix, each
        # value is still one sum of two terms, rounded once: the same bias, 4x faster in bf16.
        pairs = torch.cat([bias_h, bias_w], dim=-1).view(-1, height + width)
        return (pairs @ position_pairs(height, width, pairs)).view(shape)
    if torch.is_grad_enabled() and (bias_h.requires_grad or bias_w.requires_grad):
        return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(shape)  # out= has no gradient
    # Written into a contiguous tensor: the sum would otherwise take the einsum results' strides, and
    # the reshape would copy it (a third of the time the bias took in ViT-B's windowed blocks).
    bias = bias_h.new_empty(*q.shape[:2], height, width, height, width)
    torch.add(bias_h[..., :, None], bias_w[..., None, :], out=bias)
    return bias.view(shape)


def position_pairs(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(H + W, H * W) 0/1 matrix: key i * W + j has a one in row i and in row H + j."""
    rows = torch.eye(height, dtype=like.dtype, device=like.device).repeat_interleave(width, dim=1)
    cols = torch.eye(width, dtype=like.dtype, device=like.device).repeat(1, height)
    return torch.cat([rows, cols])


def relative_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Index a relative-position table for every (query, key) pair along one axis.

    Args:
        size: Number of positions along the axis (queries and keys alike).
        rel_pos: (L, C) table; resized linearly when L != 2 * size - 1.

    Returns:
        (size, size, C) entries, [i, j] holding the offset i - j.
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        resized = F.interpolate(rel_pos.T[None], size=length, mode="linear")
        rel_pos = resized[0].T
    coords = torch.arange(size, device=rel_pos.device)
    offsets = coords[:, None] - coords[None, :] + (size - 1)
    return rel_pos[offsets]


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split a (B, H, W, C) grid into (B * windows, window, window, C), zero-padding the edges.

    Returns:
        The windows and the padded (H, W).
    """
    batch, height, width, channels = x.shape
    hp, wp = padded_size(height, width, window)
    if (hp, wp) != (height, width):
        x = F.pad(x, (0, 0, 0, wp - width, 0, hp - height))
    x = x.view(batch, hp // window, window, wp // window, window, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)
    return windows, (hp, wp)


def padded_size(height: int, width: int, window: int) -> tuple[int, int]:
    """(H, W) rounded up to whole windows."""
    return -(-height // window) * window, -(-width // window) * window


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`: back to (B, H, W, C) with the padding removed."""
    hp, wp = padded
    height, width = size
    batch = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(batch, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, -1)
    return x[:, :height, :width, :].contiguous()
