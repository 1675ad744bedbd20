"""The demo's model: the modes it runs, what it was asked to do, and what each mode measured.

:mod:`.demo` runs the modes and fills these in; :mod:`.demo_report` turns them into the table,
the chart and ``samples.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DEMO_SETTINGS, data_path
from .runner import RssSample

MiB = 1024 * 1024
CHUNK = MiB


@dataclass(frozen=True)
class Mode:
    """One run of the experiment: which host settings (None: Envoy alone), which path. Envoy's
    config is generated from the settings (``extproc-host envoy-config``, ``--no-ext-proc``
    without a host), so the demo needs nothing but the installed package."""

    key: str
    label: str
    host_config: Path | None
    path: str

    @property
    def tees(self) -> bool:
        """Whether the demo settings' file_tee copies this mode's bodies."""
        return self.key == "full-duplex"


#: The demo's host settings, shipped with the package (config/full_duplex.toml in a checkout).
DEMO_CONFIG = data_path(DEMO_SETTINGS)

MODES: dict[str, Mode] = {
    m.key: m
    for m in (
        Mode("full-duplex", "FULL_DUPLEX_STREAMED", DEMO_CONFIG, "/full-duplex-streamed"),
        Mode("streamed", "STREAMED", DEMO_CONFIG, "/streamed"),
        Mode("direct", "Envoy alone (no ext_proc)", None, "/"),
    )
}


@dataclass
class DemoOptions:
    """What ``extproc-host demo`` was asked to do (see cli.py for the flags)."""

    concurrency: int = 10
    size_mib: int = 70
    file: Path | None = None
    results: Path | None = None
    modes: Sequence[str] = tuple(MODES)
    keep_running: bool = False
    keep_copies: bool = False


@dataclass
class Upload:
    """One upload's outcome: HTTP status, bytes echoed back, and whether their sha256 matched."""

    status: int = 0
    received: int = 0
    verified: bool = False
    error: str | None = None


@dataclass
class ModeResult:
    """One mode's figures: wall time of the N uploads, peaks, samples, verification counts."""

    mode: Mode
    concurrency: int
    body_bytes: int
    wall_seconds: float
    uploads: list[Upload]
    samples: list[RssSample]
    envoy_peak: int
    host_peak: int
    copies: int = 0
    copies_verified: int = 0
    copies_expected: int = 0

    @property
    def verified(self) -> int:
        """Uploads answered 200 whose echo matched the file's sha256."""
        return sum(1 for u in self.uploads if u.verified and u.status == 200)

    @property
    def mib_per_second(self) -> float:
        """Aggregate rate: all uploaded bytes over the wall time."""
        return self.concurrency * self.body_bytes / MiB / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def ok(self) -> bool:
        """Every body and every file_tee copy came back exact."""
        return self.verified == self.concurrency and self.copies_verified == self.copies_expected


@dataclass
class Body:
    """The uploaded file, its size and sha256."""

    path: Path
    size: int
    sha256: str
    generated: bool = field(default=False)
