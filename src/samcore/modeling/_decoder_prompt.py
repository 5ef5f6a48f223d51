"""One prompt through the fast decoder: the two-way transformer and the upscaling, in the low-rank forms
that `fast_decoder` derives (see its docstring for the algebra)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ._decoder_ops import feed_forward, layer_norm, mlp_head, split_heads, split_rows
from .transformer import Attention

# Block 1's per-image tensors, as `DecoderConstants.mask_maps` names them.
SECOND_KEYS, SECOND_VALUES, SECOND_QUERIES = "second keys", "second values", "second queries"

if TYPE_CHECKING:
    from .fast_decoder import DecoderConstants, ImageContext


# The logits of the masks of a prompt that `decode_one` leaves out: an empty mask, finite so that
# scaling them by interpolation gives no NaN.
LEFT_OUT = -1e4


def decode_one(
    context: ImageContext, tokens: torch.Tensor, multimask_output: bool, min_score: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution logits (M, 4H, 4W) and predicted IoUs (M,) of (T, C) output and prompt tokens.

    When every predicted IoU is below `min_score`, the masks are left out (their logits are all
    `LEFT_OUT`): the upscaling is about a third of a prompt's time.
    """
    decoder = context.constants.decoder
    picked = slice(1, None) if multimask_output else slice(0, 1)
    masks = range(decoder.num_mask_tokens)[picked]
    outputs, mixing = _transformer(context, tokens, [0, *(1 + m for m in masks)])
    dense = context.constants.dense
    iou_pred = mlp_head(decoder.iou_prediction_head, outputs[:1], dense)[0, picked]
    if min_score is not None and bool((iou_pred < min_score).all()):
        height, width = context.constants.grid
        return iou_pred.new_full((len(masks), 4 * height, 4 * width), LEFT_OUT), iou_pred
    mlps = decoder.output_hypernetworks_mlps
    hyper_in = torch.cat(
        [mlp_head(mlps[m], outputs[1 + i : 2 + i], dense) for i, m in enumerate(masks)]
    )  # M, C2
    return _upscale_and_project(context, mixing, hyper_in), iou_pred


