"""Where a body is cut into chunks: the boundaries streaming plugins must survive.

A *splitter* takes a body and returns its chunks (joined, they are the body). Envoy cuts an
HTTP/1.1 content-length upload into chunks of up to 1 MiB (:data:`ENVOY_CHUNK`) and an h2c
upload into 16 KiB frames (:data:`H2_FRAME`), but where exactly depends on the network: a
plugin that holds state across chunks (a pattern split in two, a multi-byte character, a
compressed frame) must work wherever the cuts fall. :func:`random_splits` explores that.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

#: Largest chunk Envoy sends for a body (its default per-connection buffer limit).
ENVOY_CHUNK = 1024 * 1024
#: An h2c client's DATA frames (HTTP/2's default SETTINGS_MAX_FRAME_SIZE).
H2_FRAME = 16 * 1024

#: A function that cuts a body into chunks.
Splitter = Callable[[bytes], list[bytes]]


def chunks_of(size: int) -> Splitter:
    """Cut bodies into chunks of ``size`` bytes (the last one shorter)."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")

    def split(body: bytes) -> list[bytes]:
        return [body[i : i + size] for i in range(0, len(body), size)]

    return split


class split_at:  # lower-case: used like a function, split_at(3, 10)
    """Cut bodies at these byte offsets (ignoring offsets beyond the end, and 0).

    ``split_at(3, 10)`` turns ``b"hello, world!"`` into ``b"hel"``, ``b"lo, wor"``, ``b"ld!"``.
    An offset given twice yields an empty chunk between, as Envoy sometimes sends.
    """

    def __init__(self, *offsets: int) -> None:
        if any(offset < 0 for offset in offsets):
            raise ValueError(f"offsets must not be negative: {offsets}")
        self.offsets = tuple(sorted(offsets))

    def __call__(self, body: bytes) -> list[bytes]:
        if not body:
            return []
        points = [0, *(c for c in self.offsets if 0 < c < len(body)), len(body)]
        return [body[a:b] for a, b in itertools.pairwise(points)]

    def __repr__(self) -> str:
        return f"split_at({', '.join(map(str, self.offsets))})"


def random_splits(seed: int, *, max_chunks: int = 8, empty_chunks: bool = False) -> Splitter:
    """Cut each body at random offsets into 1 to ``max_chunks`` chunks, reproducibly: the
    same seed gives the same cuts for the same sequence of bodies. With ``empty_chunks``,
    empty chunks are mixed in (Envoy may send them with ``end_of_stream`` false)."""
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
    rng = random.Random(seed)

    def split(body: bytes) -> list[bytes]:
        if not body:
            return []
        count = rng.randint(1, min(max_chunks, len(body)))
        cuts = sorted(rng.sample(range(1, len(body)), count - 1)) if count > 1 else []
        chunks = split_at(*cuts)(body)
        if empty_chunks:
            for _ in range(rng.randint(0, 2)):
                chunks.insert(rng.randint(0, len(chunks) - 1), b"")
        return chunks

    return split
