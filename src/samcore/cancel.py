"""Stopping an image embedding part-way, between two layers of the encoder, and a batch of prompts
between two prompts.

One embedding with SAM's ViT-H takes about a minute on a laptop CPU, so a job that only stops
between slices keeps a cancelled user waiting that long. `Predictor.embed_rgb` takes a cancel
event: while it encodes, every submodule of the image encoder checks the event before it runs and
raises `Cancelled` once it is set, which abandons the embedding within a fraction of a second.
The decoder checks it before each prompt (`ImageContext.decode`), so a batch of segment-all's
points, a second or two of work, stops within one prompt when decoded inside `stopping_on`.

The checks are forward pre-hooks, added once per module (`Predictor` adds them when it is made, before
any thread encodes with it). A hook only looks at the event of the thread it runs in (`stopping_on`), so
another thread using the same model at the same time, such as an interactive decode beside a background
job, is never stopped by someone else's cancel. Without an event the hooks cost nothing measurable.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_local = threading.local()  # .event: the cancel event of this thread's current embedding
_hooked_lock = threading.Lock()


class Cancelled(Exception):
    """A computation stopped because its cancel event was set; what it was making is discarded."""


@contextmanager
def stopping_on(cancel: threading.Event | None) -> Iterator[None]:
    """Within this block, modules made cancellable (`make_cancellable`) raise `Cancelled` in this thread
    once `cancel` is set; None leaves the computation uninterruptible."""
    if cancel is None:
        yield
        return
    previous = getattr(_local, "event", None)
    _local.event = cancel
    try:
        check()
        yield
    finally:
        _local.event = previous


def check() -> None:
    """Raise `Cancelled` if the cancel event of this thread's current block is set."""
    event = getattr(_local, "event", None)
    if event is not None and event.is_set():
        raise Cancelled("cancelled")


def make_cancellable(encoder: torch.nn.Module) -> None:
    """Make every submodule of `encoder` check the thread's cancel event before it runs (once each).

    A module that already holds the check keeps it alone: a model copied or unpickled (sent to a
    cluster's worker) brings its hooks along.
    """
    with _hooked_lock:
        for module in encoder.modules():
            if not any(hook is _check_hook for hook in module._forward_pre_hooks.values()):
                module.register_forward_pre_hook(_check_hook)


def _check_hook(module: torch.nn.Module, args: tuple) -> None:
    check()
