"""The demo's report from known figures: table cells, samples.json contents, the PNG chart,
and the options parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from extproc_host.stack import RssSample
from extproc_host.stack.demo import parse_modes
from extproc_host.stack.demo_model import MODES, Body, ModeResult, Upload
from extproc_host.stack.demo_report import build_table, samples_document, write_results

MiB = 1024 * 1024


def _result(key: str, verified: int, copies_verified: int = 0) -> ModeResult:
    uploads = [Upload(200, 7 * MiB, i < verified) for i in range(4)]
    samples = [
        RssSample(0.0, 80 * MiB, 60 * MiB),
        RssSample(0.1, 200 * MiB, 150 * MiB),
        RssSample(0.2, 90 * MiB, 70 * MiB),
    ]
    tees = MODES[key].tees
    return ModeResult(
        MODES[key],
        4,
        7 * MiB,
        2.0,
        uploads,
        samples,
        200 * MiB,
        150 * MiB,
        copies=8 if tees else 0,
        copies_verified=copies_verified if tees else 0,
        copies_expected=8 if tees else 0,
    )


def _rendered(results) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(build_table(results))
    return console.export_text()


def test_table_rows_carry_the_figures() -> None:
    text = _rendered([_result("full-duplex", 4, 8), _result("streamed", 3), _result("direct", 4)])
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == 3
    fd, streamed, direct = rows
    # 4 x 7 MiB in 2 s = 14 MiB/s; peaks in MiB.
    assert "FULL_DUPLEX_STREAMED" in fd and "2.00" in fd and "14.0" in fd and "200" in fd and "150" in fd
    assert "4/4, tee copies 8/8" in fd
    assert "3/4" in streamed
    assert "Envoy alone" in direct and "│                 - │" in direct  # no host in that mode


def test_a_failed_mode_is_not_ok() -> None:
    assert _result("full-duplex", 4, 8).ok
    assert not _result("full-duplex", 4, 7).ok
    assert not _result("streamed", 3).ok


def test_results_written(tmp_path: Path) -> None:
    results = [_result("full-duplex", 4, 8), _result("direct", 4)]
    body = Body(tmp_path / "b.bin", 7 * MiB, "ab" * 32, generated=True)
    written = write_results(results, body, tmp_path / "out")
    assert written["chart"].read_bytes()[:4] == b"\x89PNG"
    document = json.loads(written["samples"].read_text())
    assert document["modes"] == samples_document(results, body)["modes"]
    fd, direct = document["modes"]
    assert fd["envoy_peak_rss_bytes"] == 200 * MiB and fd["tee_copies_verified"] == 8
    assert [s["envoy_rss_bytes"] for s in fd["samples"]] == [80 * MiB, 200 * MiB, 90 * MiB]
    assert direct["host_peak_rss_bytes"] is None
    assert document["file"] is None  # a generated body, not the user's file


def test_parse_modes() -> None:
    assert parse_modes("direct, full-duplex") == ["direct", "full-duplex"]
    with pytest.raises(ValueError, match="sideways"):
        parse_modes("streamed,sideways")
    with pytest.raises(ValueError):
        parse_modes(" , ")
