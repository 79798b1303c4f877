"""SIGTERM with keep-alive connections open: none is cut under a request (sparc.draining).

A proxy that keeps connections to SPARC (nginx's upstream keepalive) may send a request down an
idle one just as SPARC stops; uvicorn's own shutdown closed such connections at once, so that
request met a reset and the proxy answered 502.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.processes import poll, sparc_env, start_serve

pytestmark = pytest.mark.faults


@pytest.fixture
def server(cli_database: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process, base = start_serve(sparc_env(DATABASE_URL=cli_database), cwd=tmp_path)
    try:
        poll(f"{base}/readyz", process=process)
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def address(base: str) -> tuple[str, int]:
    parts = urlsplit(base)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def ask(connection: socket.socket, path: str) -> tuple[str, dict[str, str]]:
    """Send one keep-alive GET on `connection`; the status line and headers of the answer."""
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: sparc\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed before an answer: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (h.partition(":") for h in lines)}
    while len(body) < int(headers["content-length"]):
        body += connection.recv(65536)
    return status, headers


def refuses_connections(base: str) -> bool:
    try:
        socket.create_connection(address(base), timeout=1).close()
    except OSError:
        return True
    return False


def test_a_request_on_an_idle_keep_alive_connection_after_sigterm_is_answered_then_closed(
    server: tuple[subprocess.Popen[str], str],
) -> None:
    process, base = server
    with contextlib.closing(socket.create_connection(address(base), timeout=30)) as connection:
        status, headers = ask(connection, "/healthz")
        assert status == "HTTP/1.1 200 OK" and "connection" not in headers  # kept alive
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not refuses_connections(base):  # shutdown has begun: new clients are turned away
            assert time.monotonic() < deadline, "sparc serve still accepts after SIGTERM"
            time.sleep(0.02)
        # A proxy sending its next request down the connection it kept.
        status, headers = ask(connection, "/healthz")
        assert status == "HTTP/1.1 200 OK"
        assert headers["connection"] == "close"
        assert connection.recv(1) == b""  # and SPARC closed it after that answer
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_an_idle_keep_alive_connection_does_not_hold_up_the_shutdown_past_its_timeout(
    server: tuple[subprocess.Popen[str], str],
) -> None:
    process, base = server
    with contextlib.closing(socket.create_connection(address(base), timeout=30)) as connection:
        ask(connection, "/healthz")
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # Nobody sends on it: uvicorn's keep-alive timeout (5 s) closes it, and SPARC exits.
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - began
        assert connection.recv(1) == b""
    assert process.returncode == 0, stderr
    assert took < 5 + 10, f"the shutdown took {took:.1f} s"  # the timeout, and a busy machine
