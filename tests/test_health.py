"""Liveness and readiness probes."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from sparc.migrations import head_revision
from tests.conftest import poll_until_async, refusing_connections

pytestmark = pytest.mark.anyio


async def test_healthz_needs_no_database(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_reports_the_pool(http: httpx.AsyncClient) -> None:
    response = await http.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert set(body["pool"]) == {"size", "idle", "in_use", "max"}
    assert body["pool"]["max"] == 5
    assert body["pool"]["size"] >= 1

    async def nothing_in_use() -> bool:
        # The mail worker's poll holds a connection for a moment now and then.
        in_use: int = (await http.get("/readyz")).json()["pool"]["in_use"]
        return in_use == 0

    await poll_until_async(nothing_in_use)


async def test_readyz_reports_the_schema_revision_it_finds_on_each_probe(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    head = head_revision()
    assert (await http.get("/readyz")).json()["schema"] == {"revision": head, "head": head}
    # A newer release migrates under this running instance, as in a rolling upgrade.
    await admin.execute("UPDATE alembic_version SET version_num = 'from_a_newer_release'")
    schema = (await http.get("/readyz")).json()["schema"]
    assert schema == {"revision": "from_a_newer_release", "head": head}
    await admin.execute("DROP TABLE alembic_version")
    answer = await http.get("/readyz")
    assert answer.status_code == 200
    assert answer.json()["schema"] == {"revision": None, "head": head}


async def test_readyz_is_503_when_the_database_refuses_connections(
    http: httpx.AsyncClient, database_url: str, server_url: str
) -> None:
    async with refusing_connections(server_url, database_url):
        response = await http.get("/readyz")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert "retry-after" in response.headers
        assert (await http.get("/healthz")).status_code == 200

    # Healed by itself, once the reconnect backoff (0.1 s after the first refusal) is over:
    # broken connections were discarded, a new one is opened on demand.
    async def ready() -> bool:
        return (await http.get("/readyz")).status_code == 200

    await poll_until_async(ready, within=5)