class Mixing:
    """How each block's image-to-token attention and LayerNorm changed the image tokens."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []  # (h T, N) attention weights per block
        self.values: list[torch.Tensor] = []  # (h T, C) value rows per block, output bias folded in
        self.means: list[torch.Tensor] = []  # (N,) LayerNorm means per block; block 0: see below
        self.rstds: list[torch.Tensor] = []  # (N,) LayerNorm reciprocal standard deviations per block


def _transformer(
    context: ImageContext, tokens: torch.Tensor, outputs: list[int]
) -> tuple[torch.Tensor, Mixing]:
    """The two-way transformer on (T, C) tokens.

    Returns the final tokens at indices `outputs` and the image-token mixing. Tokens attend to the
    image independently in the final attention, so it runs for the requested tokens only.
    """
    constants = context.constants
    transformer = constants.decoder.transformer
    mixing = Mixing()
    queries, query_pe = tokens, tokens
    keys = None  # (N, C) image tokens after the previous block; the context stands in before block 0
    for i, layer in enumerate(constants.layers):
        if layer.skip_first_layer_pe:
            queries = constants.self_attention[i](queries, queries)
        else:
            queries = queries + constants.self_attention[i](queries + query_pe, queries)
        queries = layer_norm(layer.norm1, queries)
        t2i = layer.cross_attn_token_to_image
        if i == 0:
            attended = _tokens_to_context(t2i, queries + query_pe, context)
        elif i == 1:
            attended = _tokens_to_first_output(t2i, queries + query_pe, context, mixing)
        else:
            attended = _tokens_to_image(t2i, queries + query_pe, keys, constants.key_pos[i], constants)
        queries = layer_norm(layer.norm2, queries + attended)
        queries = layer_norm(layer.norm3, queries + feed_forward(layer.mlp, queries, constants.dense))
        keys = _image_to_tokens(i, queries + query_pe, queries, keys, context, mixing)
    final = transformer.final_attn_token_to_image
    queries, query_pe = queries[outputs], query_pe[outputs]
    attended = _tokens_to_image(final, queries + query_pe, keys, constants.key_pos[-1], constants)
    return layer_norm(transformer.norm_final_attn, queries + attended), mixing


def _tokens_to_context(attn: Attention, q: torch.Tensor, context: ImageContext) -> torch.Tensor:
    """Token-to-image attention of (T, C) tokens over the per-image projections of block 0."""
    heads, tokens = attn.num_heads, len(q)
    workspace, dense = context.constants.workspace, context.constants.dense
    q = split_heads(dense[attn.q_proj](q), heads)  # (h, T, d)
    q = q * q.shape[-1] ** -0.5
    count = context.keys.shape[-1]
    logits = torch.bmm(q, context.keys, out=workspace.get("t2i logits", heads, tokens, count))  # (h, T, N)
    if context.mask_factors is not None:
        _add_mask_change(context, "keys", q, logits.view(heads * tokens, count))
    weights = torch.softmax(logits, dim=-1, out=workspace.get("t2i weights", heads, tokens, count))
    pooled = torch.bmm(weights, context.values)  # (h, T, d), value bias included
    if context.mask_factors is not None:
        pooled += _mask_change_pooled(context, "values", weights)
    return dense[attn.out_proj](pooled.transpose(0, 1).reshape(tokens, -1))


def _tokens_to_first_output(
    attn: Attention, q: torch.Tensor, context: ImageContext, mixing: Mixing
) -> torch.Tensor:
    """Token-to-image attention of (T, C) tokens in block 1, over block 0's output in low-rank form."""
    constants = context.constants
    heads, tokens, workspace = attn.num_heads, len(q), constants.workspace
    first_weights, rstd = mixing.weights[0], mixing.rstds[0]
    q = split_heads(constants.dense[attn.q_proj](q), heads)  # (h, T, d)
    q = q * q.shape[-1] ** -0.5
    logits = workspace.get("t2i logits", heads * tokens, len(rstd))
    # q.(W_k b_0) is one constant per token and head: it cancels in the softmax.
    projection = constants.second_projections[0]
    _second_block_logits(context, SECOND_KEYS, q, context.second_keys, projection, mixing, logits)
    logits.view(heads, tokens, -1).baddbmm_(q, constants.key_pos[1])  # positional part
    weights = torch.softmax(logits, dim=-1, out=workspace.get("t2i weights", heads * tokens, len(rstd)))
    # sum_n w_n (keys_0 W_v^T)_n = sum_n (w_n r_n)(S + A_0 U)_n + b_0 W_v^T, as the weights sum to one.
    weights = weights.mul_(rstd)
    pooled = torch.bmm(weights.view(heads, tokens, -1), context.second_values)  # (h, T, d)
    if context.mask_factors is not None:
        pooled += _mask_change_pooled(context, SECOND_VALUES, weights.view(heads, tokens, -1))
    mixed = (weights @ first_weights.T).view(heads, tokens, -1)  # (h, T, h T0)
    update = _centred_rows(mixing.values[0]) @ constants.second_projections[1]  # U, (h T0, h d)
    pooled += torch.bmm(mixed, update.view(len(update), heads, -1).transpose(0, 1))
    values = pooled.transpose(0, 1).reshape(tokens, -1) + constants.second_value_bias
    return constants.dense[attn.out_proj](values)


def _second_block_logits(
    context: ImageContext,
    name: str,
    q: torch.Tensor,
    projected: torch.Tensor,
    projection: torch.Tensor,
    mixing: Mixing,
    out: torch.Tensor,
) -> torch.Tensor:
    """(h T, N) products of (h, T, d) queries with block 0's output keys_0 projected by `projection`.

    keys_0 W^T = r_0 (S + A_0 U) + b_0 W^T (see `DecoderConstants._prepare_second_block`); the
    constant b_0 W^T part is left to the caller. `projected` is S as (h, d, N), the context's
    tensor `name`.
    """
    heads, tokens, width = q.shape
    update = _centred_rows(mixing.values[0]) @ projection  # U, (h T0, h d)
    per_row = torch.bmm(q, update.view(len(update), heads, width).permute(1, 2, 0))  # (h, T, h T0)
    torch.mm(per_row.view(heads * tokens, -1), mixing.weights[0], out=out)  # A_0 U part, (h T, N)
    out.view(heads, tokens, -1).baddbmm_(q, projected)  # S part
    if context.mask_factors is not None:
        _add_mask_change(context, name, q, out)
    return out.mul_(mixing.rstds[0])


def _add_mask_change(context: ImageContext, name: str, q: torch.Tensor, out: torch.Tensor) -> None:
    """Adds to (h T, N) `out` the products of (h, T, d) `q` with the change a mask input makes to
    the context's (h, d, N) tensor `name`: M [h; 1], taken as (q M) [h; 1] (`ImageContext.with_mask`)."""
    heads, tokens, _ = q.shape
    per_factor = torch.bmm(q, context.constants.mask_maps[name])  # (h, T, 17)
    out.addmm_(per_factor.view(heads * tokens, -1), context.mask_factors)


