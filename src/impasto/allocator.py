"""glibc's allocator, set for optimization loops, which free and allocate the same buffers at every
iteration.

By default glibc starts by giving every buffer over 128 KiB its own fresh mapping (raising that threshold
as it sees them freed, up to 32 MiB) and returns freed heap memory to the system once 2x that threshold is
free, so an iteration keeps page-faulting its feature maps, gradients and temporaries in again. The
`impasto` command serves buffers under 32 MiB from the heap from the start and keeps up to 256 MiB of freed
heap memory for the next iteration. Measured on a 2-core AVX-512 CPU: one evaluation 1.20-1.23x faster at
512 px and 1.13-1.15x at 1024 px; the whole run's peak the same at 256-512 px and about 14 % higher at 1024 px
(docs/benchmarks.md). Python callers may do the same with `keep_freed_memory()`.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_HEAP_BELOW = 32 * 2**20  # glibc's own largest dynamic threshold: bigger buffers still get their own mapping
_KEEP_UP_TO = 256 * 2**20  # freed heap memory kept for reuse before glibc gives any back


def keep_freed_memory() -> bool:
    """Serve buffers under 32 MiB from the heap and keep up to 256 MiB of freed heap memory, for the rest of
    this process (glibc on Linux only). Returns whether the allocator was changed;
    IMPASTO_KEEP_FREED_MEMORY=0 leaves it as it is."""
    if os.environ.get("IMPASTO_KEEP_FREED_MEMORY", "1") == "0" or not _glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BELOW)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO))


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc
        return False
