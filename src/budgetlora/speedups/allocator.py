"""CPU memory allocation that keeps freed activation memory for the next step (glibc only).

A CPU training step allocates and frees the same few-megabyte activation tensors again and again.
glibc's malloc serves blocks that size with fresh `mmap`s and hands them back to the kernel on
free, so every step faults its activations in page by page, and trims the heap top as well. PyTorch's
CPU tuning guides recommend jemalloc or tcmalloc for this; they cannot be swapped in from inside a
running Python. The same effect, from glibc itself: serve blocks up to 32 MiB from the heap and keep
up to 1 GiB of freed memory in the process (the gain is in docs/speed.md); the arithmetic is unchanged.

Applied once per process, on Linux with glibc, unless the user already chose: MALLOC_* or
GLIBC_TUNABLES set, or a jemalloc/tcmalloc preloaded.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit on 64-bit
_TRIM_THRESHOLD = 2**30

_applied: bool | None = None


def _user_chose() -> bool:
    preload = os.environ.get("LD_PRELOAD", "")
    return (
        "jemalloc" in preload
        or "tcmalloc" in preload
        or "GLIBC_TUNABLES" in os.environ
        or any(name.startswith("MALLOC_") for name in os.environ)
    )


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); returns whether they are set."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux") and not _user_chose():
            try:
                libc = ctypes.CDLL("libc.so.6")
                _applied = bool(
                    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
                )
            except (OSError, AttributeError):  # musl or another libc: leave it as it is
                _applied = False
    return _applied
