"""gRPC's Length-Prefixed-Messages (a compressed flag, a 4-byte length, the message), read from a
stream's DATA as it arrives.

A message inside one DATA frame is copied out once. A message that spans frames is copied into
one buffer as its pieces come, which grows only with bytes that arrived: a prefix that
announces a large message costs nothing until its bytes come (a buffer of the announced size
would let 5 bytes cost 128 MiB). Every byte held, from arrival until the handler is done with
its message (it asks for the next one, or the call ends), is charged to the
:class:`~extproc_host.wire.budget.Budget`: while the handler works on a message, its copies of
it live too.
"""

from __future__ import annotations

import struct
from collections import deque

from ..budget import Budget
from .status import StatusCode

PREFIX = struct.Struct(">BL")


class MessageError(Exception):
    """The request's messages break gRPC's framing or the server's limits: the call fails with
    ``code``."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Messages:
    """The request messages of one call: those complete in ``inbox``, one filling."""

    __slots__ = (
        "body",
        "budget",
        "compressed_ok",
        "held",
        "inbox",
        "max_size",
        "need",
        "partial",
        "taken",
    )

    def __init__(self, budget: Budget, max_size: int, encoding: bytes | None) -> None:
        self.inbox: deque[bytes | bytearray] = deque()
        self.budget = budget
        self.max_size = max_size
        self.partial = bytearray()  # a prefix cut between frames (rare)
        self.body: bytearray | None = None  # a message that spans frames, as it fills
        self.need = 0  # its announced length
        self.held = 0  # bytes charged to the budget
        self.taken = 0  # of which the message the handler works on
        self.compressed_ok = encoding not in (None, b"identity")

    @property
    def cut(self) -> bool:
        """A message (or its prefix) is only partly received."""
        return self.body is not None or bool(self.partial)

    def feed(self, payload: memoryview) -> int:
        """A DATA frame's content: the number of messages it completed. MessageError when the
        bytes are not gRPC messages the server takes."""
        size = len(payload)
        pos = 0
        done = 0
        while pos < size:
            body = self.body
            if body is not None:  # filling a message that spans frames
                pos = self._fill(body, payload, pos)
                if self.body is None:
                    done += 1
                continue
            partial = self.partial
            if partial or size - pos < 5:
                take = min(5 - len(partial), size - pos)
                partial += payload[pos : pos + take]
                pos += take
                if len(partial) < 5:
                    break
                flag, length = PREFIX.unpack(partial)
                partial.clear()
            else:
                flag, length = PREFIX.unpack_from(payload, pos)
                pos += 5
            if flag:
                self._refuse_compressed(flag)
            if length > self.max_size:
                raise MessageError(
                    StatusCode.RESOURCE_EXHAUSTED, f"Received message larger than max ({length} vs. {self.max_size})"
                )
            if size - pos >= length:  # the usual case: the whole message in this frame
                self.inbox.append(bytes(payload[pos : pos + length]))
                self.held += length
                self.budget.take(length)
                pos += length
                done += 1
            else:
                self.body = bytearray()
                self.need = length
        return done

    def _fill(self, body: bytearray, payload: memoryview, pos: int) -> int:
        take = min(len(payload) - pos, self.need - len(body))
        body += payload[pos : pos + take]
        self.held += take
        self.budget.take(take)
        if len(body) == self.need:
            self.inbox.append(body)
            self.body = None
        return pos + take

    def take(self) -> bytes | bytearray:
        """The oldest complete message, charged until :meth:`done` (or :meth:`release`)."""
        message = self.inbox.popleft()
        self.taken = len(message)
        return message

    def done(self) -> None:
        """The handler is done with the message it took (it asks for the next one)."""
        size = self.taken
        if size:
            self.taken = 0
            self.held -= size
            self.budget.give(size)

    def release(self) -> None:
        """The call ended: nothing it holds is charged any more."""
        self.inbox.clear()
        self.body = None
        self.taken = 0
        if self.held:
            self.budget.give(self.held)
            self.held = 0

    def _refuse_compressed(self, flag: int) -> None:
        if flag != 1:
            raise MessageError(StatusCode.INTERNAL, f"invalid compressed flag {flag} on a message")
        if self.compressed_ok:
            raise MessageError(StatusCode.UNIMPLEMENTED, "compressed messages are not supported")
        raise MessageError(StatusCode.INTERNAL, "compressed flag set with identity or empty grpc-encoding")
