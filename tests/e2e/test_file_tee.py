"""file_tee behind a real Envoy: the copies on disk are byte for byte what the client sent and
what it got back, a client that hangs up mid-upload leaves only ``.partial`` files, and ten
concurrent 70 MiB uploads with every body copied all complete exactly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from e2e_clients import ROUTE_PATHS, MiB, Payload, abandon_upload, h1_request, h2_request

from extproc_host.stack import Stack
from extproc_host.stack.demo import sha256_file

pytestmark = pytest.mark.e2e

ROUTES = ("full-duplex-streamed", "streamed")


@pytest.fixture(scope="module")
def tee_stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("file-tee")
    config = directory.parent / f"{directory.name}.toml"
    routes = "".join(f'\n[routes.{r}]\nchain = ["file_tee"]\n' for r in ROUTES)
    config.write_text(
        f'[plugins.file_tee]\ndirectory = "{directory}"\n'
        f'name = "{{route}}-{{stream}}-{{direction}}.body"\n{routes}\n'
        '[routes.default]\nchain = ["passthrough"]\n'
    )
    with Stack("envoy/full_duplex.yaml", config) as stack:
        yield stack, directory


@pytest.fixture
def tee(tee_stack):
    """The module's stack and its (empty) tee directory; emptied again after the test."""
    stack, directory = tee_stack
    for path in directory.iterdir():
        path.unlink()
    yield stack, directory
    for path in directory.iterdir():
        path.unlink()


def wait_for(directory: Path, done, timeout: float = 20.0) -> list[Path]:
    """The directory's files once ``done(names)`` holds (files of a cut stream are finished
    when the host learns of the cut, a moment after the client hung up)."""
    deadline = time.monotonic() + timeout
    while True:
        paths = sorted(directory.iterdir())
        if done([p.name for p in paths]) or time.monotonic() > deadline:
            return paths
        time.sleep(0.05)


def pairs(directory: Path, route: str) -> list[tuple[Path, Path]]:
    """(request copy, response copy) per stream; asserts every file is a complete copy."""
    paths = sorted(directory.iterdir())
    requests = [p for p in paths if p.name.endswith("-request.body")]
    assert len(paths) == 2 * len(requests), [p.name for p in paths]
    out = []
    for req in requests:
        assert req.name.startswith(f"{route}-")
        resp = req.with_name(req.name.removesuffix("-request.body") + "-response.body")
        assert resp.exists(), [p.name for p in paths]
        out.append((req, resp))
    return out


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("h2", [False, True], ids=["h1", "h2c"])
@pytest.mark.parametrize("size", [0, 3 * MiB + 7])
async def test_copies_are_byte_identical(tee, payload, route, h2, size):
    stack, directory = tee
    body: Payload = payload(size)
    request = h2_request if h2 else h1_request
    echoed = await request(stack.url + ROUTE_PATHS[route], body=body)
    assert echoed.status == 200
    assert (echoed.size, echoed.sha256) == (size, body.sha256)
    # Each copy is renamed to its final name before its body's last bytes go on, so both are
    # complete by the time the client has the whole response.
    if size == 0 and not h2:
        # An empty h1 body (content-length 0) and its empty echo reach the host as headers
        # only: no body, no copy. (h2c sends an empty DATA frame: empty copies.)
        assert list(directory.iterdir()) == []
        return
    [(req, resp)] = pairs(directory, route)
    assert sha256_file(req) == body.sha256
    assert sha256_file(resp) == echoed.sha256


@pytest.mark.parametrize("route", ROUTES)
def test_abandoned_upload_leaves_only_partial_files(tee, route):
    stack, directory = tee
    sent = 2 * MiB
    abandon_upload(stack.envoy_port, ROUTE_PATHS[route], announced=8 * MiB, sent=sent)

    def settled(names: list[str]) -> bool:
        return any(n.endswith("-request.body.partial") for n in names) and not any(n.endswith(".tmp") for n in names)

    paths = wait_for(directory, settled)
    names = [p.name for p in paths]
    assert all(n.endswith(".partial") for n in names), names  # nothing looks complete
    [req] = [p for p in paths if p.name.endswith("-request.body.partial")]
    data = req.read_bytes()
    assert 0 < len(data) <= sent and data == b"a" * len(data)


async def test_ten_concurrent_70mib_uploads_with_both_bodies_copied(tee, payload):
    stack, directory = tee
    body = payload(70 * MiB)
    url = stack.url + ROUTE_PATHS["full-duplex-streamed"]
    results = await asyncio.gather(*(h1_request(url, body=body) for _ in range(10)))
    for echoed in results:
        assert echoed.status == 200
        assert (echoed.size, echoed.sha256) == (body.size, body.sha256)
    found = pairs(directory, "full-duplex-streamed")
    assert len(found) == 10
    digests = await asyncio.gather(*(asyncio.to_thread(sha256_file, p) for pair in found for p in pair))
    assert digests == [body.sha256] * 20
