"""The plugin authors' kit: test a plugin chain in-process, or behind a real Envoy.

    from extproc_host.testing import PluginRunner, request, random_splits

    runner = PluginRunner(MyPlugin, settings={"my-plugin": {"level": 2}}, mode="STREAMED")
    result = runner.exchange(request(b"hello"), splits=random_splits(seed=1))
    assert result.upstream.body == b"HELLO"

- :class:`PluginRunner`, :class:`Exchange`, :func:`request`, :func:`response`: one HTTP
  exchange through the host's own stream processor, with Envoy's side played in-process;
- :func:`split_at`, :func:`chunks_of`, :func:`random_splits`: where bodies are cut into chunks;
  :mod:`extproc_host.testing.strategies` has a hypothesis strategy (needs hypothesis);
- the pytest plugin :mod:`extproc_host.testing.pytest_plugin` (fixtures ``plugin_runner`` and
  ``envoy_stack``) is registered with pytest when the package is installed;
- ``extproc-host new-plugin NAME`` (:mod:`extproc_host.testing.scaffold`) writes a new plugin package.
"""

from __future__ import annotations

from .driver import DEFAULT_BUFFER_LIMIT, Exchange, HttpMessage, LocalReply, PluginRunner, echo, request, response
from .splits import ENVOY_CHUNK, H2_FRAME, Splitter, chunks_of, random_splits, split_at

__all__ = [
    "DEFAULT_BUFFER_LIMIT",
    "ENVOY_CHUNK",
    "H2_FRAME",
    "Exchange",
    "HttpMessage",
    "LocalReply",
    "PluginRunner",
    "Splitter",
    "chunks_of",
    "echo",
    "random_splits",
    "request",
    "response",
    "split_at",
]
