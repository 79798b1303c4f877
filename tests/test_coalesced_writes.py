"""An answer goes out in one send (sparc.coalesced_writes), and nothing waits on that.

The transport tests run over a real socket pair; the one thing stood in for is the count of
writes the connection's transport gets, which a client cannot see. The `sparc serve` tests check
what a client can: pipelined requests, `Expect: 100-continue`, a malformed request, keep-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sparc.coalesced_writes import FLUSH_AT_BYTES, CoalescingTransport
from tests.processes import serving_ready, sparc_env

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),  # as `sparc serve` runs
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


class Counted(asyncio.Protocol):
    """The server end's protocol: nothing to do but exist."""


class WritesCounted(asyncio.Transport):
    """The real transport of a connection, with its writes counted."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()


@contextlib.asynccontextmanager
async def connection() -> Any:
    """A coalescing transport over one end of a socket pair, and the other end to read from."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(Counted, ours)
    counted = WritesCounted(transport)  # type: ignore[arg-type]
    try:
        yield CoalescingTransport(counted, loop), counted, theirs
    finally:
        transport.abort()
        theirs.close()


async def received(peer: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(5):
        while len(data) < size:
            chunk = await loop.sock_recv(peer, 65536)
            if not chunk:
                break
            data += chunk
    return data


async def test_writes_of_one_turn_leave_in_one_write_in_order() -> None:
    async with connection() as (coalescing, counted, peer):
        coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        coalescing.write(bytearray(b"o"))
        coalescing.write(memoryview(b"k"))
        assert counted.writes == []  # held until the turn ends
        assert coalescing.get_write_buffer_size() == 40
        expected = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        assert await received(peer, len(expected)) == expected
        assert counted.writes == [expected]


async def test_flush_sends_at_once_and_the_end_of_turn_then_has_nothing_to_send() -> None:
    async with connection() as (coalescing, counted, peer):
        coalescing.write(b"head ")
        coalescing.write(b"body")
        coalescing.flush()
        assert counted.writes == [b"head body"]
        assert await received(peer, 9) == b"head body"
        await asyncio.sleep(0)  # the turn's own flush runs: nothing more is written
        assert counted.writes == [b"head body"]


async def test_a_write_with_nothing_after_it_still_leaves_at_the_end_of_its_turn() -> None:
    # A streamed answer's head, or `100 Continue`: nobody flushes it, the end of the turn does.
    async with connection() as (coalescing, counted, peer):
        coalescing.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert await received(peer, 25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        coalescing.write(b"later")
        assert await received(peer, 5) == b"later"
        assert counted.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"later"]


async def test_close_sends_what_was_written_first_and_abort_drops_it() -> None:
    async with connection() as (coalescing, counted, peer):
        coalescing.write(b"last words")
        coalescing.close()
        assert await received(peer, 11) == b"last words"  # then end of file
        assert coalescing.is_closing()
    async with connection() as (coalescing, counted, peer):
        coalescing.write(b"never sent")
        coalescing.abort()
        assert await received(peer, 1) == b""
        assert counted.writes == []


async def test_a_write_after_close_goes_to_the_transport_as_it_would_without_coalescing() -> None:
    async with connection() as (coalescing, counted, _peer):
        coalescing.close()
        coalescing.write(b"too late")
        assert counted.writes == [b"too late"]  # the transport itself drops it


async def test_a_fast_stream_reaches_the_transport_by_the_high_water_mark() -> None:
    # So the real transport's buffer fills and flow control can pause the writer within a turn.
    async with connection() as (coalescing, counted, peer):
        chunk = b"x" * 16384
        for _ in range(FLUSH_AT_BYTES // len(chunk) - 1):
            coalescing.write(chunk)
        assert counted.writes == []
        coalescing.write(chunk)
        assert counted.writes == [chunk * (FLUSH_AT_BYTES // len(chunk))]
        assert coalescing.get_write_buffer_size() == counted.get_write_buffer_size()
        assert len(await received(peer, FLUSH_AT_BYTES)) == FLUSH_AT_BYTES


async def test_a_bytearray_is_sent_as_it_was_when_written() -> None:
    async with connection() as (coalescing, _counted, peer):
        body = bytearray(b"before")
        coalescing.write(body)
        body[:] = b"after!"  # the caller reuses its buffer before the turn ends
        assert await received(peer, 6) == b"before"


# -- through `sparc serve` -------------------------------------------------------------------


@pytest.fixture
def base(cli_database: str, tmp_path: Path) -> Iterator[str]:
    with serving_ready(sparc_env(DATABASE_URL=cli_database), cwd=tmp_path) as url:
        yield url


@contextlib.contextmanager
def raw_connection(base: str) -> Iterator[socket.socket]:
    parts = urlsplit(base)
    assert parts.hostname is not None and parts.port is not None
    with contextlib.closing(socket.create_connection((parts.hostname, parts.port), 30)) as sock:
        yield sock


def read_answer(sock: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """One answer from `sock`, after what was `buffered` of it: its status line, its body and
    whatever came after it (the next answer's start)."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer's head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (h.partition(b":") for h in lines)}
    length = int(headers.get(b"content-length", b"0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed inside an answer's body: {rest!r}"
        rest += chunk
    return status, rest[:length], rest[length:]


def test_pipelined_requests_are_answered_in_order_on_one_connection(base: str) -> None:
    with raw_connection(base) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: sparc\r\n\r\n"
            b"GET /no/such/page HTTP/1.1\r\nHost: sparc\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: sparc\r\n\r\n"
        )
        statuses = []
        rest = b""
        for _ in range(3):
            status, _, rest = read_answer(sock, rest)
            statuses.append(status)
        assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200 OK"]
        assert rest == b""


def test_expect_100_continue_is_answered_before_the_body_is_sent(base: str) -> None:
    body = b'{"email": "ada@example.org", "password": "not the password"}'
    with raw_connection(base) as sock:
        sock.sendall(
            b"POST /auth/login HTTP/1.1\r\nHost: sparc\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        # The interim answer is written while the endpoint waits for the body: no answer's
        # completion flushes it, the end of the event loop's turn does.
        interim = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in interim:
            assert time.monotonic() < deadline, f"no 100 Continue: {interim!r}"
            chunk = sock.recv(65536)
            assert chunk
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        status, _, _ = read_answer(sock, interim.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))
        assert status == b"HTTP/1.1 401 Unauthorized"


def test_a_malformed_request_gets_its_400_before_the_connection_closes(base: str) -> None:
    with raw_connection(base) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, body, _ = read_answer(sock)
        assert status == b"HTTP/1.1 400 Bad Request"
        assert body == b"Invalid HTTP request received."
        assert sock.recv(65536) == b""  # and then it closes


def test_a_kept_alive_connection_serves_request_after_request(base: str) -> None:
    with raw_connection(base) as sock:
        for _ in range(50):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: sparc\r\n\r\n")
            status, body, rest = read_answer(sock)
            assert (status, rest) == (b"HTTP/1.1 200 OK", b"")
            assert body.startswith(b"{")
