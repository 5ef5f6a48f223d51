"""A faster evaluation of SAM's mask decoder for interactive use, with the same parameters.

The rewrites are exact in exact arithmetic (results differ by float rounding only):

* Attention between the few prompt tokens (T ~ 7) and the N = 4096 image tokens never projects the
  image tokens anew. For token-to-image attention, q.(W_k x + b_k) = (W_k^T q).x + const, and the
  constant cancels in the softmax; the weights sum to one, so A (W_v x + b_v) = W_v (A x) + b_v.
  Image-to-token attention folds W_q and W_o in the same way. The positional encoding enters
  through its own projections, made once per model, so no image-sized sum `keys + pos` is formed.
* The first two-way block sees the same image tokens for every prompt without a mask input, so its
  projections of the image tokens are made once per image (`ImageContext`). A mask input adds
  W h + b - d0 to those tokens, with h the 16 channels of the mask downscaling's last hidden layer
  (its last layer is a 1x1 convolution W, b) and d0 the no-mask embedding: a change of rank 17 in
  the channels, so each projection of the image context gets a thin update (`with_mask`).
* The final attention only feeds the IoU token and the mask tokens that are returned, and tokens
  attend to the image independently, so it runs for those tokens alone.
* The first transposed convolution of the upscaling is linear, and the image tokens it sees are the
  per-image tokens, rescaled and shifted per token by each block's LayerNorm, plus mixtures of h T
  attention value rows per block. Unrolled, conv1(keys) = s * P + A' U' with P the per-image tokens
  through the convolution (made once per image), s a per-token scale and A' (N, ~2 h T) U' a thin
  product: about half the work of the convolution (see `_upscaling_input`).
* The stride-2, kernel-2 transposed convolutions are per-token matrix products whose outputs stay in
  token order until the masks are formed, then gathered once into image order.

Large intermediates live in buffers reused from one prompt to the next: on a CPU, a fresh
multi-megabyte tensor costs a page fault per 4 KiB on first touch. The token side (a few rows per
linear layer) multiplies weights transposed once into contiguous (in, out) matrices (`_Dense`):
for so few rows that is about twice as fast as `F.linear` on the stored (out, in) weights.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, MLPBlock
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import Attention, TwoWayAttentionBlock

# The second block's per-image projections (keys and values of token-to-image attention, queries
# of image-to-token attention), in the order of `DecoderConstants.second_projections`.
SECOND_NAMES = ("second keys", "second values", "second queries")


class DecoderConstants:
    """What the decoder derives from its weights and the positional encoding alone: once per model.

    Args:
        decoder: The mask decoder.
        image_pe: (1, C, H, W) positional encoding of the image-embedding grid.
        prompt_encoder: The model's prompt encoder, for decoding mask inputs from an image's
            no-mask context (`decode_with_masks`); without it, only `decode_masks` takes them.
    """

    def __init__(
        self, decoder: MaskDecoder, image_pe: torch.Tensor, prompt_encoder: PromptEncoder | None = None
    ) -> None:
        transformer = decoder.transformer
        self.decoder = decoder
        self.layers: list[TwoWayAttentionBlock] = list(transformer.layers)
        self.grid: tuple[int, int] = tuple(image_pe.shape[-2:])
        pos = image_pe[0].flatten(1)  # (C, N)
        self.pos_t = pos.contiguous()
        self.pos = pos.T  # (N, C)
        t2i = [layer.cross_attn_token_to_image for layer in self.layers] + [transformer.final_attn_token_to_image]
        i2t = [layer.cross_attn_image_to_token for layer in self.layers]
        # Block 0 sees per-image projections (ImageContext); later ones add the positional part alone.
        self.key_pos = [None] + [_project_t(attn.k_proj.weight, None, pos, attn.num_heads) for attn in t2i[1:]]
        self.query_pos = [None] + [
            _project_t(attn.q_proj.weight, attn.q_proj.bias, pos, attn.num_heads) for attn in i2t[1:]
        ]
        self.out_heads = [_out_heads(attn) for attn in i2t]
        self.dense = {module: _Dense(module) for module in decoder.modules() if isinstance(module, nn.Linear)}
        self.self_attention = [_SelfAttention(layer.self_attn, self.dense) for layer in self.layers]
        if len(self.layers) > 1:
            self._prepare_second_block()
        self._prepare_upscaling(decoder)
        self.mask_hidden: nn.Module | None = None
        if prompt_encoder is not None:
            self._prepare_mask_inputs(prompt_encoder)
        self._orders: dict[int, torch.Tensor] = {}
        self.workspace = _Workspace(pos.device, pos.dtype)
        # For the contexts its owner keeps at a time (see `ImageContext`); never the per-prompt one.
        self._context_spaces: list[_Workspace] = []
        self.lock = threading.Lock()  # the workspace serves one prompt at a time
        self.mask_space = _Workspace(pos.device, pos.dtype)  # the context of one mask input at a time
        self.mask_lock = threading.Lock()

    def _prepare_second_block(self) -> None:
        # Block 1 projects block 0's output keys_0 = r_0 (Y_0 - mu_0) g_0 + b_0 with a weight W as
        # keys_0 W^T = r_0 (S + A_0 U) + b_0 W^T, with S = x_c diag(g_0) W^T made once per image
        # (x_c: the per-image tokens centred per token) and U = V_c diag(g_0) W^T from the block-0
        # values V centred per row: see `_second_block_logits`.
        norm, second = self.layers[0].norm4, self.layers[1]
        t2i, i2t = second.cross_attn_token_to_image, second.cross_attn_image_to_token
        self.second_projections = [norm.weight[:, None] * w.T for w in (t2i.k_proj.weight, t2i.v_proj.weight, i2t.q_proj.weight)]
        self.second_value_bias = t2i.v_proj(norm.bias)  # b_0 W_v^T + b_v: the pooled values' constant
        # b_0 W_q^T does not cancel in a softmax over tokens: it joins the positional part.
        pos_and_bias = (self.pos + norm.bias).T
        self.query_pos[1] = _project_t(i2t.q_proj.weight, i2t.q_proj.bias, pos_and_bias, i2t.num_heads)

    def _prepare_upscaling(self, decoder: MaskDecoder) -> None:
        conv1, norm, _, conv2, _ = decoder.output_upscaling
        self.upscale_norm = norm
        self.conv2_matrix_t = _as_matrix(conv2.weight).T.contiguous()  # (C1, 4 * C2)
        self.conv2_bias = conv2.bias.repeat(4)  # ordered (dy, dx, c) like the matrix
        # The chain of `_upscaling_input`: M_L = diag(g_L) W^T and M_l = diag(g_l) M_(l+1), with W the
        # conv1 matrix and g_l, b_l the weight and bias of block l's last LayerNorm.
        conv1_t = _as_matrix(conv1.weight).T  # (C, 4 * C1)
        chain = [self.layers[-1].norm4.weight[:, None] * conv1_t]
        for layer in reversed(self.layers[:-1]):
            chain.insert(0, layer.norm4.weight[:, None] * chain[0])
        self.chain = chain  # M_l, (C, 4 * C1)
        self.chain_sums = [matrix.sum(0) for matrix in chain]  # m_l = 1^T M_l
        self.chain_biases = [None] + [prev.norm4.bias @ matrix for prev, matrix in zip(self.layers, chain[1:])]
        self.chain_constant = self.layers[-1].norm4.bias @ conv1_t + conv1.bias.repeat(4)

    def _prepare_mask_inputs(self, prompt_encoder: PromptEncoder) -> None:
        # How a mask input changes each per-image tensor of `ImageContext`, per channel of [h; 1]:
        # the tokens change by D = change @ [h; 1], their per-token centred form by centred @ [h; 1].
        *hidden, last = prompt_encoder.mask_downscaling
        self.mask_hidden = nn.Sequential(*hidden)
        offset = last.bias - prompt_encoder.no_mask_embed.weight[0]
        change = torch.cat([last.weight.flatten(1), offset[:, None]], dim=1)  # (C, 17)
        centred = change - change.mean(0)
        first = self.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        self.mask_maps = {
            "keys": t2i.k_proj.weight @ change,
            "queries": i2t.q_proj.weight @ change,
            "values": t2i.v_proj.weight @ change,
            "tokens": change.T.contiguous(),
            "projected": centred.T @ self.chain[0],
        }
        if len(self.layers) > 1:
            for name, projection in zip(SECOND_NAMES, self.second_projections):
                self.mask_maps[name] = projection.T @ centred

    def context_space(self, index: int = 0) -> _Workspace:
        """The workspace of the `index`-th image context an owner keeps (one per view of an image)."""
        while len(self._context_spaces) <= index:
            self._context_spaces.append(_Workspace(self.pos.device, self.pos.dtype))
        return self._context_spaces[index]

    def mask_order(self, masks: int) -> torch.Tensor:
        """Indices taking (N * 16, M) token-ordered mask values to (M, 4H, 4W) image order."""
        if masks not in self._orders:
            height, width = self.grid
            order = torch.arange(height * width * 16 * masks, device=self.pos.device)
            order = order.view(height, width, 2, 2, 2, 2, masks)  # y, x, dy1, dx1, dy2, dx2, mask
            self._orders[masks] = order.permute(6, 0, 2, 4, 1, 3, 5).flatten()  # mask, y, dy1, dy2, x, dx1, dx2
        return self._orders[masks]


class ImageContext:
    """The prompt-independent part of decoding one image: its tokens as the first block sees them.

    Valid for every prompt without a mask input (whose dense embedding is one constant vector); a
    mask input changes the image tokens and needs its own context.

    Args:
        constants: The model's `DecoderConstants`.
        image_tokens_t: (C, N) image embedding plus dense prompt embedding, one column per grid cell
            (the embedding's own layout, so nothing image-sized is transposed but `image_tokens`).
        workspace: Where the context's tensors live. A caller that makes one context per image, and
            drops the previous one first (as `Predictor` does), passes the same workspace each time
            and so reuses its memory: a fresh tensor costs a page fault per 4 KiB on first touch,
            about as much as the arithmetic here. By default, new tensors.
    """

    def __init__(
        self, constants: DecoderConstants, image_tokens_t: torch.Tensor, workspace: _Workspace | None = None
    ) -> None:
        self.constants = constants
        space = workspace if workspace is not None else _Workspace(image_tokens_t.device, image_tokens_t.dtype)
        layer = constants.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        channels, count = image_tokens_t.shape
        tokens_pos = torch.add(image_tokens_t, constants.pos_t, out=space.get("tokens+pos", channels, count))
        self.keys = _project_t(t2i.k_proj.weight, None, tokens_pos, t2i.num_heads, space, "keys")  # (h, d, N)
        self.queries = _project_t(
            i2t.q_proj.weight, i2t.q_proj.bias, tokens_pos, i2t.num_heads, space, "queries"
        )
        values = _project_t(t2i.v_proj.weight, t2i.v_proj.bias, image_tokens_t, t2i.num_heads, space, "values")
        self.values = values.transpose(1, 2)  # (h, N, d), value bias included
        self.image_tokens = space.get("tokens", count, channels).copy_(image_tokens_t.T)  # (N, C)
        # Projections of the tokens centred per token (`_upscaling_input`, `_second_block_logits`):
        # a common offset of the embedding would otherwise be added here and cancelled there,
        # costing float32 precision.
        centred = torch.sub(image_tokens_t, image_tokens_t.mean(0), out=space.get("centred", channels, count))
        chain = constants.chain[0]
        self.projected = torch.mm(centred.T, chain, out=space.get("projected", count, chain.shape[1]))  # P
        if len(constants.layers) > 1:
            heads = constants.layers[1].cross_attn_token_to_image.num_heads
            keys, values, queries = (
                _project_t(w.T, None, centred, heads, space, name)
                for w, name in zip(constants.second_projections, SECOND_NAMES)
            )
            self.second_keys, self.second_queries = keys, queries  # (h, d, N)
            self.second_values = values.transpose(1, 2)  # (h, N, d)

    def with_mask(self, hidden: torch.Tensor, workspace: _Workspace | None = None) -> ImageContext:
        """The context of this image with a mask input, from this (no-mask) context.

        Args:
            hidden: (16, N) the mask downscaling's last hidden layer (`DecoderConstants.mask_hidden`,
                made with a prompt encoder) for the mask input.
            workspace: Where the new context's tensors live; by default, new tensors.

        Returns:
            A context for prompts with that mask input; this one is left as it was.
        """
        constants = self.constants
        maps = constants.mask_maps
        space = workspace if workspace is not None else _Workspace(hidden.device, hidden.dtype)
        factors = torch.cat([hidden, hidden.new_ones(1, hidden.shape[1])])  # [h; 1], (17, N)

        def updated(name: str, base: torch.Tensor) -> torch.Tensor:
            heads, width, count = base.shape  # (h, d, N)
            flat = base.reshape(heads * width, count)
            out = space.get(name, heads * width, count)
            return torch.addmm(flat, maps[name], factors, out=out).view(heads, width, count)

        context = ImageContext.__new__(ImageContext)
        context.constants = constants
        context.keys = updated("keys", self.keys)
        context.queries = updated("queries", self.queries)
        context.values = updated("values", self.values.transpose(1, 2)).transpose(1, 2)
        tokens, projected = self.image_tokens, self.projected
        context.image_tokens = torch.addmm(
            tokens, factors.T, maps["tokens"], out=space.get("tokens", *tokens.shape)
        )
        context.projected = torch.addmm(
            projected, factors.T, maps["projected"], out=space.get("projected", *projected.shape)
        )
        if len(constants.layers) > 1:
            context.second_keys = updated(SECOND_NAMES[0], self.second_keys)
            values = updated(SECOND_NAMES[1], self.second_values.transpose(1, 2))
            context.second_values = values.transpose(1, 2)
            context.second_queries = updated(SECOND_NAMES[2], self.second_queries)
        return context

    def decode(self, tokens: torch.Tensor, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and IoU predictions of one prompt.

        Args:
            tokens: (T, C) output tokens followed by the prompt's sparse embeddings.
            multimask_output: The 3 multimask outputs instead of the single one.

        Returns:
            Low-resolution logits (M, 4H, 4W) and predicted IoUs (M,), M = 3 or 1.
        """
        with self.constants.lock:
            return _decode_one(self, tokens, multimask_output)