def _mask_change_pooled(context: ImageContext, name: str, weights: torch.Tensor) -> torch.Tensor:
    """(h, T, d): (h, T, N) attention `weights` applied to the change a mask input makes to the
    context's values `name` (h, N, d), taken as (weights [h; 1]^T) M^T."""
    heads, tokens, count = weights.shape
    pooled = torch.mm(weights.reshape(heads * tokens, count), context.mask_factors.T)  # (h T, 17)
    return torch.bmm(pooled.view(heads, tokens, -1), context.constants.mask_maps[name].transpose(1, 2))


def _centred_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of (R, C) `x` minus their means."""
    return x - x.mean(1, keepdim=True)


def _tokens_to_image(
    attn: Attention, q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, constants: DecoderConstants
) -> torch.Tensor:
    """Token-to-image attention of (T, C) tokens over (N, C) image tokens (plus positions)."""
    heads, tokens = attn.num_heads, len(q)
    workspace, dense = constants.workspace, constants.dense
    q = split_heads(dense[attn.q_proj](q), heads)  # (h, T, d)
    q = q * q.shape[-1] ** -0.5
    q_in_image_space = torch.bmm(q, split_rows(attn.k_proj.weight, heads))  # (h, T, C)
    rows, count = heads * tokens, len(keys)
    logits = torch.bmm(q, key_pos, out=workspace.get("t2i logits", heads, tokens, count))  # positional part
    logits = logits.view(rows, count).addmm_(q_in_image_space.view(rows, -1), keys.T)
    weights = torch.softmax(logits, dim=-1, out=workspace.get("t2i weights", rows, count))  # (h T, N)
    pooled = (weights @ keys).view(heads, tokens, -1)  # (h, T, C)
    values = torch.bmm(pooled, split_rows(attn.v_proj.weight, heads).transpose(1, 2))  # (h, T, d)
    return dense[attn.out_proj](values.transpose(0, 1).reshape(tokens, -1) + attn.v_proj.bias)


def _image_to_tokens(
    index: int,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor | None,
    context: ImageContext,
    mixing: Mixing,
) -> torch.Tensor:
    """Image-to-token attention, residual and LayerNorm of block `index`; returns the new (N, C) keys.

    `keys` is None for block 0, whose image tokens and their projections come from the context;
    otherwise it is updated in place.
    """
    constants = context.constants
    layer, workspace = constants.layers[index], constants.workspace
    attn, norm = layer.cross_attn_image_to_token, layer.norm4
    heads, tokens = attn.num_heads, len(k)
    k = split_heads(constants.dense[attn.k_proj](k), heads)  # (h, T, d)
    k = k * k.shape[-1] ** -0.5
    v = split_heads(constants.dense[attn.v_proj](v), heads)  # (h, T, d)
    logits = workspace.get("i2t logits", heads, tokens, len(constants.pos))
    if index == 0:
        torch.bmm(k, context.queries, out=logits)  # (h, T, N), query bias included
        if context.mask_factors is not None:
            _add_mask_change(context, "queries", k, logits.view(heads * tokens, -1))
    elif index == 1:  # block 0's output in low-rank form; b_0 W_q^T is in the positional part
        _second_block_logits(
            context,
            SECOND_QUERIES,
            k,
            context.second_queries,
            constants.second_projections[2],
            mixing,
            logits.view(heads * tokens, -1),
        )
        logits.baddbmm_(k, constants.query_pos[index])
    else:
        torch.bmm(k, constants.query_pos[index], out=logits)
        keys_in_image_space = torch.bmm(k, split_rows(attn.q_proj.weight, heads))  # (h, T, C)
        logits.view(heads * tokens, -1).addmm_(keys_in_image_space.view(heads * tokens, -1), keys.T)
    rows = heads * tokens
    # Block 0's weights share their buffer with a mask input's factors F = [h; 1], below them: the
    # tokens' change D^T F (D = `mask_maps["tokens"]`) joins the residual's product.
    factors = 0 if keys is not None or context.mask_factors is None else len(context.mask_factors)
    buffer = workspace.get(f"i2t weights {index}", rows + factors, len(constants.pos))
    weights = buffer[:rows]  # kept for upscaling
    torch.softmax(logits, dim=1, out=weights.view(heads, tokens, -1))  # over the T tokens of each head
    # Each head's weights sum to one over the tokens, so out_bias / h on every value row adds out_bias.
    values = torch.bmm(v, constants.out_heads[index]).view(rows, -1) + attn.out_proj.bias / heads
    if keys is None:
        right = values
        if factors:
            buffer[rows:].copy_(context.mask_factors)
            right = torch.cat([values, constants.mask_maps["tokens"]])
        residual = workspace.get("residual", *constants.pos.shape)
        keys = torch.addmm(context.image_tokens, buffer.T, right, out=residual)
    else:
        keys.addmm_(weights.T, values)  # the previous keys are not needed any more
    keys, mean, rstd = torch.native_layer_norm(keys, (keys.shape[-1],), norm.weight, norm.bias, norm.eps)
    if index == 0:  # relative to the per-image tokens' own means, as the context's projection
        mean = values.mean(1) @ weights
    mixing.weights.append(weights)
    mixing.values.append(values)
    mixing.means.append(mean.view(-1))
    mixing.rstds.append(rstd.view(-1))
    return keys


# -- upscaling ----------------------------------------------------------------------------------


def _upscale_and_project(context: ImageContext, mixing: Mixing, hyper_in: torch.Tensor) -> torch.Tensor:
    """Upscale the image tokens 4x and take each mask token's dot product, as (M, 4H, 4W)."""
    constants, workspace = context.constants, context.constants.workspace
    norm = constants.upscale_norm
    height, width = constants.grid
    left, right, scale = _upscaling_input(context, mixing)
    x = torch.mul(context.projected, scale[:, None], out=workspace.get("conv1", *context.projected.shape))
    x.addmm_(left.T, right)  # conv1 of the final image tokens, (N, 4 * C1) ordered (dy, dx, c)
    x = F.layer_norm(x.view(-1, norm.weight.shape[0]), norm.weight.shape, norm.weight, norm.bias, norm.eps)
    x = torch._C._nn.gelu_(x)  # (4 N, C1)
    y = constants.conv2(x, workspace.get("conv2", len(x), len(constants.conv2.bias)))  # (4 N, 4 * C2)
    masks = torch.mm(
        y.view(-1, hyper_in.shape[1]), hyper_in.T, out=workspace.get("masks", len(y) * 4, len(hyper_in))
    )
    # One gather with precomputed indices: the 7-dimensional permuted copy is several times slower.
    ordered = masks.view(-1).index_select(0, constants.mask_order(len(hyper_in)))
    return ordered.view(-1, 4 * height, 4 * width)


