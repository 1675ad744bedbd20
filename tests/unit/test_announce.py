"""The lines the host prints for people and scripts (``listening on``, ``metrics on``) go out
in one write each: workers share their supervisor's output, and unbuffered (PYTHONUNBUFFERED)
``print`` wrote the text and the newline separately, so two workers' lines ran together."""

from __future__ import annotations

import io

from extproc_host.logs import announce


class Writes(io.StringIO):
    """A text stream that records each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.flushed = 0

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushed += 1


def test_announce_writes_the_line_and_its_newline_at_once() -> None:
    out = Writes()
    announce("extproc-host metrics on http://127.0.0.1:9464/metrics", out)
    assert out.calls == ["extproc-host metrics on http://127.0.0.1:9464/metrics\n"]
    assert out.flushed == 1
