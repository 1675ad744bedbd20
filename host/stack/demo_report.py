"""What ``extproc-host demo`` shows and keeps: the table, ``rss.png`` and ``samples.json``.

The table has one row per mode: wall time of the N uploads, aggregate MiB/s, Envoy's and the
host's peak RSS, and how many echoed bodies matched the file's sha256 (and, on the full-duplex
route, how many of file_tee's copies did). The chart has one subplot per mode with Envoy's and
the host's RSS over time; the JSON file holds every sample behind it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .demo_model import Body, MiB, ModeResult

TABLE_COLUMNS = ("mode", "wall s", "MiB/s", "Envoy peak RSS MiB", "host peak RSS MiB", "bodies verified")
#: Width used when the output is not a terminal (a pipe, a file, CI), so the table does not wrap.
PLAIN_WIDTH = 120


def _verified_cell(result: ModeResult) -> str:
    text = f"{result.verified}/{result.concurrency}"
    if result.copies_expected:
        text += f", tee copies {result.copies_verified}/{result.copies_expected}"
    return text if result.ok else f"[red]{text}[/]"


def build_table(results: Sequence[ModeResult]) -> Table:
    """The summary table, one row per mode."""
    first = results[0]
    table = Table(
        title=f"{first.concurrency} concurrent uploads of {first.body_bytes / MiB:.1f} MiB, "
        "client -> Envoy -> echo -> back, sha256 checked"
    )
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column == "mode" else "right")
    for r in results:
        host = f"{r.host_peak / MiB:.0f}" if r.mode.host_config is not None else "-"
        table.add_row(
            r.mode.label,
            f"{r.wall_seconds:.2f}",
            f"{r.mib_per_second:.1f}",
            f"{r.envoy_peak / MiB:.0f}",
            host,
            _verified_cell(r),
        )
    return table


def print_table(results: Sequence[ModeResult], console: Console) -> None:
    """Print the summary table."""
    console.print(build_table(results))


def samples_document(results: Sequence[ModeResult], body: Body) -> dict[str, Any]:
    """Everything measured, as plain JSON types (bytes and seconds)."""
    return {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "file": str(body.path) if not body.generated else None,
        "body_bytes": body.size,
        "body_sha256": body.sha256,
        "modes": [
            {
                "mode": r.mode.label,
                "key": r.mode.key,
                "concurrency": r.concurrency,
                "wall_seconds": r.wall_seconds,
                "mib_per_second": r.mib_per_second,
                "envoy_peak_rss_bytes": r.envoy_peak,
                "host_peak_rss_bytes": r.host_peak if r.mode.host_config is not None else None,
                "bodies_verified": r.verified,
                "tee_copies": r.copies,
                "tee_copies_verified": r.copies_verified,
                "upload_errors": [u.error for u in r.uploads if u.error],
                "samples": [{"t": s.t, "envoy_rss_bytes": s.envoy, "host_rss_bytes": s.host} for s in r.samples],
            }
            for r in results
        ],
    }


def write_chart(results: Sequence[ModeResult], path: Path) -> None:
    """``rss.png``: Envoy and host RSS (MiB) over time, one subplot per mode, same y scale."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.2), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], results, strict=False):
        t = [s.t for s in r.samples]
        ax.plot(t, [s.envoy / MiB for s in r.samples], label=f"Envoy (peak {r.envoy_peak / MiB:.0f})", color="tab:blue")
        if r.mode.host_config is not None:
            ax.plot(
                t, [s.host / MiB for s in r.samples], label=f"host (peak {r.host_peak / MiB:.0f})", color="tab:orange"
            )
        ax.set_title(f"{r.mode.label}\n{r.mib_per_second:.0f} MiB/s, {r.wall_seconds:.1f} s", fontsize=9)
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("RSS MiB")
    axes[0][0].set_ylim(bottom=0)
    first = results[0]
    fig.suptitle(f"{first.concurrency} x {first.body_bytes / MiB:.1f} MiB uploads echoed through Envoy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_results(results: Sequence[ModeResult], body: Body, directory: Path) -> dict[str, Path]:
    """Write ``rss.png`` and ``samples.json`` into ``directory`` (created); return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    chart, samples = directory / "rss.png", directory / "samples.json"
    samples.write_text(json.dumps(samples_document(results, body), indent=1))
    write_chart(results, chart)
    return {"chart": chart, "samples": samples}
