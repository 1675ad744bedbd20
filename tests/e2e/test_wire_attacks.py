"""The known HTTP/2 attacks against the real host process, while ordinary requests go through a
real Envoy to it on their own connection.

Each attack runs from two threads of raw sockets straight at the host's port for a few seconds
(reconnecting whenever the host closes the connection). Meanwhile a client sends a 1 KiB POST
through Envoy every 50 ms (full duplex, echoed byte for byte), and the host's RSS is sampled.
Every attack must leave the host's memory within ``RSS_BOUND`` of where it started, every
ordinary request must succeed within ``LEGIT_BOUND`` seconds during the attack and after it,
and the host must end the attacker's connections the way the attack calls for (GOAWAY
ENHANCE_YOUR_CALM for floods, a deadline for slow or stalled peers). The bounds are generous:
this is about the host not falling over on a shared 2-core machine, not about speed.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import hpack
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc_host.stack import Stack
from tests.unit.h2peer import (
    CODES,
    CONTINUATION,
    DATA,
    END_HEADERS,
    HEADERS,
    PREFACE,
    grpc_message,
    grpc_request,
    ping,
    raw,
    rst_stream,
    settings,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
ATTACK_SECONDS = 3.0
AFTER_SECONDS = 1.0
RSS_BOUND = 96 * MiB  # the host's peak RSS over its RSS before the attack
LEGIT_BOUND = 3.0  # seconds for any ordinary request, during the attack and after
ENHANCE_YOUR_CALM = CODES["ENHANCE_YOUR_CALM"]
# No count of streams bounds the host here ([server] max_concurrent_streams = 0): the attacks
# that hold streams open (window stall, huge announced messages) would otherwise fill that
# count and refuse ordinary streams, which is admission's business, not the wire's; memory is
# bounded by the HTTP/2 limit per connection and the bytes budget.
HOST_CONFIG = """\
[server]
log_level = "warning"
max_concurrent_streams = 0
[server.http2]
preface_timeout_seconds = 1
frame_timeout_seconds = 1
stall_timeout_seconds = 1
[routes.default]
chain = ["passthrough"]
body_mode = "FULL_DUPLEX_STREAMED"
"""
FIRST_MESSAGE = grpc_message(
    pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(end_of_stream=False), observability_mode=False
    ).SerializeToString()
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = tmp_path_factory.mktemp("attacks") / "host.toml"
    config.write_text(HOST_CONFIG)
    with Stack(None, config) as running:
        yield running


# -- the attacks: each is the bytes one connection sends after the preface, again and again -------


class Attack:
    """One connection's behaviour: ``start`` once after the preface, then ``repeat`` until the
    host closes the connection or the attack ends."""

    reads = True  # drains what the host sends (False: a peer that never reads)
    pause = 0.0  # seconds between two sends of ``repeat``

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()
        self.stream_id = 1

    def next_stream(self) -> int:
        stream_id = self.stream_id
        self.stream_id += 2
        return stream_id

    def start(self) -> bytes:
        return b""

    def repeat(self) -> bytes:
        raise NotImplementedError


class RapidReset(Attack):
    """CVE-2023-44487: streams opened and reset at once, 100 per write."""

    def repeat(self) -> bytes:
        out = []
        for _ in range(100):
            stream_id = self.next_stream()
            out.append(raw(HEADERS, END_HEADERS, stream_id, self.encoder.encode(grpc_request(PROCESS))))
            out.append(rst_stream(stream_id))
        return b"".join(out)


class RapidResetStarted(Attack):
    """Rapid reset with the reset in a later write than the stream, after its first message, so
    that handlers have started when the resets come."""

    pause = 0.002

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[int] = []

    def repeat(self) -> bytes:
        out = [rst_stream(stream_id) for stream_id in self.opened]
        self.opened = []
        for _ in range(50):
            stream_id = self.next_stream()
            self.opened.append(stream_id)
            out.append(raw(HEADERS, END_HEADERS, stream_id, self.encoder.encode(grpc_request(PROCESS))))
            out.append(raw(DATA, 0, stream_id, FIRST_MESSAGE))
        return b"".join(out)


class ContinuationFlood(Attack):
    """A header block that never ends: CONTINUATION after CONTINUATION (CVE-2024-27316 and kin)."""

    def start(self) -> bytes:
        return raw(HEADERS, 0, self.next_stream(), self.encoder.encode(grpc_request(PROCESS)))

    def repeat(self) -> bytes:
        return raw(CONTINUATION, 0, 1, b"\x00\x05x-pad\x7f" + b"\x81\x07" + b"v" * 1000) * 4


class EmptyContinuations(Attack):
    """A header block continued by empty CONTINUATION frames, endlessly."""

    def start(self) -> bytes:
        return raw(HEADERS, 0, self.next_stream(), self.encoder.encode(grpc_request(PROCESS)))

    def repeat(self) -> bytes:
        return raw(CONTINUATION, 0, 1) * 200


class HpackBomb(Attack):
    """One 4 KB entry in the dynamic table, then blocks that refer to it hundreds of times."""

    def start(self) -> bytes:
        block = self.encoder.encode([*grpc_request(PROCESS), ("x-bomb", "b" * 4000)])
        return raw(HEADERS, END_HEADERS, self.next_stream(), block)

    def repeat(self) -> bytes:
        bomb = self.encoder.encode(grpc_request(PROCESS)) + bytes([0x80 | 62]) * 500
        return raw(HEADERS, END_HEADERS | 1, self.next_stream(), bomb)


class OversizedHeaders(Attack):
    """A single HEADERS frame of 200 KB (under the frame size limit, over the header list's)."""

    def repeat(self) -> bytes:
        fields = [*grpc_request(PROCESS), *((f"x-h{i}", "v" * 1000) for i in range(200))]
        return raw(HEADERS, END_HEADERS | 1, self.next_stream(), hpack.Encoder().encode(fields))


class ZeroLengthHeaders(Attack):
    """Header blocks of thousands of empty fields (cheap to send, each one decoded)."""

    def repeat(self) -> bytes:
        return raw(HEADERS, END_HEADERS | 1, self.next_stream(), b"\x00\x00\x00" * 2000)


class SettingsFlood(Attack):
    """SETTINGS frames, each changing INITIAL_WINDOW_SIZE many times (each change once walked
    every open stream)."""

    def start(self) -> bytes:
        return b"".join(
            raw(HEADERS, END_HEADERS, self.next_stream(), self.encoder.encode(grpc_request(PROCESS))) for _ in range(50)
        )

    def repeat(self) -> bytes:
        return settings(*((4, 65535 + i) for i in range(100))) * 20


class PingFlood(Attack):
    """PINGs from a peer that never reads the answers."""

    reads = False

    def repeat(self) -> bytes:
        return ping() * 1000


class EmptyFrames(Attack):
    """Empty DATA frames on an open stream, without END_STREAM."""

    def start(self) -> bytes:
        return raw(HEADERS, END_HEADERS, self.next_stream(), self.encoder.encode(grpc_request(PROCESS)))

    def repeat(self) -> bytes:
        return raw(DATA, 0, 1) * 1000


class TinyData(Attack):
    """A message sent one byte per DATA frame."""

    def start(self) -> bytes:
        return raw(HEADERS, END_HEADERS, self.next_stream(), self.encoder.encode(grpc_request(PROCESS))) + raw(
            DATA, 0, 1, b"\0" + struct.pack(">L", 100 * MiB)
        )

    def repeat(self) -> bytes:
        return raw(DATA, 0, 1, b"x") * 1000


class WindowStall(Attack):
    """Streams whose answers can never be sent (a zero window), and no window ever given."""

    pause = 0.05

    def start(self) -> bytes:
        return settings((4, 0))

    def repeat(self) -> bytes:
        out = []
        for _ in range(10):
            stream_id = self.next_stream()
            out.append(raw(HEADERS, END_HEADERS, stream_id, self.encoder.encode(grpc_request(PROCESS))))
            out.append(raw(DATA, 0, stream_id, FIRST_MESSAGE))
        return b"".join(out)


class HugeAnnounced(Attack):
    """Streams whose first message announces 100 MiB, of which 10 bytes come."""

    pause = 0.01

    def repeat(self) -> bytes:
        out = []
        for _ in range(20):
            stream_id = self.next_stream()
            out.append(raw(HEADERS, END_HEADERS, stream_id, self.encoder.encode(grpc_request(PROCESS))))
            out.append(raw(DATA, 0, stream_id, b"\0" + struct.pack(">L", 100 * MiB) + b"0123456789"))
        return b"".join(out)


ATTACKS: dict[str, type[Attack]] = {
    "rapid-reset": RapidReset,
    "rapid-reset-started": RapidResetStarted,
    "continuation-flood": ContinuationFlood,
    "empty-continuations": EmptyContinuations,
    "hpack-bomb": HpackBomb,
    "oversized-header-list": OversizedHeaders,
    "zero-length-headers": ZeroLengthHeaders,
    "settings-flood": SettingsFlood,
    "ping-flood": PingFlood,
    "empty-frames": EmptyFrames,
    "tiny-data-frames": TinyData,
    "window-stall": WindowStall,
    "huge-announced-messages": HugeAnnounced,
}
#: How each attack's connections must end (GOAWAY error codes seen; None: the attack itself is
#: not refused, only its cost bounded).
EXPECTED_GOAWAY: dict[str, int | None] = dict.fromkeys(ATTACKS, ENHANCE_YOUR_CALM)
EXPECTED_GOAWAY["huge-announced-messages"] = None


@dataclass
class Outcome:
    connections: int = 0
    goaways: list[int] = field(default_factory=list)
    bytes_sent: int = 0


class GoawayScanner:
    """Reads the host's frames as they arrive and keeps only GOAWAY error codes: the frames
    before a GOAWAY (answers to the attack's streams) may be megabytes, none of them kept."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.pending = b""  # the start of a frame not yet whole (at most a GOAWAY's first 17 bytes)
        self.skip = 0  # payload bytes of the current non-GOAWAY frame still to pass over

    def feed(self, data: bytes) -> None:
        data = self.pending + data
        self.pending = b""
        pos = 0
        while pos < len(data):
            if self.skip:
                step = min(self.skip, len(data) - pos)
                self.skip -= step
                pos += step
                continue
            if len(data) - pos < 9:
                break
            length = int.from_bytes(data[pos : pos + 3], "big")
            if data[pos + 3] != 7:
                pos += 9
                self.skip = length
                continue
            if len(data) - pos < 9 + length:
                break
            if length >= 8:
                self.codes.append(struct.unpack(">L", data[pos + 13 : pos + 17])[0])
            pos += 9 + length
        self.pending = data[pos:]


def goaway_codes(data: bytes) -> list[int]:
    scanner = GoawayScanner()
    scanner.feed(data)
    return scanner.codes


def run_attacker(port: int, make: Callable[[], Attack], stop: threading.Event, outcome: Outcome) -> None:
    while not stop.is_set():
        attack = make()
        sock = socket.create_connection(("127.0.0.1", port))
        outcome.connections += 1
        scanner = GoawayScanner()
        sock.settimeout(0.5)
        try:
            # The host's SETTINGS acknowledged at once (unread): each attack is about itself,
            # not about a peer that never acknowledges (SETTINGS_TIMEOUT ends those).
            sock.sendall(PREFACE + settings() + settings(ack=True) + attack.start())
            while not stop.is_set():
                chunk = attack.repeat()
                sock.sendall(chunk)
                outcome.bytes_sent += len(chunk)
                if attack.reads:
                    sock.setblocking(False)
                    try:
                        while data := sock.recv(1 << 20):
                            scanner.feed(data)
                    except BlockingIOError:
                        pass
                    else:
                        break  # the host closed the connection
                    finally:
                        sock.settimeout(0.5)
                if attack.pause:
                    time.sleep(attack.pause)
        except OSError:  # closed or reset by the host, or blocked because it stopped reading
            pass
        finally:
            try:
                sock.settimeout(0.5)
                while data := sock.recv(1 << 20):
                    scanner.feed(data)
            except OSError:
                pass
            sock.close()
        outcome.goaways.extend(scanner.codes)


def run_slowloris(port: int, stop: threading.Event, outcome: Outcome) -> None:
    socks = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(PREFACE[:1])
        socks.append(sock)
        outcome.connections += 1
    sent = 1
    while not stop.wait(0.5) and sent < len(PREFACE):  # a byte every 0.5 s: 12 s for the preface
        for sock in socks:
            try:
                sock.send(PREFACE[sent : sent + 1])
            except OSError:
                pass
        sent += 1
    for sock in socks:
        sock.settimeout(0.5)
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except OSError:
            pass
        outcome.goaways.extend(goaway_codes(received))
        sock.close()


class LegitClient:
    """1 KiB POSTs through Envoy, one every 50 ms, each echoed byte for byte."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[tuple[float, float]] = []  # (start, seconds)
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = bytes(range(256)) * 4
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=LEGIT_BOUND * 3)
                conn.request("POST", "/legit", body=body, headers={"content-type": "application/octet-stream"})
                response = conn.getresponse()
                echoed = response.read()
                conn.close()
                if response.status != 200 or hashlib.sha256(echoed).digest() != hashlib.sha256(body).digest():
                    self.failures.append(f"status {response.status}, {len(echoed)} bytes")
            except OSError as exc:
                self.failures.append(repr(exc))
            self.latencies.append((start, time.monotonic() - start))
            self.stop.wait(0.05)


