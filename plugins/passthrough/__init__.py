"""passthrough: hands every header, chunk and trailer on untouched.

It overrides no hook, so the host moves its bodies without copying them through Python code.
"""

from collections.abc import Callable
from typing import Any

from extproc_host import Plugin, hookimpl


class Passthrough(Plugin):
    """Changes nothing; the baseline chain and the default route's chain."""

    name = "passthrough"


@hookimpl
def register_plugins(register: Callable[[type[Plugin[Any]]], None]) -> None:
    register(Passthrough)
