"""file_tee: writes a copy of each stream's request and/or response body to a file.

The Go proof of concept's ``-write_data_to_file``. Bodies pass through unchanged (the very
chunk objects go on down the chain); the copy goes to disk in worker threads, never on the
event loop, so a slow disk holds back only the stream whose copy is behind.

    [routes.upload]
    chain = ["file_tee"]

    [plugins.file_tee]
    directory = "temp"
    name = "{route}-{stream}-{direction}.body"

A file is written under a hidden temporary name (``.<name>.<host>-<pid>-<random>.tmp``) and
renamed to ``<name>`` only when its body ended normally. A body cut short (client gone, Envoy
reset, another plugin failed) ends as ``<name>.partial`` or is deleted (``on_abort``); a body
longer than ``max_bytes`` ends as ``<name>.truncated`` holding its first ``max_bytes`` bytes; a
body whose copy failed to write (disk full) ends as ``<name>.partial``. Nothing but a complete
copy ever carries the plain name.

Leftovers: at start-up the host deletes the temporary files that a process of this machine
(same host name) left when it was killed (its pid is gone, or is the starting process's own);
``.partial`` files are kept up to ``max_partial_files`` per directory, the oldest deleted first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import string
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from extproc_host import Needs, Plugin, StreamInfo, hookimpl

log = logging.getLogger(__name__)

#: Fields a ``name`` template may use (each one sanitised to ``[A-Za-z0-9_.-]``).
NAME_FIELDS = {
    "route": "the host's route name",
    "stream": "an id unique to the stream: host stream number + 48 random bits",
    "direction": "'request' or 'response'",
    "time": "UTC time the stream's first file was started, e.g. 20261126T161200Z",
    "method": "the request's :method",
    "authority": "the request's :authority (host)",
}
#: Longest value a field contributes to a name (longer ones are cut).
FIELD_MAX = 64
#: Longest file name produced (leaves room for ``.partial``/``.truncated`` and the temp affixes
#: under the usual 255-byte limit).
NAME_MAX = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_os_write = os.write  # one name to replace in tests that simulate a full disk
#: Who writes a temporary file: this machine's name (no '-') and the process id.
_WRITER = f"{re.sub(r'[^A-Za-z0-9_]', '_', socket.gethostname())[:32]}-{os.getpid()}"
#: A temporary file's name: ``.<name>.<host>-<pid>-<random>.tmp``.
_TMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}\.tmp$")
PARTIAL = ".partial"

#: Worker threads shared by every file_tee file of the process; each file has at most one job
#: in flight, so its writes stay in order while different files are written in parallel.
WORKERS = 4
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="file_tee")
    return _executor


def sanitise(value: str) -> str:
    """``value`` reduced to a safe file-name piece: ``[A-Za-z0-9_.-]``, at most FIELD_MAX chars."""
    return _UNSAFE.sub("_", value)[:FIELD_MAX]


class FileTeeSettings(BaseModel):
    """``[plugins.file_tee]``: which bodies to copy, where, and under which names."""

    model_config = ConfigDict(extra="forbid")

    #: Directory the files go to; relative paths are taken from the host's working directory
    #: at start-up. Created (with parents) when missing.
    directory: Path = Path("temp")
    #: Copy the request body.
    request: bool = True
    #: Copy the response body.
    response: bool = True
    #: File name template; fields: {route}, {stream}, {direction}, {time}, {method},
    #: {authority}. Must contain {stream}, and {direction} when both bodies are copied.
    #: No path separators, no conversions or format specs, must not start with '.'.
    name: str = "{route}-{stream}-{direction}.body"
    #: What a body cut short leaves behind: "partial" (<name>.partial) or "delete" (nothing).
    on_abort: Literal["partial", "delete"] = "partial"
    #: Largest number of bytes copied per body (None: no limit); a longer body's copy holds its
    #: first max_bytes bytes and ends as <name>.truncated.
    max_bytes: int | None = Field(default=None, ge=0)
    #: Bytes of one body that may wait in memory for the disk; past this the stream (only this
    #: one) waits for its copy to catch up before its chunk goes on.
    queue_bytes: int = Field(default=8 * 1024 * 1024, ge=0)
    #: Most ``.partial`` files kept in ``directory``: when a body cut short leaves one more, the
    #: oldest are deleted (None: keep every one).
    max_partial_files: int | None = Field(default=100, ge=0)

    @field_validator("directory")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        value = value.expanduser().resolve()
        if value.exists() and not value.is_dir():
            raise ValueError(f"not a directory: {value}")
        return value

    @field_validator("name")
    @classmethod
    def _check_template(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        for sep in {"/", "\\", os.sep, os.altsep or "/", "\0"}:
            if sep in value:
                raise ValueError(f"must not contain {sep!r}: the files stay in 'directory'")
        if value.startswith("."):
            raise ValueError("must not start with '.' (hidden names are the temporary files)")
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"not a valid template: {exc}") from None
        allowed = ", ".join("{" + f + "}" for f in NAME_FIELDS)
        for _literal, field, spec, conversion in parsed:
            if field is None:
                continue
            if field not in NAME_FIELDS:
                raise ValueError(f"unknown field {{{field}}}; allowed: {allowed}")
            if spec or conversion:
                raise ValueError(f"field {{{field}}} takes no conversion or format spec")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> FileTeeSettings:
        fields = {f for _, f, _, _ in string.Formatter().parse(self.name) if f}
        if "stream" not in fields:
            raise ValueError("name must contain {stream}: without it streams overwrite each other's files")
        if self.request and self.response and "direction" not in fields:
            raise ValueError("name must contain {direction} when both request and response are copied")
        return self


class _BodyFile:
    """The copy of one body: chunks queued on the loop, written in order by one job at a time
    in the shared worker pool, finished (renamed or removed) by the last job."""

    __slots__ = (
        "accepted",
        "directory",
        "done",
        "error",
        "fd",
        "job",
        "label",
        "name",
        "outcome",
        "pending",
        "pending_bytes",
        "settings",
        "tmp_path",
        "truncated",
        "waiter",
    )  # fmt: skip

    def __init__(self, settings: FileTeeSettings, name: str, label: str) -> None:
        self.settings = settings
        self.label = label
        self.directory = str(settings.directory)
        self.name = name
        self.tmp_path = os.path.join(self.directory, f".{name}.{_WRITER}-{secrets.token_hex(4)}.tmp")
        self.fd: int | None = None  # touched only by the one job in flight
        self.pending: list[bytes] = []
        self.pending_bytes = 0  # queued or being written
        self.job: asyncio.Future[OSError | None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.accepted = 0
        self.truncated = False
        self.error: OSError | None = None
        self.outcome: str | None = None  # "end" or "abort" once finishing
        self.done: asyncio.Future[None] | None = None

    # -- loop side ------------------------------------------------------------------------

    async def feed(self, chunk: bytes) -> None:
        if self.error is not None or self.truncated or self.outcome is not None:
            return
        limit = self.settings.max_bytes
        if limit is not None and self.accepted + len(chunk) > limit:
            chunk = chunk[: limit - self.accepted]
            self.truncated = True
            if not chunk:
                return
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        self.accepted += len(chunk)
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        if self.job is None:
            self._submit()
        while self.pending_bytes > self.settings.queue_bytes and self.job is not None:
            loop = asyncio.get_running_loop()
            if self.waiter is None or self.waiter.done():
                self.waiter = loop.create_future()
            await self.waiter

    def start_finish(self, outcome: str) -> asyncio.Future[None]:
        """Queue the finishing step (the first call decides the outcome); its future."""
        if self.done is None:
            self.outcome = outcome
            self.done = asyncio.get_running_loop().create_future()
            if self.job is None:
                self._submit()
        return self.done

    async def finish(self, outcome: str) -> None:
        """Queue the finishing step and wait for it; safe to call again."""
        # Shielded: a cancelled caller must not cancel the bookkeeping; the job runs on anyway.
        await asyncio.shield(self.start_finish(outcome))

    def _submit(self) -> None:
        batch, self.pending = self.pending, []
        size = sum(map(len, batch))
        outcome = self.outcome
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(_pool(), self._run, batch, outcome)
        self.job = job
        job.add_done_callback(lambda fut: self._job_done(fut, size, outcome))

    def _job_done(self, fut: asyncio.Future[OSError | None], size: int, outcome: str | None) -> None:
        self.job = None
        self.pending_bytes -= size
        error = fut.exception() if not fut.cancelled() else None
        if error is None and not fut.cancelled():
            error = fut.result()
        if error is not None and self.error is None:
            self.error = error if isinstance(error, OSError) else OSError(str(error))
            log.error(
                "file_tee: %s: cannot write %s, no longer copying this body: %s", self.label, self.tmp_path, error
            )
        if self.error is not None:
            self.pending_bytes -= sum(map(len, self.pending))
            self.pending = []
        if outcome is not None:  # that was the last job
            if self.done is not None and not self.done.done():
                self.done.set_result(None)
        elif self.pending or self.outcome is not None:
            self._submit()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # -- worker thread side ----------------------------------------------------------------

    def _run(self, batch: list[bytes], outcome: str | None) -> OSError | None:
        """Write ``batch``; with ``outcome``, finish the file. Returns the write error, if any."""
        error = None
        if batch and self.error is None:
            try:
                fd = self.fd if self.fd is not None else self._open()
                for data in batch:
                    view = memoryview(data)
                    while view:
                        view = view[_os_write(fd, view) :]
            except OSError as exc:
                error = exc
        if outcome is not None:
            self._finish(outcome, failed=error is not None or self.error is not None)
        return error

    def _open(self) -> int:
        """Create the hidden temporary file (never following a link, never outside the
        directory); its descriptor."""
        os.makedirs(self.directory, exist_ok=True)
        real_dir = os.path.realpath(self.directory)
        for path in (self.tmp_path, self._final("")):
            if os.path.dirname(os.path.realpath(path)) != real_dir:
                raise OSError(f"refusing to write outside {real_dir}: {path}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        self.fd = fd = os.open(self.tmp_path, flags, 0o600)
        return fd

    def _final(self, suffix: str) -> str:
        return os.path.join(self.directory, self.name + suffix)

    def _finish(self, outcome: str, failed: bool) -> None:
        try:
            if outcome == "abort":
                if self.fd is None:
                    return  # no byte of this body arrived: nothing to leave behind
                self._close_fd()
                if self.settings.on_abort == "delete":
                    os.unlink(self.tmp_path)
                    return
                suffix = PARTIAL
            else:
                if self.fd is None:
                    if failed:
                        return
                    self._open()  # an empty body still gets its (empty) file
                self._close_fd()
                suffix = PARTIAL if failed else ".truncated" if self.truncated else ""
            os.replace(self.tmp_path, self._final(suffix))
            if suffix == PARTIAL and self.settings.max_partial_files is not None:
                prune_partials(self.directory, self.settings.max_partial_files)
        except OSError as exc:
            log.error("file_tee: %s: cannot finish %s: %s", self.label, self.tmp_path, exc)
            self._close_fd()
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_leftover_temporaries(directory: str) -> list[str]:
    """Delete the temporary files in ``directory`` that a killed process of this machine left
    (its pid is gone or is ours: at start-up we have written nothing yet); their names."""
    host, _, me = _WRITER.rpartition("-")
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return []
    leftovers = []
    for entry in entries:
        found = _TMP_NAME.match(entry)
        if found is None or found["host"] != host:
            continue
        if found["pid"] != me and _alive(int(found["pid"])):
            continue  # another live process (a worker) is writing it
        leftovers.append(entry)
    return _unlink_all(directory, leftovers)


def _unlink_all(directory: str, names: list[str]) -> list[str]:
    """Delete ``names`` in ``directory``; the names of those that were still there."""
    removed: list[str] = []
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def prune_partials(directory: str, keep: int) -> list[str]:
    """Delete the oldest ``.partial`` files of ``directory`` beyond the newest ``keep``; their names."""
    partials = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(PARTIAL) and not entry.name.startswith("."):
                    try:
                        partials.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
                    except FileNotFoundError:
                        continue
    except FileNotFoundError:
        return []
    if len(partials) <= keep:
        return []
    partials.sort()
    return _unlink_all(directory, [name for _, name in partials[: len(partials) - keep]])


class FileTee(Plugin[FileTeeSettings]):
    """Copies request and/or response bodies to files; hands every chunk on untouched."""

    name = "file_tee"
    Settings = FileTeeSettings
    observes_only = True  # a copy changes nothing: routes of file_tee alone leave the data path

    @classmethod
    def needs_for(cls, settings: FileTeeSettings) -> Needs:
        """Only the bodies it copies, as they come."""
        return Needs(
            request_body="streamed" if settings.request else None,
            response_body="streamed" if settings.response else None,
        )

    def __init__(self, settings: FileTeeSettings, stream: StreamInfo) -> None:
        super().__init__(settings, stream)
        self._stream_key = f"{sanitise(stream.stream_id)}-{secrets.token_hex(6)}"
        self._time: str | None = None
        self._files: dict[str, _BodyFile] = {}
        self._ended: set[str] = set()

    def _file(self, direction: str) -> _BodyFile:
        body = self._files.get(direction)
        if body is None:
            if self._time is None:
                self._time = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            headers = self.stream.request_headers
            fields = {
                "route": self.stream.route,
                "stream": self._stream_key,
                "direction": direction,
                "time": self._time,
                "method": (headers.get(":method") if headers is not None else None) or "",
                "authority": (headers.get(":authority") if headers is not None else None) or "",
            }
            name = self.settings.name.format(**{k: sanitise(v) for k, v in fields.items()})[:NAME_MAX]
            if name.startswith("."):
                name = "_" + name[1:]
            label = f"stream {self.stream.stream_id} route {self.stream.route} {direction} body"
            body = self._files[direction] = _BodyFile(self.settings, name, label)
        return body

    async def on_request_body(self, chunk: bytes) -> bytes:
        if self.settings.request:
            await self._file("request").feed(chunk)
        return chunk

    async def on_request_body_end(self) -> bytes:
        if self.settings.request:
            self._ended.add("request")
            await self._file("request").finish("end")
        return b""

    async def on_response_body(self, chunk: bytes) -> bytes:
        if self.settings.response:
            await self._file("response").feed(chunk)
        return chunk

    async def on_response_body_end(self) -> bytes:
        if self.settings.response:
            self._ended.add("response")
            await self._file("response").finish("end")
        return b""

    async def close(self, error: BaseException | None) -> None:
        # A body that did not end normally is cut short whatever the error: never complete.
        # Every file's last job is queued before waiting, so all are released even if the
        # wait is cancelled (the jobs then finish in the pool on their own).
        done = [body.start_finish("end" if d in self._ended else "abort") for d, body in self._files.items()]
        for future in done:
            await asyncio.shield(future)


@hookimpl
def register_plugins(register: Callable[[type[Plugin[Any]]], None]) -> None:
    register(FileTee)


@hookimpl
def host_started(settings: Any) -> None:
    """Clean the directories of every route that runs file_tee: temporary files a killed host
    left, and ``.partial`` files beyond ``max_partial_files``."""
    seen: set[tuple[str, int | None]] = set()
    for route in settings.routes.values():
        if FileTee.name not in route.chain:
            continue
        merged = {**settings.plugins.get(FileTee.name, {}), **route.plugins.get(FileTee.name, {})}
        tee = FileTeeSettings(**merged)
        seen.add((str(tee.directory), tee.max_partial_files))
    for directory, keep in sorted(seen, key=str):
        removed = remove_leftover_temporaries(directory)
        if removed:
            log.info("file_tee: removed %d temporary files a stopped host left in %s", len(removed), directory)
        if keep is not None:
            pruned = prune_partials(directory, keep)
            if pruned:
                log.info(
                    "file_tee: removed %d old .partial files in %s (max_partial_files %d)", len(pruned), directory, keep
                )
