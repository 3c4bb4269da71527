"""Handing freed memory back to the operating system between batches.

Every batch of a held-apart check allocates and frees a few hundred MiB of activations
(MobileNetV1-0.5-160, 64 images). glibc serves allocations of up to 32 MiB from its heap
once a freed block of that size raised its mmap threshold, and keeps freed heap memory
resident for reuse; the holes a batch leaves do not all fit the next one, so the resident
size crept up with every batch and pass while the bytes in use did not
(bench/results/rss_stages.json: after the first agreement pass 744 MiB resident with 303
MiB of it free heap glibc kept). ``malloc_trim(0)`` after each batch and stage returns
those pages (whole free pages inside the heap included), so the peak follows the largest
batch in use, not how many batches ran.
A no-op where the C library has no ``malloc_trim`` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_freed() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``); False where the C
    library cannot. Costs a walk over the heap's free blocks: call it per batch, not per
    tensor."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
