"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


class WarmupCosine:
    """Multiplier of the base learning rate at a step (for `torch.optim.lr_scheduler.LambdaLR`).

    Args:
        warmup: Steps of linear warm-up from `1 / warmup` to 1.
        total: Step at which the decay reaches `floor`; may be set later (see `set_total`).
        floor: Final multiplier.

    A plain object with numeric attributes, so the scheduler's state dict saves and restores it.
    """

    def __init__(self, warmup: int, total: int, floor: float = 0.05) -> None:
        if warmup < 0 or total < 1 or not 0.0 <= floor <= 1.0:
            raise ValueError(f"Invalid schedule: warmup {warmup}, total {total}, floor {floor}.")
        self.warmup = int(warmup)
        self.total = int(total)
        self.floor = float(floor)

    def set_total(self, total: int) -> None:
        """Fix the length of the schedule (e.g. once the speed of a timed run is known)."""
        if total < 1:
            raise ValueError(f"The schedule needs at least one step, not {total}.")
        self.total = int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
