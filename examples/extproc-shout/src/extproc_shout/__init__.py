"""shout: upper-cases the ASCII letters of response bodies and marks the response with a header.

A streaming transform: every chunk comes out the same size as it went in, with nothing held
back, so it works in every body mode (FULL_DUPLEX_STREAMED, STREAMED, BUFFERED).

    [routes.default]
    chain = ["shout"]

    [plugins.shout]
    header = "x-shouted-by"   # response header to set ("" for none)
    upper_response = true
"""

from pydantic import BaseModel, ConfigDict

from extproc_host import Headers, Plugin, hookimpl


class ShoutSettings(BaseModel):
    """``[plugins.shout]``, validated by the host at start-up."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    header: str = "x-shouted-by"
    upper_response: bool = True


class Shout(Plugin):
    """One instance per HTTP exchange; ``self.settings`` is a ShoutSettings."""

    name = "shout"
    Settings = ShoutSettings

    def on_response_headers(self, headers: Headers) -> None:
        # Streamed modes decide headers here, before the first body chunk.
        if self.settings.header:
            headers.set(self.settings.header, self.name)

    def on_response_body(self, chunk: bytes) -> bytes:
        # bytes.upper() changes a-z only: same length, any other byte untouched.
        return chunk.upper() if self.settings.upper_response else chunk


@hookimpl
def register_plugins(register):
    register(Shout)
