"""Keeping freed CPU memory for reuse, so that large tensors do not fault their pages in anew each time.

glibc's `malloc` hands out blocks above a threshold (128 KiB at first, raised as such blocks are freed)
by mapping fresh pages, and gives them back on `free`. An image encoder allocates the same few
multi-megabyte activations for every layer of every image, so each one pays a page fault per 4 KiB
when first written: about a tenth of the bundled model's embedding time on a 2-core CPU
(`python benchmarks/bench_bundled.py`; README). `reuse_freed_memory` raises the threshold to glibc's
maximum (32 MiB) and the trim threshold to 256 MiB, so those blocks stay in the process and are
reused. It changes how the whole process allocates, for the rest of its life: freed memory up to the
peak of such blocks stays with it rather than going back to the system. `Predictor` calls it once, for
models on the CPU; set ``NAPARI_SAM_MALLOC=default`` to leave glibc's behaviour as it is. Elsewhere
than glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

ENV_VAR = "NAPARI_SAM_MALLOC"
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest on 64-bit systems
TRIM_THRESHOLD = 256 * 1024 * 1024

_lock = threading.Lock()
_done: bool | None = None  # None: not tried yet; else whether the settings took


def reuse_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process (see the module's text).

    Returns:
        Whether they are set (False on other C libraries, or with ``NAPARI_SAM_MALLOC=default``).
    """
    global _done
    with _lock:
        if _done is None:
            _done = _set_thresholds()
        return _done


def _set_thresholds() -> bool:
    if os.environ.get(ENV_VAR, "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    logger.debug("glibc malloc thresholds %s", "set" if done else "refused")
    return done
