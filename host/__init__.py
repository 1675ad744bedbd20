"""extproc-host: an Envoy External Processing host that streams bodies through plugin chains."""

from .hookspecs import hookimpl
from .plugin import Headers, Needs, NoSettings, Plugin, Reject, StreamInfo

__all__ = ["Headers", "Needs", "NoSettings", "Plugin", "Reject", "StreamInfo", "hookimpl"]
