"""A plugin for end-to-end tests that names the host process serving each stream.

Loaded by the host through ``[server] plugin_modules``; it sets ``x-worker-pid`` on every
response to ``os.getpid()`` of the process that ran the stream.
"""

from __future__ import annotations

import os

from extproc_host import Headers, Plugin, hookimpl


class WorkerPid(Plugin):
    """Adds ``x-worker-pid: <pid>`` to the response headers."""

    name = "worker_pid"

    def on_response_headers(self, headers: Headers) -> None:
        headers.set("x-worker-pid", str(os.getpid()))


@hookimpl
def register_plugins(register):
    register(WorkerPid)
