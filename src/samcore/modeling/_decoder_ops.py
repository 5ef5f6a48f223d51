"""Matrix helpers of the fast decoder: the token side's small products and the image side's buffers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, MLPBlock
from .linear import onednn_linear, through_onednn
from .transformer import Attention


class Dense:
    """A linear layer for a few rows: its weight transposed once into a contiguous (in, out) matrix."""

    __slots__ = ("bias", "weight_t")

    def __init__(self, linear: nn.Linear) -> None:
        self.weight_t = linear.weight.T.contiguous()
        self.bias = linear.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(R, in) -> (R, out)."""
        product = torch.mm(x, self.weight_t)
        return product if self.bias is None else product.add_(self.bias)


class SelfAttention:
    """The tokens' self-attention, with the q and k (and v) projections of one input in one product."""

    def __init__(self, attn: Attention, dense: dict[nn.Module, Dense]) -> None:
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
        q, k, v = (split_heads(x, self.heads)[None] for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)[0]  # (h, T, d)
        return self.out(out.transpose(0, 1).reshape(len(qk), -1))


class LinearGelu:
    """GELU(x W^T + b) for (R, in) rows: through oneDNN's product with the GELU fused in where the
    encoders' `Linear` takes that path (`samcore.modeling.linear`), else a product and a GELU in place."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight.contiguous()  # (out, in)
        self.weight_t = weight.T.contiguous()
        self.bias = bias

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(R, in) -> (R, out); `out` is the buffer of the product and GELU in place."""
        if through_onednn(x, self.weight):
            return onednn_linear(x, self.weight, self.bias, "gelu", "none")
        return torch._C._nn.gelu_(torch.addmm(self.bias, x, self.weight_t, out=out))


def feed_forward(mlp: MLPBlock, x: torch.Tensor, dense: dict[nn.Module, Dense]) -> torch.Tensor:
    rows = len(x)
    if rows % 8 == 7:  # the 7 tokens of a box or a click: MKL multiplies 8 rows by the 2048-wide
        # matrices about a fifth faster than 7 (0.39 against 0.50 ms a block on a 2-core Zen 4)
        x = torch.cat([x, x.new_zeros(1, x.shape[1])])
    hidden = dense[mlp.lin1](x)
    hidden = hidden.relu_() if isinstance(mlp.act, nn.ReLU) else mlp.act(hidden)
    return dense[mlp.lin2](hidden)[:rows]


def mlp_head(mlp: MLP, x: torch.Tensor, dense: dict[nn.Module, Dense]) -> torch.Tensor:
    """The decoder's `MLP` heads on (R, C) rows."""
    last = len(mlp.layers) - 1
    for i, layer in enumerate(mlp.layers):
        x = dense[layer](x)
        if i < last:
            x = x.relu_()
    return torch.sigmoid(x) if mlp.sigmoid_output else x


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# -- small helpers ------------------------------------------------------------------------------


class Workspace:
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


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(T, h * d) -> (h, T, d)."""
    return x.view(len(x), heads, -1).transpose(0, 1)


def split_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(h * d, C) projection weight -> (h, d, C)."""
    return weight.view(heads, -1, weight.shape[-1])


def project_t(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x_t: torch.Tensor,
    heads: int,
    workspace: Workspace | None = None,
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


def out_heads(attn: Attention) -> torch.Tensor:
    """Output projection (C, h * d) as (h, d, C): the rows that head h's values multiply."""
    return attn.out_proj.weight.T.reshape(attn.num_heads, -1, attn.out_proj.out_features)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(C_in, C_out, 2, 2) transposed-convolution weight -> (4 * C_out, C_in) ordered (dy, dx, c)."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])
