"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3), for float32 inference on a CPU.

A 3x3 convolution of stride 1 costs 9 multiply-adds per input channel, output channel and pixel.
Winograd's algorithm computes each 4x4 block of outputs from the 6x6 block of inputs around it with
36 products per channel pair instead of 144: the input blocks and the weights are each taken to a
6x6 "transformed" space by small fixed matrices, multiplied there (36 independent matrix products,
one per transformed position, over the channels), and the results taken back. The SAM neck's 3x3
convolution (256 to 256 channels on the 64x64 grid: 2.4 billion multiply-adds) is 30% of the
bundled model's arithmetic (8.2 billion), and this way needs 0.6 billion plus the transforms.

The transforms round differently from a direct convolution: on random layers of the neck's size the
largest difference from a float64 convolution was about 1e-5 of the output's scale (4e-5 on outputs
of scale 5), where oneDNN's direct float32 convolution was at 2e-6. Products under bf16 autocast
would round the transformed inputs to bf16 and lose far more, so only float32 takes this path.

Whether it pays depends on the CPU and the layer. On a 2-core AMD EPYC (Zen 4) the neck's layer took
14 to 15 ms against 22 to 23 ms for oneDNN's direct convolution, and with PyTorch, oneDNN and MKL held
to AVX2 (as on most laptops; `ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`, `MKL_ENABLE_INSTRUCTIONS`)
16 ms against 29 ms; a 128-channel layer on that grid came out faster or slower from one run to the
next. So each input shape is timed both ways once per process (`winograd_is_faster`, about 0.2 s
for the neck's shape; for one image, whatever the batch) and this path taken only where it is clearly
faster.

`Conv2d` is `nn.Conv2d` with the same parameters (checkpoints load unchanged); it takes this path
for 3x3 convolutions of stride 1, padding 1, one group, in float32 inference on a CPU without
autocast, and runs `nn.Conv2d` otherwise (training, GPUs, bf16).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import best_time
from .linear import cpu_autocast_dtype
from .versions import tensor_versions

MIN_SPEEDUP = 1.1  # the Winograd path must beat the direct convolution by this much on the probe
TILE = 4  # outputs per block side: F(4x4, 3x3)
BLOCK = TILE + 2  # inputs per block side

# Lavin and Gray's F(4, 3) matrices, interpolation points 0, 1, -1, 2, -2 and infinity:
# y = A^T [(G g G^T) * (B^T d B)] A for a 6x6 input block d and a 3x3 kernel g (a correlation, as
# convolutions in PyTorch are).
_INPUT = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=torch.float64,
)  # B^T
_KERNEL = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)  # G
_OUTPUT = torch.tensor(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=torch.float64
)  # A^T


@functools.cache
def _block_transforms(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output transforms of whole blocks, as float32 matrices acting on blocks read row
    by row: (36, 36) kron(B^T, B^T) and (16, 36) kron(A^T, A^T)."""
    return (
        torch.kron(_INPUT, _INPUT).float().to(device),
        torch.kron(_OUTPUT, _OUTPUT).float().to(device),
    )


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) kernels as (36, C, K) float32: G g G^T at each of the 36 transformed positions,
    computed in float64."""
    kernel = _KERNEL.to(weight.device)
    transformed = torch.einsum("rk,ockl,sl->rsco", kernel, weight.detach().double(), kernel)
    return transformed.reshape(BLOCK * BLOCK, weight.shape[1], weight.shape[0]).float().contiguous()


def winograd_conv3x3(x: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3 convolution of stride 1 and zero padding 1, by F(4x4, 3x3).

    Args:
        x: (B, C, H, W) float32 input, in any memory layout.
        transformed: (36, C, K) kernels from `transform_weight`.
        bias: (K,) or None.

    Returns:
        (B, K, H, W): channels-last where `x` is, else contiguous.
    """
    batch, channels, height, width = x.shape
    outputs = transformed.shape[2]
    rows, cols = -(-height // TILE), -(-width // TILE)  # blocks down and across
    to_blocks, from_blocks = _block_transforms(x.device)
    # Zero padding of 1, and at the bottom and right up to whole blocks.
    padded = F.pad(
        x.permute(0, 2, 3, 1), (0, 0, 1, TILE * cols + 1 - width, 1, TILE * rows + 1 - height)
    )  # (B, H', W', C)
    blocks = padded.unfold(1, BLOCK, TILE).unfold(2, BLOCK, TILE)  # (B, rows, cols, C, 6, 6), a view
    gathered = blocks.permute(4, 5, 0, 1, 2, 3).reshape(BLOCK * BLOCK, -1)  # (36, B rows cols C)
    inputs = torch.mm(to_blocks, gathered).view(BLOCK * BLOCK, -1, channels)  # B^T d B
    products = torch.bmm(inputs, transformed)  # (36, B rows cols, K)
    out = torch.mm(from_blocks, products.view(BLOCK * BLOCK, -1))  # (16, B rows cols K): A^T m A
    out = out.view(TILE, TILE, batch, rows, cols, outputs).permute(2, 3, 0, 4, 1, 5)
    out = out.reshape(batch, TILE * rows, TILE * cols, outputs)[:, :height, :width]
    result = x.new_empty(batch, height, width, outputs)
    if bias is None:
        result.copy_(out)
    else:
        torch.add(out, bias, out=result)
    out = result.permute(0, 3, 1, 2)  # channels-last (B, K, H, W)
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` whose 3x3, stride-1 float32 inference on a CPU may run by Winograd's algorithm
    (see the module's text)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Probed for one image of the batch's shape: a batch takes the path of its images one at a
        # time, so that embedding slices together rounds as embedding them one by one does.
        if self._takes_winograd(x) and winograd_is_faster(
            (1, *x.shape[1:]), self.out_channels, x.is_contiguous(memory_format=torch.channels_last)
        ):
            return winograd_conv3x3(x, self._transformed(), self.bias)
        return super().forward(x)

    def _takes_winograd(self, x: torch.Tensor) -> bool:
        return (
            self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and x.dim() == 4
            and x.numel() > 0
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and cpu_autocast_dtype() is None
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        )

    def _transformed(self) -> torch.Tensor:
        """The transformed weight, made again whenever the weight is replaced or changed in place."""
        key = tensor_versions([self.weight])
        cached = self.__dict__.get("_winograd")
        if cached is None or cached[0] != key:
            cached = (key, transform_weight(self.weight))
            self.__dict__["_winograd"] = cached
        return cached[1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_winograd", None)  # derived from the weight; remade on use
        return state


@functools.lru_cache(maxsize=64)
def winograd_is_faster(shape: tuple[int, int, int, int], outputs: int, channels_last: bool) -> bool:
    """Whether `winograd_conv3x3` of a (B, C, H, W) input with `outputs` channels is clearly faster
    here than `F.conv2d`: timed once per process on random data of that shape, best of 3 each."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(outputs, shape[1], 3, 3, generator=generator)
    transformed = transform_weight(weight)
    with torch.inference_mode():
        direct = best_time(lambda a, w: F.conv2d(a, w, padding=1), x, weight, 3)
        winograd = best_time(lambda a, u: winograd_conv3x3(a, u, None), x, transformed, 3)
    return direct >= MIN_SPEEDUP * winograd
