"""The database goes away and comes back: 503s meanwhile, never 500s or hangs, then self-healing.

These tests own their PostgreSQL (an embedded one of their own), so they can stop and restart it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import asyncpg
import httpx
import pytest

from sparc.app import create_app
from sparc.embedded import embedded_postgres
from sparc.migrations import upgrade
from sparc.settings import Settings
from tests.conftest import asyncpg_dsn, poll_until, serving
from tests.helpers import bearer, token_for

pytestmark = [pytest.mark.anyio, pytest.mark.faults]


class OwnPostgres:
    """An embedded PostgreSQL that this test module may stop and start at will."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.url = ""

    def start(self) -> None:
        self._stack = embedded_postgres(self.data_dir, database="sparc")
        self.url = self._stack.__enter__()

    def stop(self) -> None:
        self._stack.__exit__(None, None, None)


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnPostgres]:
    server = OwnPostgres(tmp_path_factory.mktemp("own-postgres"))
    server.start()
    upgrade(server.url)
    try:
        yield server
    finally:
        server.stop()


async def statuses_during(http: httpx.AsyncClient, token: str, seconds: float) -> list[int]:
    """Keep 10 clients calling GET /auth/me for `seconds`; every status seen."""
    seen: list[int] = []
    deadline = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < deadline:
            seen.append((await http.get("/auth/me", headers=bearer(token))).status_code)

    await asyncio.gather(*(client() for _ in range(10)))
    return seen


async def test_outage_answers_503_then_heals_without_a_restart(own_postgres: OwnPostgres) -> None:
    settings = Settings(database_url=own_postgres.url, pool_timeout=1, connect_timeout=1)
    app = create_app(settings)
    async with serving(app, check_openapi=True) as http:
        token = await token_for(http, f"outage-{uuid.uuid4().hex[:6]}@example.org")
        assert set(await statuses_during(http, token, 0.3)) == {200}

        await anyio.to_thread.run_sync(own_postgres.stop)
        try:
            started = time.monotonic()
            with anyio.fail_after(settings.pool_timeout + settings.connect_timeout + 1):
                down = await http.get("/auth/me", headers=bearer(token))
            assert down.status_code == 503
            assert down.headers["retry-after"]
            assert time.monotonic() - started < settings.pool_timeout + settings.connect_timeout
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200
            # Under load while down: only 503s, each answered in bounded time.
            with anyio.fail_after(10):
                assert set(await statuses_during(http, token, 1.0)) == {503}
        finally:
            await anyio.to_thread.run_sync(own_postgres.start)

        # Back: healed by itself within seconds.
        healed_at = time.monotonic()
        ready = False
        while not ready:
            assert time.monotonic() - healed_at < 15, "did not heal within 15 s"
            ready = (await http.get("/readyz")).status_code == 200
            if not ready:
                await anyio.sleep(0.1)
        assert set(await statuses_during(http, token, 0.3)) == {200}


async def test_every_pool_connection_killed_mid_load(own_postgres: OwnPostgres) -> None:
    settings = Settings(database_url=own_postgres.url, pool_min_size=5, pool_max_size=5)
    app = create_app(settings)
    admin = await asyncpg.connect(asyncpg_dsn(own_postgres.url))
    try:
        async with serving(app, check_openapi=True) as http:
            token = await token_for(http, f"killed-{uuid.uuid4().hex[:6]}@example.org")

            async def kill_all() -> None:
                for _ in range(5):
                    await anyio.sleep(0.1)
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND application_name = 'sparc'"
                    )

            async with anyio.create_task_group() as group:
                group.start_soon(kill_all)
                during = await statuses_during(http, token, 1.0)
            assert set(during) <= {200, 503}, set(during)
            await poll_until(lambda: app.state.db_client.pool_stats().in_use == 0)
            assert set(await statuses_during(http, token, 0.3)) == {200}
    finally:
        await admin.close()
