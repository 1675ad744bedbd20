"""One count of the bytes streams hold in the host, against one limit.

The gRPC layer charges every request byte it keeps (messages received and not yet taken by
their handler, and the part of a message still arriving); the servicer charges the answers it
holds (admission.py). Past the limit the gRPC layer stops giving window back to the peer, so
flow control holds the peer's bytes on its side until the held ones are released.
"""

from __future__ import annotations

from collections.abc import Callable


class Budget:
    """Bytes held by the open streams (``held``) and the most they may hold (``limit``, 0: none)."""

    __slots__ = ("held", "limit", "starved")

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.held = 0
        self.starved: dict[int, Callable[[], None]] = {}  # callbacks to run once under the limit

    @property
    def over(self) -> bool:
        """The limit is reached."""
        return bool(self.limit) and self.held >= self.limit

    def take(self, size: int) -> None:
        """Count ``size`` more bytes held."""
        self.held += size

    def give(self, size: int) -> None:
        """``size`` bytes are not held any more; those who waited for room are called."""
        self.held -= size
        if self.starved and not self.over:
            waiting, self.starved = self.starved, {}
            for resume in waiting.values():
                resume()

    def wait(self, key: int, resume: Callable[[], None]) -> None:
        """Call ``resume`` once the held bytes are under the limit again."""
        self.starved[key] = resume

    def forget(self, key: int) -> None:
        """No more call for ``key``."""
        self.starved.pop(key, None)
