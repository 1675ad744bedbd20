"""Every error the host raises on purpose, in one place.

- :class:`ConfigError`: a settings problem, found at start-up (exit status 2).
- :class:`PluginError`: a plugin hook raised; the route's failure policy decides what follows.
- :class:`StreamAborted`, :class:`StreamFailed`, :class:`ProtocolError`: how a stream ended
  when it did not end well.
- :class:`LimitExceeded` and its kinds: the stream crossed one of the host's documented limits
  (``[server]`` settings); the message names the setting.

``Reject`` is not here: it is part of the plugin API (:mod:`extproc_host.plugin`).
"""

from __future__ import annotations


class ConfigError(Exception):
    """A settings problem, worded for the person who wrote the file."""


class PluginError(Exception):
    """A plugin hook raised; carries which plugin and hook, and the original error as cause."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        self.error = error
        super().__init__(f"plugin '{plugin}' failed in {hook}: {type(error).__name__}: {error}")


class StreamAborted(Exception):
    """The exchange ended before a body it had started was complete (client gone, reset)."""


class StreamFailed(Exception):
    """The stream must end with a gRPC error: Envoy then fails the request (fail_closed)."""


class ProtocolError(StreamFailed):
    """The data plane broke the ext_proc protocol (a message out of order, a message with no
    kind, an unknown body mode): the stream ends with INVALID_ARGUMENT."""


class LimitExceeded(StreamFailed):
    """The stream crossed one of the host's limits; ``setting`` names the ``[server]`` key.

    Plugins see it as the error their ``close`` gets; the stream counts as ``failed``."""

    #: The gRPC status the stream ends with (a name of ``grpc.StatusCode``).
    status = "RESOURCE_EXHAUSTED"

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(message)


class AnswerTooLarge(LimitExceeded):
    """The chain's output for one STREAMED or BUFFERED message is larger than one gRPC message
    may be (``[server] max_message_bytes``): it cannot be sent back to Envoy."""


class ObserverBehind(LimitExceeded):
    """An observe-only chain fell further behind Envoy than ``[server] observe_buffer_bytes``
    (or the host's ``max_held_bytes``): the host stopped observing the exchange, which went on
    for the client untouched."""


class IdleTimeout(LimitExceeded):
    """No message came from Envoy for ``[server] idle_timeout_seconds``."""

    status = "DEADLINE_EXCEEDED"