def test_the_legit_client_alone(stack: Stack) -> None:
    """The yardstick: without an attack, every ordinary request succeeds, fast."""
    client = LegitClient(stack.envoy_port)
    client.thread.start()
    time.sleep(1.0)
    client.stop.set()
    client.thread.join(10)
    assert not client.failures and len(client.latencies) >= 10
    assert max(seconds for _, seconds in client.latencies) < LEGIT_BOUND


@pytest.mark.parametrize("name", [*ATTACKS, "slowloris"])
def test_an_attack_leaves_memory_bounded_and_ordinary_requests_served(stack: Stack, name: str) -> None:
    client = LegitClient(stack.envoy_port)
    client.thread.start()
    time.sleep(0.3)
    baseline = stack.host_rss()
    peak = baseline
    stop = threading.Event()
    outcomes = [Outcome(), Outcome()]
    if name == "slowloris":
        attackers = [threading.Thread(target=run_slowloris, args=(stack.host_port, stop, outcomes[0]))]
    else:
        attackers = [
            threading.Thread(target=run_attacker, args=(stack.host_port, ATTACKS[name], stop, outcome))
            for outcome in outcomes
        ]
    started = time.monotonic()
    for thread in attackers:
        thread.start()
    while time.monotonic() - started < ATTACK_SECONDS:
        peak = max(peak, stack.host_rss())
        time.sleep(0.05)
    stop.set()
    for thread in attackers:
        thread.join(10)
    ended = time.monotonic()
    while time.monotonic() - ended < AFTER_SECONDS:
        peak = max(peak, stack.host_rss())
        time.sleep(0.05)
    client.stop.set()
    client.thread.join(10)
    after = stack.host_rss()

    during = [seconds for start, seconds in client.latencies if started <= start < ended]
    later = [seconds for start, seconds in client.latencies if start >= ended]
    goaways = [code for outcome in outcomes for code in outcome.goaways]
    print(
        f"{name}: {sum(o.connections for o in outcomes)} attacker connections, "
        f"{sum(o.bytes_sent for o in outcomes) / MiB:.1f} MiB sent, GOAWAY codes {sorted(set(goaways))}; "
        f"host RSS {baseline / MiB:.0f} -> peak {peak / MiB:.0f} -> {after / MiB:.0f} MiB; "
        f"ordinary requests: {len(during)} during (max {max(during, default=0):.3f}s), "
        f"{len(later)} after (max {max(later, default=0):.3f}s), failures {client.failures[:3]}"
    )
    assert stack.exit_status("host") is None, "the host died"
    assert not client.failures, client.failures[:5]
    assert during and later, "no ordinary request completed during or after the attack"
    assert max(during + later) < LEGIT_BOUND
    assert peak - baseline < RSS_BOUND
    expected = EXPECTED_GOAWAY.get(name, ENHANCE_YOUR_CALM)
    if name == "slowloris":
        assert len(goaways) == 200, "a slow connection outlived the preface deadline"
    elif expected is not None:
        assert expected in goaways, f"the host never ended an attacker's connection with {expected}: {goaways[:10]}"
