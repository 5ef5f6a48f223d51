"""Learning-rate schedule: linear warm-up, then cosine decay to a floor, optionally restarted."""

from __future__ import annotations

import math
from collections.abc import Iterable


class WarmupCosine:
    """Multiplier of the base learning rate at a step (for `torch.optim.lr_scheduler.LambdaLR`).

    Args:
        warmup: Steps of linear warm-up from `1 / warmup` to 1.
        total: Step at which the decay reaches `floor`; may be set later (see `set_total`).
        floor: Final multiplier.

    A plain object with numeric attributes, so the scheduler's state dict saves and restores it.
    `restart` extends a finished schedule with another warm-up and cosine decay; each cycle ends
    where the next one starts.
    """

    def __init__(self, warmup: int, total: int, floor: float = 0.05) -> None:
        if warmup < 0 or total < 1 or not 0.0 <= floor <= 1.0:
            raise ValueError(f"Invalid schedule: warmup {warmup}, total {total}, floor {floor}.")
        self.warmup = int(warmup)
        self.total = int(total)
        self.floor = float(floor)
        self.restarts: list[tuple[int, float]] = []  # (first step, peak) of each later cycle

    def set_total(self, total: int) -> None:
        """Fix the length of the schedule (e.g. once the speed of a timed run is known)."""
        if total < 1:
            raise ValueError(f"The schedule needs at least one step, not {total}.")
        self.total = int(total)

    def restart(self, at: int, peak: float, total: int) -> None:
        """From step `at`, warm up again from the floor to `peak` and decay to the floor at `total`."""
        after = self.restarts[-1][0] if self.restarts else 0
        if not after < at < total or not self.floor < peak <= 1.0:
            raise ValueError(
                f"Invalid restart: at step {at} to {total}, peak {peak} (floor {self.floor}, "
                f"previous cycle from step {after})."
            )
        self.restarts.append((int(at), float(peak)))
        self.total = int(total)

    def set_restarts(self, restarts: Iterable[tuple[int, float]], total: int) -> None:
        """Replace the later cycles by `restarts` ((step, peak) pairs), the last one ending at `total`."""
        self.restarts = []
        for at, peak in restarts:
            self.restart(at, peak, total)

    def __call__(self, step: int) -> float:
        start, peak, end = 0, 1.0, self.total
        for at, restart_peak in self.restarts:
            if step < at:
                end = at
                break
            start, peak = at, restart_peak
        local = step - start
        if local < self.warmup:  # the first cycle warms up from 0, later ones from the floor
            if start == 0:
                return (local + 1) / self.warmup
            return self.floor + (peak - self.floor) * (local + 1) / self.warmup
        return self._decay(local, end - start, peak)

    def _decay(self, step: int, length: int, peak: float) -> float:
        """Cosine from `peak` after the warm-up to the floor at `length` steps into the cycle."""
        progress = min(1.0, (step - self.warmup) / max(1, length - self.warmup))
        return self.floor + (peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
