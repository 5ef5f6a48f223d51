"""Numeric precision of the image encoder: fp32; bf16 where the device runs it fast; int8 on CPUs."""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable, Iterator

import torch

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BF16_MIN_SPEEDUP = 1.3  # below this, bf16 costs accuracy for too little time
# Below this, an explicit bf16 or int8 is emulated without the instructions it needs: fp32 instead.
SLOW_SPEEDUP = 0.25


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
    """fp32 time over bf16 time of an encoder-sized matrix product on this CPU.

    A CPU without bf16 instructions emulates them 10 to 100 times slower than fp32; a small probe
    product tells that in milliseconds, where the encoder-sized one would take seconds.
    """
    return _cpu_speedup(lambda x: x.bfloat16(), torch.mm)


@functools.lru_cache(maxsize=1)
def cpu_int8_speedup() -> float:
    """fp32 time over int8 time (`torch._int_mm`) of an encoder-sized matrix product on this CPU.

    Fast with int8 dot-product instructions (VNNI); 30 to 50 times slower than fp32 without them
    (measured on a 2-core AMD EPYC Zen 3, AVX2 only).
    """
    if not hasattr(torch, "_int_mm"):
        return 0.0

    def to_int8(x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 40).clamp(-127, 127).to(torch.int8)

    return _cpu_speedup(to_int8, torch._int_mm)


# (rows, inner, columns) of the probe and of the encoder-sized product (ViT-B's width).
PROBE_PRODUCT = (128, 512, 512)
ENCODER_PRODUCT = (1024, 768, 768)


def _cpu_speedup(
    convert: Callable[[torch.Tensor], torch.Tensor],
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """fp32 `torch.mm` time over `product` time on `convert`ed operands (best of several each)."""
    generator = torch.Generator().manual_seed(0)

    def ratio(shape: tuple[int, int, int], repeats: int, fp32_repeats: int) -> float:
        rows, inner, columns = shape
        a = torch.randn(rows, inner, generator=generator)
        b = torch.randn(inner, columns, generator=generator)
        return best_time(torch.mm, a, b, fp32_repeats) / best_time(product, convert(a), convert(b), repeats)

    with torch.inference_mode():
        # The fp32 probe takes under a millisecond: a busy machine can stall every one of a few
        # calls, and a slow fp32 time would hide an emulated product. Its best of 8 costs nothing.
        probe = ratio(PROBE_PRODUCT, 2, 8)
        if probe < SLOW_SPEEDUP:  # no need to wait for the large product
            return probe
        return ratio(ENCODER_PRODUCT, 5, 5)


def best_time(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    repeats: int,
) -> float:
    """Fastest of `repeats` timed calls of `product(a, b)`, in seconds, after one untimed call."""
    product(a, b)  # first call: kernel selection and allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b)
        times.append(time.perf_counter() - start)
    return min(times)


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
    if precision == "bf16" and device.type == "cpu" and cpu_bf16_speedup() < SLOW_SPEEDUP:
        return _slow_on_this_cpu("bf16", cpu_bf16_speedup(), "bf16 instructions (AVX-512 BF16 or AMX)")
    if precision == "int8":
        from .modeling.image_encoder import ImageEncoderViT

        if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 2):
            raise ValueError(f"int8 encoding needs torch 2.2 or newer (this is {torch.__version__}).")
        if device.type != "cpu":
            raise ValueError(f"int8 encoding runs on the CPU, and this model is on {device.type}; use bf16.")
        encoder = getattr(model, "image_encoder", None)
        if not isinstance(encoder, ImageEncoderViT):
            kinds = {"MicroEncoder": "the bundled model's kind", "TinyViT": "MobileSAM's TinyViT"}
            kind = kinds.get(type(encoder).__name__, type(encoder).__name__)
            raise ValueError(
                f"int8 encoding is for SAM's ViT encoders (vit_b, vit_l, vit_h and their finetunes), not "
                f"{kind}: use fp32 (precision='fp32', --precision fp32 on the command line)."
            )
        if cpu_int8_speedup() < SLOW_SPEEDUP:
            return _slow_on_this_cpu("int8", cpu_int8_speedup(), "int8 dot-product instructions (VNNI)")
    return precision


def _slow_on_this_cpu(precision: str, speedup: float, instructions: str) -> str:
    """Warn that `precision` runs `1 / speedup` times slower than fp32 here; returns "fp32"."""
    warnings.warn(
        f"precision='{precision}' would make the image encoder about {1 / max(speedup, 1e-3):.0f} times "
        f"slower than fp32 on this CPU, which lacks {instructions}: using fp32 instead.",
        stacklevel=4,  # the caller of Predictor(...)
    )
    return "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Run the enclosed code in bf16 autocast when `precision` is "bf16"."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
