"""Small building blocks shared by the SAM modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear, linear_gelu
from .winograd import Conv2d


class LayerNorm2d(nn.Module):
    """Layer normalisation over the channel axis of a (B, C, H, W) tensor.

    Args:
        num_channels: Number of channels C.
        eps: Added to the variance for numerical stability.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not x.is_contiguous(memory_format=torch.channels_last):
            # A (B, C, H, W) map in float32, such as the prompt encoder's mask downscaling (4 and 16
            # channels): the mean and variance over the channels, as SAM computes them, take a third
            # of the time of the fused norm below, which reads the channels through two transposing
            # copies here.
            mean = x.mean(1, keepdim=True)
            centred = x - mean
            variance = centred.square().mean(1, keepdim=True)
            normed = centred / torch.sqrt(variance + self.eps)
            return self.weight[:, None, None] * normed + self.bias[:, None, None]
        # One fused layer norm over the channels, read as the last axis: the encoders' necks get
        # channels-last maps, where that view is contiguous. Computed separately, the mean, variance,
        # scaling and shift took several times as long, and in bf16 rounded each step.
        out = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        out = out.permute(0, 3, 1, 2)
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def encoder_neck(embed_dim: int, out_chans: int) -> nn.Sequential:
    """SAM's image-encoder neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (keys `neck.0` to `neck.3`).

    Takes (B, embed_dim, h, w) tokens to the (B, out_chans, h, w) image embedding.
    """
    return nn.Sequential(
        nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans),
        Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),  # by Winograd where faster
        LayerNorm2d(out_chans),
    )


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (the transformer feed-forward)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = Linear(embedding_dim, mlp_dim)
        self.lin2 = Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.act, nn.GELU):
            hidden = linear_gelu(self.lin1, x, self.act.approximate)
        else:
            hidden = self.act(self.lin1(x))
        return self.lin2(hidden)


class MLP(nn.Module):
    """A stack of linear layers with ReLU between them (the decoder's heads).

    Args:
        input_dim: Features in.
        hidden_dim: Features of every hidden layer.
        output_dim: Features out.
        num_layers: Number of linear layers.
        sigmoid_output: Apply a sigmoid to the output.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
