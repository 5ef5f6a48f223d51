"""A faster evaluation of SAM's mask decoder for interactive use, with the same parameters.

Two exact rewrites make one prompt cost a fraction of the reference evaluation on a CPU:

* Attention between the few prompt tokens (T ~ 7) and the N = 4096 image tokens never projects the
  image tokens. The projection weights are folded into the token side instead: for token-to-image
  attention, q.(W_k x + b_k) = (W_k^T q).x + const, and the constant cancels in the softmax; the
  weights sum to one, so A (W_v x + b_v) = W_v (A x) + b_v. Image-to-token attention folds W_q and
  W_o in the same way. Each costs O(heads * T * N * C) instead of O(N * C * C).
* The two stride-2, kernel-2 transposed convolutions are per-token matrix products whose outputs
  stay in token order until the masks are formed, so no layout conversions happen in between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mask_decoder import MaskDecoder
from .transformer import Attention, TwoWayTransformer


def decode_masks(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same inputs and outputs as `MaskDecoder.forward`, evaluated with the rewrites above."""
    batch = sparse_prompt_embeddings.shape[0]
    _, channels, height, width = image_embeddings.shape
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)

    image = (image_embeddings + dense_prompt_embeddings).flatten(2).transpose(1, 2)  # (1 or B, N, C)
    pos = image_pe.flatten(2).transpose(1, 2)  # (1, N, C)
    hs, keys = _transformer(decoder.transformer, image, pos, tokens)

    picked = slice(1, None) if multimask_output else slice(0, 1)
    iou_pred = decoder.iou_prediction_head(hs[:, 0, :])[:, picked]
    mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    mlps = list(decoder.output_hypernetworks_mlps)[picked]
    hyper_in = torch.stack([mlp(mask_tokens[:, i + picked.start, :]) for i, mlp in enumerate(mlps)], dim=1)
    masks = _upscale_and_project(decoder, keys.expand(batch, -1, -1), hyper_in, (height, width))
    return masks, iou_pred


def _transformer(
    transformer: TwoWayTransformer, image: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    queries, keys, query_pe = tokens, image, tokens
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q, q, queries)
        queries = layer.norm1(queries)
        keys_pos = keys + pos
        attended = _tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys_pos, keys)
        queries = layer.norm2(queries + attended)
        queries = layer.norm3(queries + layer.mlp(queries))
        attended = _image_to_tokens(layer.cross_attn_image_to_token, keys_pos, queries + query_pe, queries)
        keys = layer.norm4(keys + attended)
    attended = _tokens_to_image(transformer.final_attn_token_to_image, queries + query_pe, keys + pos, keys)
    return transformer.norm_final_attn(queries + attended), keys


def _per_head(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads * d, C) projection weight -> (heads, d, C)."""
    return weight.view(heads, -1, weight.shape[-1])


def _tokens_to_image(attn: Attention, q: torch.Tensor, k_image: torch.Tensor, v_image: torch.Tensor) -> torch.Tensor:
    """Attention of (B, T, C) tokens over (1 or B, N, C) image tokens, without projecting the image."""
    heads = attn.num_heads
    batch, tokens, _ = q.shape
    q = attn.q_proj(q).view(batch, tokens, heads, -1).transpose(1, 2)  # (B, h, T, d)
    scale = q.shape[-1] ** -0.5
    q_in_image_space = torch.einsum("bhtd,hdc->bhtc", q, _per_head(attn.k_proj.weight, heads))
    logits = q_in_image_space.reshape(batch, heads * tokens, -1) @ k_image.transpose(1, 2)
    weights = torch.softmax(logits * scale, dim=-1)  # (B, h*T, N)
    pooled = (weights @ v_image).view(batch, heads, tokens, -1)  # (B, h, T, C)
    values = torch.einsum("bhtc,hdc->bthd", pooled, _per_head(attn.v_proj.weight, heads))
    values = values + attn.v_proj.bias.view(heads, -1)
    return attn.out_proj(values.reshape(batch, tokens, -1))


def _image_to_tokens(attn: Attention, q_image: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of (1 or B, N, C) image tokens over (B, T, C) tokens, without projecting the image."""
    heads = attn.num_heads
    batch, tokens, _ = k.shape
    k = attn.k_proj(k).view(batch, tokens, heads, -1).transpose(1, 2)  # (B, h, T, d)
    v = attn.v_proj(v).view(batch, tokens, heads, -1).transpose(1, 2)
    scale = k.shape[-1] ** -0.5
    keys_in_image_space = torch.einsum("hdc,bhtd->bcht", _per_head(attn.q_proj.weight, heads), k)
    offsets = torch.einsum("hd,bhtd->bht", attn.q_proj.bias.view(heads, -1), k).reshape(batch, 1, -1)
    logits = torch.baddbmm(offsets, q_image.expand(batch, -1, -1), keys_in_image_space.reshape(batch, -1, heads * tokens))
    weights = _softmax_short(logits.mul_(scale).view(batch, -1, heads, tokens))
    out_weight = attn.out_proj.weight.view(attn.out_proj.out_features, heads, -1)  # (C, h, d)
    values_out = torch.einsum("bhtd,chd->bhtc", v, out_weight).reshape(batch, heads * tokens, -1)
    bias = attn.out_proj.bias.expand(batch, 1, -1)
    return torch.baddbmm(bias, weights.view(batch, -1, heads * tokens), values_out)


def _softmax_short(x: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last axis (a handful of tokens), in place on `x`; vectorises over rows."""
    x = x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


def _upscale_and_project(
    decoder: MaskDecoder, keys: torch.Tensor, hyper_in: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Upscale (B, N, C) image tokens 4x and take each mask token's dot product, as (B, M, 4H, 4W)."""
    conv1, norm, _, conv2, _ = decoder.output_upscaling
    batch, tokens, _ = keys.shape
    height, width = size
    x = F.linear(keys, _as_matrix(conv1.weight), conv1.bias.repeat(4))  # (B, N, 4 * C1): (dy, dx, c)
    x = x.view(batch, tokens, 4, -1)
    x = F.gelu(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
    x = F.linear(x, _as_matrix(conv2.weight), conv2.bias.repeat(4))  # (B, N, 4, 4 * C2)
    x = F.gelu(x.view(batch, tokens, 16, -1))
    masks = x.flatten(1, 2) @ hyper_in.transpose(1, 2)  # (B, N * 16, M)
    masks = masks.view(batch, height, width, 2, 2, 2, 2, -1)  # y, x, dy1, dx1, dy2, dx2, mask
    masks = masks.permute(0, 7, 1, 3, 5, 2, 4, 6)  # mask, y, dy1, dy2, x, dx1, dx2
    return masks.reshape(batch, -1, 4 * height, 4 * width)


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(C_in, C_out, 2, 2) transposed-convolution weight -> (4 * C_out, C_in) ordered (dy, dx, c)."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])
