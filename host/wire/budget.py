"""One budget for the memory streams hold in the host (``[server] max_held_bytes``).

Two kinds of charges share it:

- **Reservations**, one per open stream (:meth:`Budget.reserve`): what a stream costs before it
  holds any body, its own objects and the first window the peer may fill without asking. New
  streams are refused only when reservations alone would pass the limit.
- **Bytes** (:meth:`Budget.take`): request messages received and not yet taken by the stream's
  chain, answers on their way out, observers' queues, and the window granted to a stream beyond
  its first. Past the limit nothing is refused: the builtin gRPC server grows no stream's
  window beyond its first (what its reservation counts), and gives no window back to a message
  that spans more than a window until there is room again (:meth:`Budget.wait`), so flow
  control holds the peer's bytes on its side.
"""

from __future__ import annotations

from collections.abc import Callable


class Budget:
    """Bytes the open streams hold (``held``) and reserve (``reserved``) against ``limit``
    (0: no limit)."""

    __slots__ = ("held", "held_back", "limit", "reserved", "waiting")

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.held = 0
        self.reserved = 0
        self.held_back = 0  # times a window was held back for lack of room
        self.waiting: dict[object, Callable[[], None]] = {}  # told once there is room again

    @property
    def total(self) -> int:
        """Everything counted: reservations and bytes."""
        return self.held + self.reserved

    @property
    def over(self) -> bool:
        """The limit is reached: hold the peer back."""
        return bool(self.limit) and self.held + self.reserved >= self.limit

    def reserve(self, size: int) -> bool:
        """Reserve ``size`` for a new stream; False (nothing reserved) when the reservations
        would pass the limit."""
        if self.limit and self.reserved + size > self.limit:
            return False
        self.reserved += size
        return True

    def take(self, size: int) -> None:
        """Count ``size`` more bytes held."""
        self.held += size

    def give(self, size: int) -> None:
        """``size`` bytes are not held any more."""
        self.held -= size
        if self.waiting:
            self._room_again()

    def unreserve(self, size: int) -> None:
        """A stream's reservation ends."""
        self.reserved -= size
        if self.waiting:
            self._room_again()

    def wait(self, key: object, wake: Callable[[], None]) -> None:
        """Call ``wake()`` once, when the budget is below its limit again (``key``: who waits)."""
        self.waiting[key] = wake

    def unwait(self, key: object) -> None:
        """``key`` waits no more."""
        self.waiting.pop(key, None)

    def _room_again(self) -> None:
        """Wake those waiting once the budget is below its limit again."""
        if self.held + self.reserved >= self.limit:
            return
        waiting, self.waiting = self.waiting, {}
        for wake in waiting.values():
            wake()