def decode_masks(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor | None,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    multimask_output: bool,
    constants: DecoderConstants | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same inputs and outputs as `MaskDecoder.forward`, evaluated with the rewrites above.

    Args:
        decoder: The mask decoder.
        image_embeddings: (1 or B, C, H, W); one embedding is shared by all B prompts.
        image_pe: (1, C, H, W) positional encoding; may be None when `constants` are given.
        sparse_prompt_embeddings: (B, T', C).
        dense_prompt_embeddings: (B, C, H, W).
        multimask_output: Return the 3 multimask outputs instead of the single one.
        constants: The decoder's `DecoderConstants` for `image_pe`, if kept; made here otherwise.

    Returns:
        Low-resolution mask logits (B, M, 4H, 4W) and predicted IoUs (B, M), M = 3 or 1.
    """
    if constants is None:
        constants = DecoderConstants(decoder, image_pe)
    # An expanded dense embedding (no mask input) is one tensor for all prompts: one context serves.
    shared = len(image_embeddings) == 1 and dense_prompt_embeddings.stride(0) == 0
    masks, scores, context = [], [], None
    for b, sparse in enumerate(sparse_prompt_embeddings):
        if context is None or not shared:
            image = image_embeddings[b if len(image_embeddings) > 1 else 0] + dense_prompt_embeddings[b]
            context = ImageContext(constants, image.flatten(1))
        mask, score = decode_prompts(context, sparse[None], multimask_output)
        masks.append(mask[0])
        scores.append(score[0])
    return torch.stack(masks), torch.stack(scores)


def decode_prompts(
    context: ImageContext, sparse_prompt_embeddings: torch.Tensor, multimask_output: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.forward` for prompts without a mask input, on the image of `context`.

    Args:
        context: The image's `ImageContext`, made with the no-mask dense embedding.
        sparse_prompt_embeddings: (B, T', C).
        multimask_output: Return the 3 multimask outputs instead of the single one.

    Returns:
        Low-resolution mask logits (B, M, 4H, 4W) and predicted IoUs (B, M), M = 3 or 1.
    """
    decoder = context.constants.decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    results = [
        context.decode(torch.cat([output_tokens, sparse], dim=0), multimask_output)
        for sparse in sparse_prompt_embeddings
    ]
    return torch.stack([masks for masks, _ in results]), torch.stack([scores for _, scores in results])


def decode_with_masks(
    context: ImageContext,
    sparse_prompt_embeddings: torch.Tensor,
    mask_input: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.forward` for prompts with a mask input each, from the image's no-mask context.

    Args:
        context: The image's `ImageContext` (no mask input), whose constants were made with the
            prompt encoder.
        sparse_prompt_embeddings: (B, T', C).
        mask_input: (B, 1, 4H, 4W) low-resolution logits, one per prompt.
        multimask_output: Return the 3 multimask outputs instead of the single one.

    Returns:
        Low-resolution mask logits (B, M, 4H, 4W) and predicted IoUs (B, M), M = 3 or 1.
    """
    constants = context.constants
    if constants.mask_hidden is None:
        raise ValueError("Decoding with a mask input needs DecoderConstants made with the prompt encoder.")
    hidden = constants.mask_hidden(mask_input).flatten(2)  # (B, 16, N)
    decoder = constants.decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    masks, scores = [], []
    with constants.mask_lock:  # one mask context in the workspace at a time
        for sparse, features in zip(sparse_prompt_embeddings, hidden):
            mask_context = context.with_mask(features, constants.mask_space)
            mask, score = mask_context.decode(torch.cat([output_tokens, sparse], dim=0), multimask_output)
            masks.append(mask)
            scores.append(score)
    return torch.stack(masks), torch.stack(scores)


# -- one prompt ---------------------------------------------------------------------------------


def _decode_one(context: ImageContext, tokens: torch.Tensor, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    decoder = context.constants.decoder
    picked = slice(1, None) if multimask_output else slice(0, 1)
    masks = range(decoder.num_mask_tokens)[picked]
    outputs, mixing = _transformer(context, tokens, [0, *(1 + m for m in masks)])
    dense = context.constants.dense
    iou_pred = _head(decoder.iou_prediction_head, outputs[:1], dense)[0, picked]
    mlps = decoder.output_hypernetworks_mlps
    hyper_in = torch.cat([_head(mlps[m], outputs[1 + i : 2 + i], dense) for i, m in enumerate(masks)])  # M, C2
    return _upscale_and_project(context, mixing, hyper_in), iou_pred


class _Mixing:
    """How each block's image-to-token attention and LayerNorm changed the image tokens."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []  # (h T, N) attention weights per block
        self.values: list[torch.Tensor] = []  # (h T, C) value rows per block, output bias folded in
        self.means: list[torch.Tensor] = []  # (N,) LayerNorm means per block; block 0: see below
        self.rstds: list[torch.Tensor] = []  # (N,) LayerNorm reciprocal standard deviations per block


def _transformer(context: ImageContext, tokens: torch.Tensor, outputs: list[int]) -> tuple[torch.Tensor, _Mixing]:
    """The two-way transformer on (T, C) tokens.

    Returns the final tokens at indices `outputs` and the image-token mixing. Tokens attend to the
    image independently in the final attention, so it runs for the requested tokens only.
    """
    constants = context.constants
    transformer = constants.decoder.transformer
    mixing = _Mixing()
    queries, query_pe = tokens, tokens
    keys = None  # (N, C) image tokens after the previous block; the context stands in before block 0
    for i, layer in enumerate(constants.layers):
        if layer.skip_first_layer_pe:
            queries = constants.self_attention[i](queries, queries)
        else:
            queries = queries + constants.self_attention[i](queries + query_pe, queries)
        queries = _norm(layer.norm1, queries)
        t2i = layer.cross_attn_token_to_image
        if i == 0:
            attended = _tokens_to_context(t2i, queries + query_pe, context)
        elif i == 1:
            attended = _tokens_to_first_output(t2i, queries + query_pe, context, mixing)
        else:
            attended = _tokens_to_image(t2i, queries + query_pe, keys, constants.key_pos[i], constants)
        queries = _norm(layer.norm2, queries + attended)
        queries = _norm(layer.norm3, queries + _feed_forward(layer.mlp, queries, constants.dense))
        keys = _image_to_tokens(i, queries + query_pe, queries, keys, context, mixing)
    final = transformer.final_attn_token_to_image
    queries, query_pe = queries[outputs], query_pe[outputs]
    attended = _tokens_to_image(final, queries + query_pe, keys, constants.key_pos[-1], constants)
    return _norm(transformer.norm_final_attn, queries + attended), mixing


def _tokens_to_context(attn: Attention, q: torch.Tensor, context: ImageContext) -> torch.Tensor:
    """Token-to-image attention of (T, C) tokens over the per-image projections of block 0."""
    heads, tokens = attn.num_heads, len(q)
    workspace, dense = context.constants.workspace, context.constants.dense
    q = _split_heads(dense[attn.q_proj](q), heads)  # (h, T, d)
    count = context.keys.shape[-1]
    logits = torch.bmm(q * q.shape[-1] ** -0.5, context.keys, out=workspace.get("t2i logits", heads, tokens, count))
    weights = torch.softmax(logits, dim=-1, out=workspace.get("t2i weights", heads, tokens, count))  # (h, T, N)
    pooled = torch.bmm(weights, context.values)  # (h, T, d), value bias included
    return dense[attn.out_proj](pooled.transpose(0, 1).reshape(tokens, -1))


def _tokens_to_first_output(attn: Attention, q: torch.Tensor, context: ImageContext, mixing: _Mixing) -> torch.Tensor:
    """Token-to-image attention of (T, C) tokens in block 1, over block 0's output in low-rank form."""
    constants = context.constants
    heads, tokens, workspace = attn.num_heads, len(q), constants.workspace
    first_weights, rstd = mixing.weights[0], mixing.rstds[0]
    q = _split_heads(constants.dense[attn.q_proj](q), heads)  # (h, T, d)
    q = q * q.shape[-1] ** -0.5
    logits = workspace.get("t2i logits", heads * tokens, len(rstd))
    # q.(W_k b_0) is one constant per token and head: it cancels in the softmax.
    _second_block_logits(q, context.second_keys, constants.second_projections[0], mixing, logits)
    logits.view(heads, tokens, -1).baddbmm_(q, constants.key_pos[1])  # positional part
    weights = torch.softmax(logits, dim=-1, out=workspace.get("t2i weights", heads * tokens, len(rstd)))
    # sum_n w_n (keys_0 W_v^T)_n = sum_n (w_n r_n)(S + A_0 U)_n + b_0 W_v^T, as the weights sum to one.
    weights = weights.mul_(rstd)
    pooled = torch.bmm(weights.view(heads, tokens, -1), context.second_values)  # (h, T, d)
    mixed = (weights @ first_weights.T).view(heads, tokens, -1)  # (h, T, h T0)
    update = _centred_rows(mixing.values[0]) @ constants.second_projections[1]  # U, (h T0, h d)
    pooled += torch.bmm(mixed, update.view(len(update), heads, -1).transpose(0, 1))
    values = pooled.transpose(0, 1).reshape(tokens, -1) + constants.second_value_bias
    return constants.dense[attn.out_proj](values)


def _second_block_logits(
    q: torch.Tensor, projected: torch.Tensor, projection: torch.Tensor, mixing: _Mixing, out: torch.Tensor
) -> torch.Tensor:
    """(h T, N) products of (h, T, d) queries with block 0's output keys_0 projected by `projection`.

    keys_0 W^T = r_0 (S + A_0 U) + b_0 W^T (see `DecoderConstants._prepare_second_block`); the
    constant b_0 W^T part is left to the caller. `projected` is S as (h, d, N).
    """
    heads, tokens, width = q.shape
    update = _centred_rows(mixing.values[0]) @ projection  # U, (h T0, h d)
    per_row = torch.bmm(q, update.view(len(update), heads, width).permute(1, 2, 0))  # (h, T, h T0)
    torch.mm(per_row.view(heads * tokens, -1), mixing.weights[0], out=out)  # A_0 U part, (h T, N)
    out.view(heads, tokens, -1).baddbmm_(q, projected)  # S part
    return out.mul_(mixing.rstds[0])


def _centred_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of (R, C) `x` minus their means."""
    return x - x.mean(1, keepdim=True)


def _tokens_to_image(
    attn: Attention, q: torch.Tensor, keys: torch.Tensor, key_pos: torch.Tensor, constants: DecoderConstants
) -> torch.Tensor:
    """Token-to-image attention of (T, C) tokens over (N, C) image tokens (plus positions)."""
    heads, tokens = attn.num_heads, len(q)
    workspace, dense = constants.workspace, constants.dense
    q = _split_heads(dense[attn.q_proj](q), heads)  # (h, T, d)
    q = q * q.shape[-1] ** -0.5
    q_in_image_space = torch.bmm(q, _split_rows(attn.k_proj.weight, heads))  # (h, T, C)
    rows, count = heads * tokens, len(keys)
    logits = torch.bmm(q, key_pos, out=workspace.get("t2i logits", heads, tokens, count))  # positional part
    logits = logits.view(rows, count).addmm_(q_in_image_space.view(rows, -1), keys.T)
    weights = torch.softmax(logits, dim=-1, out=workspace.get("t2i weights", rows, count))  # (h T, N)
    pooled = (weights @ keys).view(heads, tokens, -1)  # (h, T, C)
    values = torch.bmm(pooled, _split_rows(attn.v_proj.weight, heads).transpose(1, 2))  # (h, T, d)
    return dense[attn.out_proj](values.transpose(0, 1).reshape(tokens, -1) + attn.v_proj.bias)


def _image_to_tokens(
    index: int, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None, context: ImageContext, mixing: _Mixing
) -> torch.Tensor:
    """Image-to-token attention, residual and LayerNorm of block `index`; returns the new (N, C) keys.

    `keys` is None for block 0, whose image tokens and their projections come from the context;
    otherwise it is updated in place.
    """
    constants = context.constants
    layer, workspace = constants.layers[index], constants.workspace
    attn, norm = layer.cross_attn_image_to_token, layer.norm4
    heads, tokens = attn.num_heads, len(k)
    k = _split_heads(constants.dense[attn.k_proj](k), heads)  # (h, T, d)
    k = k * k.shape[-1] ** -0.5
    v = _split_heads(constants.dense[attn.v_proj](v), heads)  # (h, T, d)
    logits = workspace.get("i2t logits", heads, tokens, len(constants.pos))
    if index == 0:
        torch.bmm(k, context.queries, out=logits)  # (h, T, N), query bias included
    elif index == 1:  # block 0's output in low-rank form; b_0 W_q^T is in the positional part
        _second_block_logits(k, context.second_queries, constants.second_projections[2], mixing, logits.view(heads * tokens, -1))
        logits.baddbmm_(k, constants.query_pos[index])
    else:
        torch.bmm(k, constants.query_pos[index], out=logits)
        keys_in_image_space = torch.bmm(k, _split_rows(attn.q_proj.weight, heads))  # (h, T, C)
        logits.view(heads * tokens, -1).addmm_(keys_in_image_space.view(heads * tokens, -1), keys.T)
    weights = workspace.get(f"i2t weights {index}", heads * tokens, len(constants.pos))  # kept for upscaling
    torch.softmax(logits, dim=1, out=weights.view(heads, tokens, -1))  # over the T tokens of each head
    # Each head's weights sum to one over the tokens, so out_bias / h on every value row adds out_bias.
    values = torch.bmm(v, constants.out_heads[index]).view(heads * tokens, -1) + attn.out_proj.bias / heads
    if keys is None:
        keys = torch.addmm(context.image_tokens, weights.T, values, out=workspace.get("residual", *constants.pos.shape))
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


def _upscale_and_project(context: ImageContext, mixing: _Mixing, hyper_in: torch.Tensor) -> torch.Tensor:
    """Upscale the image tokens 4x and take each mask token's dot product, as (M, 4H, 4W)."""
    constants, workspace = context.constants, context.constants.workspace
    norm = constants.upscale_norm
    height, width = constants.grid
    left, right, scale = _upscaling_input(context, mixing)
    x = torch.mul(context.projected, scale[:, None], out=workspace.get("conv1", *context.projected.shape))
    x.addmm_(left.T, right)  # conv1 of the final image tokens, (N, 4 * C1) ordered (dy, dx, c)
    x = F.layer_norm(x.view(-1, norm.weight.shape[0]), norm.weight.shape, norm.weight, norm.bias, norm.eps)
    x = torch._C._nn.gelu_(x)  # (4 N, C1)
    y = torch.mm(x, constants.conv2_matrix_t, out=workspace.get("conv2", len(x), len(constants.conv2_bias)))
    y = torch._C._nn.gelu_(y.add_(constants.conv2_bias))  # (4 N, 4 * C2)
    masks = torch.mm(y.view(-1, hyper_in.shape[1]), hyper_in.T, out=workspace.get("masks", len(y) * 4, len(hyper_in)))
    # One gather with precomputed indices: the 7-dimensional permuted copy is several times slower.
    ordered = masks.view(-1).index_select(0, constants.mask_order(len(hyper_in)))
    return ordered.view(-1, 4 * height, 4 * width)


def _upscaling_input(context: ImageContext, mixing: _Mixing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    rows = sum(len(w) + 2 for w in mixing.weights)
    left = constants.workspace.get("left", rows, len(constants.pos))
    right = []
    row = 0
    for layer, (weights, values, mean, scale) in enumerate(zip(mixing.weights, mixing.values, mixing.means, scales)):
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
    left[row].fill_(1.0)
    right.append(constants.chain_constant[None])
    return left[: row + 1], torch.cat(right), scales[0]


# -- token side ---------------------------------------------------------------------------------


class _Dense:
    """A linear layer for a few rows: its weight transposed once into a contiguous (in, out) matrix."""

    __slots__ = ("weight_t", "bias")

    def __init__(self, linear: nn.Linear) -> None:
        self.weight_t = linear.weight.T.contiguous()
        self.bias = linear.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(R, in) -> (R, out)."""
        product = torch.mm(x, self.weight_t)
        return product if self.bias is None else product.add_(self.bias)


class _SelfAttention:
    """The tokens' self-attention, with the q and k (and v) projections of one input in one product."""

    def __init__(self, attn: Attention, dense: dict[nn.Module, _Dense]) -> None:
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv_t = torch.cat([dense[p].weight_t for p in projections], dim=1)  # (C, 3 w)
        self.qkv_bias = torch.cat([p.bias for p in projections])
        self.width = attn.q_proj.out_features
        self.value, self.out, self.heads = dense[attn.v_proj], dense[attn.out_proj], attn.num_heads

    def __call__(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of (T, C) queries and keys `qk` over values `v` (which may be `qk` itself)."""
        width = self.width
        if v is qk:
            q, k, v = torch.mm(qk, self.qkv_t).add_(self.qkv_bias).split(width, dim=1)
        else:
            q, k = torch.mm(qk, self.qkv_t[:, : 2 * width]).add_(self.qkv_bias[: 2 * width]).split(width, 1)
            v = self.value(v)
        q, k, v = (_split_heads(x, self.heads)[None] for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)[0]  # (h, T, d)
        return self.out(out.transpose(0, 1).reshape(len(qk), -1))


def _feed_forward(mlp: MLPBlock, x: torch.Tensor, dense: dict[nn.Module, _Dense]) -> torch.Tensor:
    hidden = dense[mlp.lin1](x)
    hidden = hidden.relu_() if isinstance(mlp.act, nn.ReLU) else mlp.act(hidden)
    return dense[mlp.lin2](hidden)


def _head(mlp: MLP, x: torch.Tensor, dense: dict[nn.Module, _Dense]) -> torch.Tensor:
    """The decoder's `MLP` heads on (R, C) rows."""
    last = len(mlp.layers) - 1
    for i, layer in enumerate(mlp.layers):
        x = dense[layer](x)
        if i < last:
            x = x.relu_()
    return torch.sigmoid(x) if mlp.sigmoid_output else x


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# -- small helpers ------------------------------------------------------------------------------


class _Workspace:
    """Named buffers reused from one prompt to the next, grown when a prompt needs more room."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._device, self._dtype = device, dtype

    def get(self, name: str, *shape: int) -> torch.Tensor:
        """The buffer `name` as a tensor of `shape`; its content is left over from earlier use."""
        view = self._views.get((name, shape))
        if view is None:
            numel = math.prod(shape)
            buffer = self._buffers.get(name)
            if buffer is None or buffer.numel() < numel:
                buffer = self._buffers[name] = torch.empty(numel, device=self._device, dtype=self._dtype)
                self._views = {key: view for key, view in self._views.items() if key[0] != name}
            view = self._views[name, shape] = buffer[:numel].view(shape)
        return view


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(T, h * d) -> (h, T, d)."""
    return x.view(len(x), heads, -1).transpose(0, 1)


def _split_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(h * d, C) projection weight -> (h, d, C)."""
    return weight.view(heads, -1, weight.shape[-1])


def _project_t(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x_t: torch.Tensor,
    heads: int,
    workspace: _Workspace | None = None,
    name: str = "",
) -> torch.Tensor:
    """Projection of (C, N) image tokens, transposed and split into heads: (h, d, N).

    With a workspace, the result lives in its buffer `name`.
    """
    out = None if workspace is None else workspace.get(name, weight.shape[0], x_t.shape[1])
    if bias is None:
        projected = torch.mm(weight, x_t, out=out)
    else:
        projected = torch.addmm(bias[:, None], weight, x_t, out=out)
    return projected.view(heads, -1, x_t.shape[1])


def _out_heads(attn: Attention) -> torch.Tensor:
    """Output projection (C, h * d) as (h, d, C): the rows that head h's values multiply."""
    return attn.out_proj.weight.T.reshape(attn.num_heads, -1, attn.out_proj.out_features)


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(C_in, C_out, 2, 2) transposed-convolution weight -> (4 * C_out, C_in) ordered (dy, dx, c)."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])