def _upscaling_input(
    context: ImageContext, mixing: Mixing
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors of conv1(keys_L) = s_0 * P + left^T right: left (K, N), right (K, 4 C1), s_0 (N,).

    With block l's LayerNorm keys_l = r_l (Y_l - mu_l) g_l + b_l (r_l, mu_l per token) of the
    residual sum Y_0 = x + A_0 V_0 and Y_l = keys_(l-1) + A_l V_l, unrolling keys_L W^T + c gives
      s_0 (x M_0) + sum_l [(s_l A_l)(V_l M_l) - (s_l mu_l) m_l] + sum_(l>=1) s_l (b_(l-1) M_l)
        + (b_L W^T + c),
    where s_l = r_l r_(l+1) ... r_L scales per token and M_l, m_l are the chain of
    `DecoderConstants`. P = x M_0 is made once per image from x minus its per-token means, which
    the block-0 means therefore leave out (they are the means of A_0 V_0).
    """
    constants = context.constants
    scales = [mixing.rstds[-1]]
    for rstd in reversed(mixing.rstds[:-1]):
        scales.insert(0, rstd * scales[0])
    factors = context.mask_factors
    rows = sum(len(w) + 2 for w in mixing.weights) + (0 if factors is None else len(factors))
    left = constants.workspace.get("left", rows, len(constants.pos))
    right = []
    row = 0
    for layer, (weights, values, mean, scale) in enumerate(
        zip(mixing.weights, mixing.values, mixing.means, scales)
    ):
        torch.mul(weights, scale, out=left[row : row + len(weights)])
        right.append(values @ constants.chain[layer])
        row += len(weights)
        torch.mul(scale, mean, out=left[row]).neg_()
        right.append(constants.chain_sums[layer][None])
        row += 1
        if layer > 0:
            left[row].copy_(scale)
            right.append(constants.chain_biases[layer][None])
            row += 1
    if factors is not None:  # P's change by a mask input, scaled as P
        torch.mul(factors, scales[0], out=left[row : row + len(factors)])
        right.append(constants.mask_maps["projected"])
        row += len(factors)
    left[row].fill_(1.0)
    right.append(constants.chain_constant[None])
    return left[: row + 1], torch.cat(right), scales[0]
