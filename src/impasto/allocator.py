"""glibc's allocator, set for optimization loops, which free and allocate the same large buffers at
every iteration.

By default glibc gives each buffer over 32 MiB its own fresh mapping and returns freed memory to the system,
so every iteration page-faults its feature maps, gradients and temporaries in again: on a 2-core AVX-512 CPU
that was about a sixth of each iteration's time at 512 px. The `impasto` command keeps freed memory in the
process instead; Python callers may do the same with `keep_freed_memory()`.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_HEAP_UP_TO = 1 << 30  # buffers up to 1 GiB come from the heap; larger ones still get their own mapping
_NEVER = 2**31 - 1


def keep_freed_memory() -> bool:
    """Serve buffers up to 1 GiB from the heap and never give freed heap memory back to the system, for
    the rest of this process (glibc on Linux only). The process then holds its peak memory until it exits.
    Returns whether the allocator was changed; IMPASTO_KEEP_FREED_MEMORY=0 leaves it as it is."""
    if os.environ.get("IMPASTO_KEEP_FREED_MEMORY", "1") == "0" or not _glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_UP_TO)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER))


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc
        return False
