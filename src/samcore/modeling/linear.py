"""Linear layers whose inference on a CPU runs through oneDNN's kernels, with their weights made ready once.

float32: PyTorch multiplies a float32 `nn.Linear` on the CPU with MKL. It also ships oneDNN, whose
fused linear can apply a GELU as it writes the product. On a 2-core AMD EPYC (Zen 4), oneDNN ran the
four linear layers of a ViT-B block 10 to 20% faster than MKL, and a whole fp32 ViT-B embedding 13%
faster (paired runs); other CPUs may differ, so the two are timed once per process on an
encoder-sized product (`onednn_is_faster`) and oneDNN is used only where it is clearly faster and
gives the same product.

bf16 (under CPU autocast, as `Predictor(precision="bf16")` runs the encoder): autocast converts every
weight to bf16 again for each image, and oneDNN reorders it into its own layout for each product.
Here each layer keeps its weight converted and reordered (`packed_bf16`), made again if the weight
changes; the product is the one autocast gives, bit for bit. That holds a bf16 copy of the encoder's
linear weights for as long as the model lives (170 MB for ViT-B, 1.2 GB for ViT-H), as autocast
itself does while an image is embedded.

Only inference takes these paths: with autograd recording, off the CPU or in other dtypes, `Linear`
is `nn.Linear`. `torch.backends.mkldnn.enabled = False` turns them off. The layers are `nn.Linear`
subclasses with the same parameters, so checkpoints load into them unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import best_time
from .versions import tensor_versions

MIN_SPEEDUP = 1.05  # oneDNN must beat MKL by this much on the probe product
PROBE = (512, 768, 3072)  # rows, inner, columns: ViT-B's first MLP layer on 512 tokens
PACKED_ROWS = 4096  # the rows oneDNN's bf16 weight layout is chosen for: a 64 x 64 token grid
_ALGORITHMS = {"none", "tanh"}  # nn.GELU's approximations, as oneDNN's fused GELU names them


class Linear(nn.Linear):
    """`nn.Linear` whose CPU inference may run through oneDNN (see the module's text)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if through_onednn(x, self.weight):
            return onednn_linear(x, self.weight, self.bias, "none", "")
        if bf16_through_onednn(x, self.weight):
            return onednn_linear(x.to(torch.bfloat16), *packed_bf16(self), "none", "")
        return F.linear(x, self.weight, self.bias)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_packed_bf16", None)  # oneDNN's opaque tensors neither copy nor pickle; remade on use
        return state


def linear_gelu(layer: nn.Linear, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(layer(x)): fused into oneDNN's product where `Linear` would use it; in place without autograd.

    Args:
        layer: The linear layer.
        x: (..., in) inputs.
        approximate: nn.GELU's `approximate` ("none" or "tanh").

    Returns:
        (..., out) activations.
    """
    if approximate in _ALGORITHMS and isinstance(layer, Linear):
        if through_onednn(x, layer.weight):
            return onednn_linear(x, layer.weight, layer.bias, "gelu", approximate)
        if bf16_through_onednn(x, layer.weight):
            return onednn_linear(x.to(torch.bfloat16), *packed_bf16(layer), "gelu", approximate)
    hidden = layer(x)
    if hidden.requires_grad:
        return F.gelu(hidden, approximate=approximate)
    # Inference: in place spares the widest tensor a second buffer, and on a CPU a fresh
    # multi-megabyte buffer costs a page fault per 4 KiB (7 % of the bundled encoder's time on a
    # 2-core EPYC; same values).
    return torch._C._nn.gelu_(hidden, approximate=approximate)


def through_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of `x` with `weight` (out, in) goes through oneDNN: float32 inference on a
    CPU where oneDNN is faster."""
    return (
        inference_on_cpu(x, weight)
        and x.dtype == torch.float32
        and cpu_autocast_dtype() is None
        and onednn_is_faster()
    )


def bf16_through_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of `x` with float32 `weight` goes through oneDNN with a packed bf16 weight:
    inference under the CPU's bf16 autocast."""
    return (
        inference_on_cpu(x, weight)
        and x.dtype in (torch.float32, torch.bfloat16)
        and cpu_autocast_dtype() == torch.bfloat16
        and bf16_packing_works()
    )


def inference_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A product with a float32 weight, on the CPU, that autograd does not record, with oneDNN on."""
    return (
        x.device.type == "cpu"
        and weight.dtype == torch.float32
        and x.numel() > 0
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and torch.backends.mkldnn.enabled
    )


def cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype of the CPU's autocast where it is on, else None."""
    if hasattr(torch, "get_autocast_dtype"):  # PyTorch 2.4 and later
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def packed_bf16(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight in bf16, reordered for oneDNN, and its bias in bf16: made once, and again
    whenever the weight or bias is replaced or (outside inference mode) changed in place."""
    tensors = [layer.weight] if layer.bias is None else [layer.weight, layer.bias]
    key = tensor_versions(tensors)
    cached = layer.__dict__.get("_packed_bf16")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.to(torch.bfloat16), PACKED_ROWS)
            cached = (key, packed, None if layer.bias is None else layer.bias.to(torch.bfloat16))
        layer.__dict__["_packed_bf16"] = cached
    return cached[1], cached[2]


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, algorithm: str
) -> torch.Tensor:
    """(..., in) `x` times (out, in) `weight` plus `bias`, then `activation` ("none" or "gelu", with
    `algorithm` "none" or "tanh" for the GELU; "" without), by oneDNN: (..., out)."""
    # Strided operands take a path hundreds of times slower: a (4096, 64) weight with rows 2304
    # apart took 16 s a product instead of 0.05. A packed (opaque) weight is contiguous as it is.
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if not weight.is_mkldnn:
        weight = weight.contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, activation, [None], algorithm)
    return out.view(*x.shape[:-1], weight.shape[0])


@functools.lru_cache(maxsize=1)
def onednn_is_faster() -> bool:
    """Whether oneDNN's float32 linear runs here, gives MKL's product, and is clearly faster.

    Timed once per process on a (512, 768) x (768, 3072) product, best of three calls each: about
    0.1 s, at the first embedding.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    rows, inner, columns = PROBE
    x = torch.randn(rows, inner, generator=generator)
    weight = torch.randn(columns, inner, generator=generator) * inner**-0.5
    bias = torch.randn(columns, generator=generator)
    with torch.inference_mode():
        expected = F.linear(x, weight, bias)
        try:
            product = onednn_linear(x, weight, bias, "none", "")
            activated = onednn_linear(x, weight, bias, "gelu", "none")
        except (AttributeError, RuntimeError, TypeError):  # a build without oneDNN's fused linear
            return False
        if not (
            torch.allclose(product, expected, rtol=1e-4, atol=1e-4)
            and torch.allclose(activated, F.gelu(expected), rtol=1e-4, atol=1e-4)
        ):
            return False
        mkl = best_time(lambda a, b: F.linear(a, b, bias), x, weight, 3)
        onednn = best_time(lambda a, b: onednn_linear(a, b, bias, "none", ""), x, weight, 3)
    return mkl >= MIN_SPEEDUP * onednn


@functools.lru_cache(maxsize=1)
def bf16_packing_works() -> bool:
    """Whether oneDNN's bf16 product with a packed weight runs here and gives autocast's product."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(False):  # a probe layer made under inference mode would be odd to cache
        layer = nn.utils.skip_init(Linear, 64, 48)  # no draw from the global random generator
        with torch.no_grad():
            layer.weight.copy_(torch.randn(48, 64, generator=generator) / 8)
            layer.bias.copy_(torch.randn(48, generator=generator))
    x = torch.randn(40, 64, generator=generator)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, layer.weight, layer.bias).float()
        try:
            product = onednn_linear(x.to(torch.bfloat16), *packed_bf16(layer), "none", "").float()
        except (AttributeError, RuntimeError, TypeError):  # a build without oneDNN's packed bf16 weights
            return False
    return torch.allclose(product, expected, rtol=2e-2, atol=2e-2)
