"""Giving memory back: collect reference cycles, then return the freed heap to the system.

Streams that end abnormally (cancelled while gRPC was sending, failed) leave their buffers in
reference cycles inside grpc.aio, freed only by a full collection; the server freezes what it
loaded at start-up and the oldest generation is rarely collected, so without help that memory
stays held. glibc then keeps the freed pages in its arenas: ``malloc_trim(0)`` returns them.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process already uses
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def reclaim() -> int:
    """Collect every generation (frozen objects stay untouched), then trim the C heap.
    Returns the number of unreachable objects found."""
    found = gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    return found
