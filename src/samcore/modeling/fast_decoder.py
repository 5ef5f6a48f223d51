"""A faster evaluation of SAM's mask decoder for interactive use, with the same parameters.

This module holds what is made once per model (`DecoderConstants`) and once per image (`ImageContext`);
`_decoder_prompt` decodes one prompt from them, with the matrix helpers of `_decoder_ops`.

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
  the channels, so each product of a prompt that reads a projection of the image context adds
  that change in low-rank form, and nothing image-sized is made for the mask (`with_mask`).
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
linear layer) multiplies weights transposed once into contiguous (in, out) matrices (`Dense`):
for so few rows that is about twice as fast as `F.linear` on the stored (out, in) weights.
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from ..cancel import check as check_cancel
from ._decoder_ops import Dense, LinearGelu, SelfAttention, Workspace, as_matrix, out_heads, project_t
from ._decoder_prompt import SECOND_KEYS, SECOND_QUERIES, SECOND_VALUES, decode_one
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayAttentionBlock

# The second block's per-image projections (keys and values of token-to-image attention, queries
# of image-to-token attention), in the order of `DecoderConstants.second_projections`.
SECOND_NAMES = (SECOND_KEYS, SECOND_VALUES, SECOND_QUERIES)


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
        # Block 0's keys (token-to-image; their bias cancels in the softmax) and queries (image-to-token)
        # of the image tokens with positions: one product per image.
        first = self.layers[0]
        keys, queries = first.cross_attn_token_to_image.k_proj, first.cross_attn_image_to_token.q_proj
        self.first_projections = torch.cat([keys.weight, queries.weight])
        self.first_bias = torch.cat([queries.bias.new_zeros(keys.out_features), queries.bias])[:, None]
        t2i = [layer.cross_attn_token_to_image for layer in self.layers] + [
            transformer.final_attn_token_to_image
        ]
        i2t = [layer.cross_attn_image_to_token for layer in self.layers]
        # Block 0 sees per-image projections (ImageContext); later ones add the positional part alone.
        self.key_pos = [None] + [project_t(attn.k_proj.weight, None, pos, attn.num_heads) for attn in t2i[1:]]
        self.query_pos = [None] + [
            project_t(attn.q_proj.weight, attn.q_proj.bias, pos, attn.num_heads) for attn in i2t[1:]
        ]
        self.out_heads = [out_heads(attn) for attn in i2t]
        self.dense = {module: Dense(module) for module in decoder.modules() if isinstance(module, nn.Linear)}
        self.self_attention = [SelfAttention(layer.self_attn, self.dense) for layer in self.layers]
        if len(self.layers) > 1:
            self._prepare_second_block()
        self._prepare_upscaling(decoder)
        self.mask_hidden: nn.Module | None = None
        if prompt_encoder is not None:
            self._prepare_mask_inputs(prompt_encoder)
        self._orders: dict[int, torch.Tensor] = {}
        self.workspace = Workspace(pos.device, pos.dtype)
        # For the contexts its owner keeps at a time (see `ImageContext`); never the per-prompt one.
        self._context_spaces: list[Workspace] = []
        self.lock = threading.Lock()  # the workspace serves one prompt at a time

    def _prepare_second_block(self) -> None:
        # Block 1 projects block 0's output keys_0 = r_0 (Y_0 - mu_0) g_0 + b_0 with a weight W as
        # keys_0 W^T = r_0 (S + A_0 U) + b_0 W^T, with S = x_c diag(g_0) W^T made once per image
        # (x_c: the per-image tokens centred per token) and U = V_c diag(g_0) W^T from the block-0
        # values V centred per row: see `_second_block_logits`.
        norm, second = self.layers[0].norm4, self.layers[1]
        t2i, i2t = second.cross_attn_token_to_image, second.cross_attn_image_to_token
        self.second_projections = [
            norm.weight[:, None] * w.T for w in (t2i.k_proj.weight, t2i.v_proj.weight, i2t.q_proj.weight)
        ]
        self.second_stack = torch.cat([projection.T for projection in self.second_projections])  # one product
        self.second_value_bias = t2i.v_proj(norm.bias)  # b_0 W_v^T + b_v: the pooled values' constant
        # b_0 W_q^T does not cancel in a softmax over tokens: it joins the positional part.
        pos_and_bias = (self.pos + norm.bias).T
        self.query_pos[1] = project_t(i2t.q_proj.weight, i2t.q_proj.bias, pos_and_bias, i2t.num_heads)

    def _prepare_upscaling(self, decoder: MaskDecoder) -> None:
        conv1, norm, _, conv2, _ = decoder.output_upscaling
        self.upscale_norm = norm
        # conv2 and its GELU, ordered (dy, dx, c); its bias is added by the product (a pass of its own
        # took 2% of a prompt's time)
        self.conv2 = LinearGelu(as_matrix(conv2.weight), conv2.bias.repeat(4))
        # The chain of `_upscaling_input`: M_L = diag(g_L) W^T and M_l = diag(g_l) M_(l+1), with W the
        # conv1 matrix and g_l, b_l the weight and bias of block l's last LayerNorm.
        conv1_t = as_matrix(conv1.weight).T  # (C, 4 * C1)
        chain = [self.layers[-1].norm4.weight[:, None] * conv1_t]
        for layer in reversed(self.layers[:-1]):
            chain.insert(0, layer.norm4.weight[:, None] * chain[0])
        self.chain = chain  # M_l, (C, 4 * C1)
        self.chain_sums = [matrix.sum(0) for matrix in chain]  # m_l = 1^T M_l
        self.chain_biases = [None] + [
            prev.norm4.bias @ matrix for prev, matrix in zip(self.layers, chain[1:])
        ]
        self.chain_constant = self.layers[-1].norm4.bias @ conv1_t + conv1.bias.repeat(4)

    def _prepare_mask_inputs(self, prompt_encoder: PromptEncoder) -> None:
        # How a mask input changes each per-image tensor of `ImageContext`, per channel of [h; 1]:
        # the tokens change by D = change @ [h; 1], their per-token centred form by centred @ [h; 1].
        *hidden, last = prompt_encoder.mask_downscaling
        self.mask_hidden = nn.Sequential(*hidden)
        offset = last.bias - prompt_encoder.no_mask_embed.weight[0]
        change = torch.cat([last.weight.flatten(1), offset[:, None]], dim=1)  # (C, 17)
        centred = change - change.mean(0)
        # The projections' maps are (h, d, 17), one per head; the tokens' (17, C), P's (17, 4 C1).
        first = self.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        heads = t2i.num_heads
        self.mask_maps = {
            "keys": (t2i.k_proj.weight @ change).view(heads, -1, change.shape[1]),
            "queries": (i2t.q_proj.weight @ change).view(i2t.num_heads, -1, change.shape[1]),
            "values": (t2i.v_proj.weight @ change).view(heads, -1, change.shape[1]),
            "tokens": change.T.contiguous(),
            "projected": centred.T @ self.chain[0],
        }
        if len(self.layers) > 1:
            second_heads = self.layers[1].cross_attn_token_to_image.num_heads
            for name, projection in zip(SECOND_NAMES, self.second_projections):
                self.mask_maps[name] = (projection.T @ centred).view(second_heads, -1, change.shape[1])

    def context_space(self, index: int = 0) -> Workspace:
        """The workspace of the `index`-th image context an owner keeps (one per view of an image)."""
        while len(self._context_spaces) <= index:
            self._context_spaces.append(Workspace(self.pos.device, self.pos.dtype))
        return self._context_spaces[index]

    def mask_order(self, masks: int) -> torch.Tensor:
        """Indices taking (N * 16, M) token-ordered mask values to (M, 4H, 4W) image order."""
        if masks not in self._orders:
            height, width = self.grid
            order = torch.arange(height * width * 16 * masks, device=self.pos.device)
            order = order.view(height, width, 2, 2, 2, 2, masks)  # y, x, dy1, dx1, dy2, dx2, mask
            # to mask, y, dy1, dy2, x, dx1, dx2
            self._orders[masks] = order.permute(6, 0, 2, 4, 1, 3, 5).flatten()
        return self._orders[masks]


class ImageContext:
    """The prompt-independent part of decoding one image: its tokens as the first block sees them.

    Valid for every prompt without a mask input (whose dense embedding is one constant vector); a
    mask input changes the image tokens and needs its own context.

    Args:
        constants: The model's `DecoderConstants`.
        image_tokens_t: (C, N) image embedding plus dense prompt embedding, one column per grid cell.
            Kept, when it is the transpose of a contiguous (N, C) matrix: it must not change while the
            context is used.
        workspace: Where the context's tensors live. A caller that makes one context per image, and
            drops the previous one first (as `Predictor` does), passes the same workspace each time
            and so reuses its memory: a fresh tensor costs a page fault per 4 KiB on first touch,
            about as much as the arithmetic here. By default, new tensors.
    """

    def __init__(
        self, constants: DecoderConstants, image_tokens_t: torch.Tensor, workspace: Workspace | None = None
    ) -> None:
        self.constants = constants
        space = workspace if workspace is not None else Workspace(image_tokens_t.device, image_tokens_t.dtype)
        layer = constants.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        channels, count = image_tokens_t.shape
        # SAM's image encoders end channels-last, so the tokens usually come as the transpose of an
        # (N, C) matrix: that is the layout `image_tokens` keeps (without a copy), and the products below
        # take a third less time on one copy in (C, N) layout than on the transposed matrix.
        tokens = image_tokens_t.T
        if not image_tokens_t.is_contiguous():
            image_tokens_t = space.get("tokens_t", channels, count).copy_(image_tokens_t)
        if not tokens.is_contiguous():
            tokens = space.get("tokens", count, channels).copy_(tokens)
        self.image_tokens = tokens  # (N, C)
        tokens_pos = torch.add(image_tokens_t, constants.pos_t, out=space.get("tokens+pos", channels, count))
        projections = constants.first_projections
        both = space.get("keys+queries", len(projections), count)
        both = torch.addmm(constants.first_bias, projections, tokens_pos, out=both)
        keys, queries = both.split([t2i.k_proj.out_features, i2t.q_proj.out_features])
        self.keys = keys.view(t2i.num_heads, -1, count)  # (h, d, N)
        self.queries = queries.view(i2t.num_heads, -1, count)  # query bias included
        values = project_t(t2i.v_proj.weight, t2i.v_proj.bias, image_tokens_t, t2i.num_heads, space, "values")
        self.values = values.transpose(1, 2)  # (h, N, d), value bias included
        # Projections of the tokens centred per token (`_upscaling_input`, `_second_block_logits`):
        # a common offset of the embedding would otherwise be added here and cancelled there,
        # costing float32 precision.
        centred = torch.sub(image_tokens_t, image_tokens_t.mean(0), out=space.get("centred", channels, count))
        chain = constants.chain[0]
        self.projected = torch.mm(centred.T, chain, out=space.get("projected", count, chain.shape[1]))  # P
        if len(constants.layers) > 1:
            heads = constants.layers[1].cross_attn_token_to_image.num_heads
            stack = constants.second_stack
            second = torch.mm(stack, centred, out=space.get("second", len(stack), count))
            keys, values, queries = (part.view(heads, -1, count) for part in second.chunk(3))
            self.second_keys, self.second_queries = keys, queries  # (h, d, N)
            self.second_values = values.transpose(1, 2)  # (h, N, d)
        self.mask_factors: torch.Tensor | None = None  # [h; 1] of a mask input (`with_mask`)

    def with_mask(self, hidden: torch.Tensor) -> ImageContext:
        """The context of this image with a mask input, from this (no-mask) context.

        The mask input changes every per-image tensor by a product of rank 17, M @ [h; 1] (see
        `DecoderConstants._prepare_mask_inputs`). Those changes are not made here: the new context
        shares this one's tensors and holds the factors [h; 1], and each product of a prompt that
        reads a tensor adds its change in that low-rank form (`_decoder_prompt`). Made whole, they
        were 5 million floats written once and read once, a quarter of such a prompt's time.

        Args:
            hidden: (16, N) the mask downscaling's last hidden layer (`DecoderConstants.mask_hidden`,
                made with a prompt encoder) for the mask input.

        Returns:
            A context for prompts with that mask input; this one is left as it was.
        """
        context = copy.copy(self)
        context.mask_factors = torch.cat([hidden, hidden.new_ones(1, hidden.shape[1])])  # [h; 1], (17, N)
        return context

    def decode(
        self, tokens: torch.Tensor, multimask_output: bool, min_score: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and IoU predictions of one prompt.

        Args:
            tokens: (T, C) output tokens followed by the prompt's sparse embeddings.
            multimask_output: The 3 multimask outputs instead of the single one.
            min_score: When every predicted IoU is below it, the masks are not made: their logits
                are all -1e4 (empty masks).

        Returns:
            Low-resolution logits (M, 4H, 4W) and predicted IoUs (M,), M = 3 or 1.

        Raises:
            samcore.cancel.Cancelled: The thread's cancel event (`samcore.cancel.stopping_on`) is set:
                a batch of prompts, such as segment-all's points, stops within one prompt.
        """
        check_cancel()
        with self.constants.lock:
            return decode_one(self, tokens, multimask_output, min_score)


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
    context: ImageContext,
    sparse_prompt_embeddings: torch.Tensor,
    multimask_output: bool,
    min_score: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.forward` for prompts without a mask input, on the image of `context`.

    Args:
        context: The image's `ImageContext`, made with the no-mask dense embedding.
        sparse_prompt_embeddings: (B, T', C).
        multimask_output: Return the 3 multimask outputs instead of the single one.
        min_score: The masks of a prompt whose predicted IoUs are all below it are not made (see
            `ImageContext.decode`).

    Returns:
        Low-resolution mask logits (B, M, 4H, 4W) and predicted IoUs (B, M), M = 3 or 1.
    """
    decoder = context.constants.decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    results = [
        context.decode(torch.cat([output_tokens, sparse], dim=0), multimask_output, min_score)
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
    for sparse, features in zip(sparse_prompt_embeddings, hidden):
        mask_context = context.with_mask(features)
        mask, score = mask_context.decode(torch.cat([output_tokens, sparse], dim=0), multimask_output)
        masks.append(mask)
        scores.append(score)
    return torch.stack(masks), torch.stack(scores)
