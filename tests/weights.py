"""Random weights that exercise every parameter, for parity tests and benchmarks."""

import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value, in place, including those initialised to constants
    (zero relative-position tables and absolute positions, unit LayerNorm weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "rel_pos" in name or "pos_embed" in name:
                param.copy_(0.5 * noise)
            elif param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.add_(0.1 * noise)
    return model
