"""SIGTERM: `sparc serve` stops accepting, lets in-flight requests finish within
SPARC_SHUTDOWN_GRACE, then cancels what is left (rolled back) and closes the pool."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import asyncpg
import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sparc.database import get_db_client
from sparc.settings import Settings
from tests.conftest import asyncpg_dsn, poll_until, poll_until_async
from tests.dbapp import sparc_connections, tiny_app
from tests.processes import free_port, poll, sparc_env, start_serve

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

IN_FLIGHT = 3


@pytest.fixture
def server(
    cli_database: str, tmp_path: Path, grace: str, workers: str
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = sparc_env(DATABASE_URL=cli_database, DB_POOL_MAX_SIZE="5", SPARC_SHUTDOWN_GRACE=grace)
    process, base = start_serve(env, "--workers", workers, cwd=tmp_path)
    try:
        poll(f"{base}/readyz", process=process)
        yield process, base
    finally:
        if process.returncode is None:  # the test did not see it exit: make sure it has
            process.kill()
            process.communicate()


@pytest.fixture
async def lock_holder(cli_database: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own, which can lock the users table against inserts."""
    connection = await asyncpg.connect(asyncpg_dsn(cli_database))
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def observer(cli_database: str) -> AsyncIterator[asyncpg.Connection]:
    """Another connection, outside any transaction, so pg_stat_activity is read afresh."""
    connection = await asyncpg.connect(asyncpg_dsn(cli_database))
    try:
        yield connection
    finally:
        await connection.close()


def accepts_connections(base: str) -> bool:
    address = urlsplit(base)
    try:
        socket.create_connection((address.hostname, address.port), timeout=1).close()
    except OSError:
        return False
    return True


async def register_in_flight(
    base: str,
    lock_holder: asyncpg.Connection,
    observer: asyncpg.Connection,
    group: anyio.abc.TaskGroup,
    answers: list[object],
) -> None:
    """Start IN_FLIGHT registrations that stay in flight, waiting on a lock on the users table."""
    await lock_holder.execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")

    async def register(number: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            try:
                response = await http.post(
                    "/auth/register",
                    json={"email": f"user{number}@example.org", "password": "long enough"},
                )
                answers.append(response.status_code)
            except httpx.TransportError as exc:
                answers.append(type(exc).__name__)

    for number in range(IN_FLIGHT):
        group.start_soon(register, number)

    async def all_waiting() -> bool:
        waiting = await observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'sparc' AND wait_event_type = 'Lock'"
        )
        return bool(waiting == IN_FLIGHT)

    await poll_until_async(all_waiting, within=20)


@pytest.mark.parametrize("grace", ["30"])
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_in_flight_requests_finish_after_sigterm(
    server: tuple[subprocess.Popen[str], str],
    lock_holder: asyncpg.Connection,
    observer: asyncpg.Connection,
) -> None:
    process, base = server
    answers: list[object] = []
    async with anyio.create_task_group() as group:
        await register_in_flight(base, lock_holder, observer, group, answers)
        process.send_signal(signal.SIGTERM)
        await poll_until(lambda: not accepts_connections(base))  # new clients are turned away
        assert process.poll() is None  # while the server waits for the requests in flight
        await lock_holder.execute("COMMIT")  # now they can finish
    assert answers == [201] * IN_FLIGHT
    _, stderr = await anyio.to_thread.run_sync(process.communicate)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "ERROR" not in stderr
    assert await lock_holder.fetchval("SELECT count(*) FROM users") == IN_FLIGHT
    assert await sparc_connections(observer) == []  # the pool was closed on the way out


@pytest.mark.parametrize(("grace", "workers"), [("1", "1")])
async def test_requests_still_running_after_the_grace_period_are_rolled_back(
    server: tuple[subprocess.Popen[str], str],
    lock_holder: asyncpg.Connection,
    observer: asyncpg.Connection,
) -> None:
    process, base = server
    answers: list[object] = []
    async with anyio.create_task_group() as group:
        await register_in_flight(base, lock_holder, observer, group, answers)
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            _, stderr = await anyio.to_thread.run_sync(process.communicate)
    await lock_holder.execute("COMMIT")
    assert process.returncode == 0, stderr
    assert "timeout graceful shutdown exceeded" in stderr
    assert len(answers) == IN_FLIGHT and 201 not in answers  # cut off, none answered success
    assert await lock_holder.fetchval("SELECT count(*) FROM users") == 0  # nothing half-written
    assert await sparc_connections(observer) == []


async def test_requests_cancelled_at_the_end_of_the_grace_period_return_their_connections(
    database_url: str,
) -> None:
    # A request that takes a few loop turns to unwind (a task group here) starts returning its
    # connection only once the pool has begun to close: the close must still take it back
    # rather than wait DB_CONNECT_TIMEOUT and cut it.
    started = anyio.Event()

    async def busy(request: Request) -> Response:
        await get_db_client().execute("SELECT 1")  # the request's transaction is open
        started.set()
        async with anyio.create_task_group() as group:
            group.start_soon(anyio.sleep, 60)
        return JSONResponse({})

    settings = Settings(database_url=database_url, connect_timeout=5.0)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            tiny_app(settings, busy=busy),
            port=port,
            lifespan="on",
            log_level="critical",
            timeout_graceful_shutdown=0.2,
        )
    )
    stopped = anyio.Event()

    async def serve() -> None:
        await server.serve()
        stopped.set()

    async def call() -> None:
        async with httpx.AsyncClient() as http:
            with contextlib.suppress(httpx.HTTPError):
                await http.get(f"http://127.0.0.1:{port}/busy", timeout=30)

    async with anyio.create_task_group() as group:
        group.start_soon(serve)
        await poll_until(lambda: server.started)
        group.start_soon(call)
        await started.wait()
        server.should_exit = True
        with anyio.fail_after(3):  # the grace period and a quick close, not + DB_CONNECT_TIMEOUT
            await stopped.wait()
