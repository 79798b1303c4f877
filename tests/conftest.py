"""Shared fixtures: a real PostgreSQL (TEST_DATABASE_URL, else an embedded one) and a fresh,
migrated database per test, cloned from a template."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.to_thread
import asyncpg
import httpx
import pytest
from starlette.applications import Starlette

from sparc.app import create_app
from sparc.embedded import embedded_postgres
from sparc.migrations import upgrade
from sparc.settings import Settings
from tests.openapi_check import check_response_hook
from tests.smtp import SmtpServer


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # asyncpg and encode/databases are asyncio-only


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (query options such as a socket host are kept)."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An admin URL of the PostgreSQL server the tests use."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    data_dir = tmp_path_factory.mktemp("embedded")
    with embedded_postgres(data_dir, database="postgres") as url:
        yield url


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    """A database migrated to head once per session; each test gets a copy."""
    name = f"sparc_template_{os.getpid()}"

    async def recreate() -> None:
        admin = await asyncpg.connect(asyncpg_dsn(server_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()

    async def drop() -> None:
        admin = await asyncpg.connect(asyncpg_dsn(server_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    anyio.run(recreate)
    upgrade(with_database(server_url, name))
    yield name
    anyio.run(drop)


@pytest.fixture
async def database_url(server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh database with the full schema, dropped after the test."""
    name = f"sparc_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        yield with_database(server_url, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.contextmanager
def empty_database(server_url: str, prefix: str = "sparc_cli") -> Iterator[str]:
    """A database of its own on the server (no schema), dropped after the block; its URL."""
    name = f"{prefix}_{os.getpid()}_{time.monotonic_ns()}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(asyncpg_dsn(server_url))
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    anyio.run(admin, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        anyio.run(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def cli_database(server_url: str) -> Iterator[str]:
    """An empty database (no schema: `sparc serve` must migrate it), for real processes."""
    with empty_database(server_url) as url:
        yield url


@contextlib.asynccontextmanager
async def connection_to(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own to `url`, outside SPARC's pool."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own, outside SPARC's pool, to look at what SPARC did."""
    async with connection_to(database_url) as connection:
        yield connection


@pytest.fixture
async def notes(admin: asyncpg.Connection) -> str:
    """A scratch table for tests of the database layer."""
    await admin.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL UNIQUE)")
    return "notes"


@contextlib.asynccontextmanager
async def refusing_connections(server_url: str, database_url: str) -> AsyncIterator[str]:
    """While inside, the database of `database_url` refuses connections, and those it had are
    gone; yields its name."""
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        yield name
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    # The test's own data dir: with no SMTP server, mail is written there (sparc.mail_transport).
    return Settings(database_url=database_url, pool_max_size=5, data_dir=tmp_path)


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) on a port of its own, collecting what it is sent."""
    server = SmtpServer()
    await anyio.to_thread.run_sync(server.start)
    try:
        yield server
    finally:
        await anyio.to_thread.run_sync(server.stop)


@pytest.fixture
def mail_settings(settings: Settings, smtp: SmtpServer) -> Settings:
    """`settings` mailing to `smtp`, retries a fifth of a second apart (an outage test takes
    seconds, not minutes)."""
    return replace(settings, smtp_url=smtp.url, mail_retry_delay=0.2)


@pytest.fixture
async def mail_http(mail_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """`http`, for an app whose mail goes to the `smtp` server."""
    async with serving(create_app(mail_settings), check_openapi=True) as client:
        yield client


@contextlib.asynccontextmanager
async def serving(
    app: Starlette, *, check_openapi: bool = False, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give an HTTP client that talks to it in-process.

    With `check_openapi`, every response is validated against SPARC's OpenAPI document; with
    `raise_app_exceptions=False`, an endpoint's exception reaches the client as its 500.
    """
    hooks = {"response": [check_response_hook]} if check_openapi else {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://sparc.test", event_hooks=hooks
        ) as http:
            yield http


@pytest.fixture
async def http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the full SPARC app on the test's database; every response it gets
    is checked against the OpenAPI document."""
    async with serving(create_app(settings), check_openapi=True) as client:
        yield client


async def poll_until(
    check: Callable[[], bool], *, within: float = 10.0, every: float = 0.02
) -> None:
    """Re-check `check` every `every` seconds until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {within} s: {check}")
        await anyio.sleep(every)


async def poll_until_async(
    check: Callable[[], Awaitable[bool]], *, within: float = 10.0, every: float = 0.02
) -> None:
    """poll_until for a check that must await (e.g. a query)."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {within} s: {check}")
        await anyio.sleep(every)


REPO_ROOT = Path(__file__).resolve().parents[1]
