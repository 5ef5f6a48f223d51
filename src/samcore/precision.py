"""Numeric precision of the image encoder: fp32; bf16 where the device runs it fast; int8 on CPUs."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator

import torch

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BF16_MIN_SPEEDUP = 1.3  # below this, bf16 costs accuracy for too little time


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matrix products on `device` are clearly faster than fp32.

    True for CUDA GPUs with bf16 support. On a CPU it depends on more than its instruction set:
    measured, a 2-core Xeon with AVX-512 bf16 dot products ran them at 160 GFLOPS against 267 in
    fp32, while a 2-core AMD EPYC (Zen 4) with the same instructions ran them at 230 against 95.
    So on CPUs the two are timed once per process (`cpu_bf16_speedup`: about 0.1 s, most of it
    oneDNN's start-up, which the first bf16 image would pay anyway).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    return False


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """fp32 time over bf16 time of an encoder-sized matrix product on this CPU (best of 5 each)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 768, generator=generator)
    b = torch.randn(768, 768, generator=generator)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        torch.mm(x, y)  # first call: kernel selection and allocation
        times = []
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        return best(a, b) / best(a.bfloat16(), b.bfloat16())


def resolve_precision(precision: str, model: torch.nn.Module) -> str:
    """Turn "auto" into "bf16" where bf16 is fast on `model`'s device, else "fp32"; check explicit choices.

    "int8" (linear layers of a ViT encoder as int8 products, see `samcore.modeling.int8`) is never
    chosen by "auto": its masks stay faithful on the weights it was measured with, but it needs a
    C++ compiler and compiles for about 10 s on first use, so it is a choice for batch work.

    Args:
        precision: "auto", "fp32", "bf16" or "int8".
        model: The model whose parameters' device decides.

    Returns:
        "fp32", "bf16" or "int8".
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    device = next(model.parameters()).device
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if precision == "bf16" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"bf16 is not available on {device.type}; use precision='fp32'.")
    if precision == "int8":
        from .modeling.image_encoder import ImageEncoderViT

        if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 2):
            raise ValueError(f"int8 encoding needs torch 2.2 or newer (this is {torch.__version__}).")
        if device.type != "cpu":
            raise ValueError(f"int8 encoding runs on the CPU, and this model is on {device.type}; use bf16.")
        encoder = getattr(model, "image_encoder", None)
        if not isinstance(encoder, ImageEncoderViT):
            raise ValueError(
                f"int8 encoding is for SAM's ViT encoders (vit_b, vit_l, vit_h and their finetunes), not "
                f"{type(encoder).__name__}; use precision='fp32'."
            )
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Run the enclosed code in bf16 autocast when `precision` is "bf16"."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
