"""What file_tee leaves behind over time: temporary files of a killed host are removed at
start-up (only those of this machine whose process is gone), and ``.partial`` files are kept
up to ``max_partial_files`` per directory, oldest deleted first."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import extproc_host_plugins.file_tee as file_tee
from extproc_host.registry import make_plugin_manager
from extproc_host.settings import load_settings

from . import sample_plugins
from .fake_envoy import FD, fake_envoy, request_body, request_headers
from .test_file_tee import files, write_config

HOST, _, ME = file_tee._WRITER.rpartition("-")


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporary_files_are_named_after_their_writer(tmp_path) -> None:
    body = file_tee._BodyFile(file_tee.FileTeeSettings(directory=tmp_path), "r-1-request.body", "label")
    name = os.path.basename(body.tmp_path)
    found = file_tee._TMP_NAME.match(name)
    assert found and found["host"] == HOST and found["pid"] == str(os.getpid())


def test_start_up_removes_temporaries_of_gone_processes_of_this_machine_only(tmp_path) -> None:
    names = {
        "dead": f".r-1-request.body.{HOST}-{dead_pid()}-0badc0de.tmp",
        "own": f".r-2-request.body.{HOST}-{ME}-0123abcd.tmp",
        "live": f".r-3-request.body.{HOST}-{os.getppid()}-0123abcd.tmp",
        "other_host": f".r-4-request.body.elsewhere-{dead_pid()}-0123abcd.tmp",
        "complete": "r-5-request.body",
        "partial": "r-6-request.body.partial",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    removed = file_tee.remove_leftover_temporaries(str(tmp_path))
    assert sorted(removed) == sorted([names["dead"], names["own"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("live", "other_host", "complete", "partial")
    )


def test_prune_keeps_the_newest_partial_files(tmp_path) -> None:
    for i in range(5):
        path = tmp_path / f"r-{i}-request.body.partial"
        path.write_bytes(b"p")
        os.utime(path, ns=(i * 10**9, i * 10**9))
    (tmp_path / "r-9-request.body").write_bytes(b"complete")
    removed = file_tee.prune_partials(str(tmp_path), 2)
    assert sorted(removed) == [f"r-{i}-request.body.partial" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "r-3-request.body.partial",
        "r-4-request.body.partial",
        "r-9-request.body",
    ]


def test_host_started_cleans_every_file_tee_directory(tmp_path) -> None:
    tee = tmp_path / "tee"
    tee.mkdir()
    leftover = tee / f".default-1-request.body.{HOST}-{dead_pid()}-0badc0de.tmp"
    leftover.write_bytes(b"x")
    for i in range(4):
        (tee / f"default-{i}-request.body.partial").write_bytes(b"p")
    settings = load_settings(write_config(tmp_path, "max_partial_files = 1"))
    make_plugin_manager().hook.host_started(settings=settings)
    assert not leftover.exists()
    assert len([p for p in tee.iterdir() if p.name.endswith(".partial")]) == 1


async def test_aborted_bodies_keep_at_most_max_partial_files(tmp_path) -> None:
    async with fake_envoy(write_config(tmp_path, "max_partial_files = 2"), sample_plugins) as envoy:
        for i in range(5):
            await envoy.converse([request_headers(route="default", request_mode=FD), request_body(b"%d" % i)])
    found = files(tmp_path)
    assert len(found) == 2 and all(re.fullmatch(r"default-.*-request\.body\.partial", n) for n in found), found
    assert sorted(found.values()) == [b"3", b"4"]  # the newest
