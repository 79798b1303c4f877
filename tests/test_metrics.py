"""GET /metrics: the names operators alert on, and values that move when the pool works."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from sparc.app import create_app
from sparc.database import DatabaseUnavailable, get_db_client
from sparc.metrics import _WAIT_BUCKETS, Metrics
from sparc.settings import Settings
from tests.conftest import serving
from tests.dbapp import tiny_app
from tests.helpers import bearer, register, token_for

pytestmark = pytest.mark.anyio

EXPECTED = {
    "sparc_db_pool_size",
    "sparc_db_pool_idle",
    "sparc_db_pool_in_use",
    "sparc_db_pool_waiting",
    "sparc_db_pool_max",
    "sparc_db_pool_acquire_wait_seconds",
    "sparc_db_pool_acquire_timeouts",
    "sparc_db_pool_acquire_refused",
    "sparc_db_connections_opened",
    "sparc_db_connections_closed",
    "sparc_db_connections_discarded",
    "sparc_db_transactions",
    "sparc_db_transaction_retries",
    "sparc_http_requests",
    "sparc_http_request_duration_seconds",
    "sparc_purged_rows",
}


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_lists_every_family(http: httpx.AsyncClient) -> None:
    families = {
        family.name for family in text_string_to_metric_families((await http.get("/metrics")).text)
    }
    assert families >= EXPECTED


async def test_request_and_transaction_counts_move(http: httpx.AsyncClient) -> None:
    before = await scrape(http)
    token = await token_for(http, "metrics@example.org")
    for _ in range(3):
        assert (await http.get("/auth/me", headers=bearer(token))).status_code == 200
    assert (await register(http, "metrics@example.org")).status_code == 409
    unknown = "/auth/sessions/00000000-0000-0000-0000-000000000000"
    assert (await http.delete(unknown, headers=bearer(token))).status_code == 404
    after = await scrape(http)

    me = {"route": "/auth/me", "method": "GET", "status": "200"}
    assert (
        value(after, "sparc_http_requests_total", **me)
        - value(before, "sparc_http_requests_total", **me)
        == 3
    )
    conflict = {"route": "/auth/register", "method": "POST", "status": "409"}
    assert value(after, "sparc_http_requests_total", **conflict) == 1
    assert (
        value(after, "sparc_http_request_duration_seconds_count", route="/auth/me", method="GET")
        >= 3
    )
    committed = value(after, "sparc_db_transactions_total", outcome="committed")
    rolled_back = value(after, "sparc_db_transactions_total", outcome="rolled_back")
    # register, login, and the 409 (it keeps its count against the client's address)
    assert committed - value(before, "sparc_db_transactions_total", outcome="committed") == 3
    assert (
        rolled_back - value(before, "sparc_db_transactions_total", outcome="rolled_back") == 1
    )  # the 404
    waits = value(after, "sparc_db_pool_acquire_wait_seconds_count")
    assert waits - value(before, "sparc_db_pool_acquire_wait_seconds_count") >= 6
    assert value(after, "sparc_db_connections_opened_total") >= 1


async def test_unmatched_paths_and_unknown_methods_share_one_label(
    http: httpx.AsyncClient,
) -> None:
    for path in ("/a", "/b/c", "/d"):
        await http.get(path)
    for method in ("BREW", "WHEN"):
        assert (await http.request(method, "/healthz")).status_code == 405
    samples = await scrape(http)
    assert (
        value(samples, "sparc_http_requests_total", route="unmatched", method="GET", status="404")
        == 3
    )
    unknown = {"route": "/healthz", "method": "other", "status": "405"}
    assert value(samples, "sparc_http_requests_total", **unknown) == 2


async def test_pool_gauges_follow_the_pool(database_url: str) -> None:
    app = create_app(Settings(database_url=database_url, pool_min_size=2, pool_max_size=7))
    async with serving(app) as http:
        app.state.metrics.sample_pool(app.state.db_client)
        samples = await scrape(http)
    assert value(samples, "sparc_db_pool_max") == 7
    assert value(samples, "sparc_db_pool_size") == 2
    assert value(samples, "sparc_db_pool_idle") == 2
    assert value(samples, "sparc_db_pool_in_use") == 0


async def test_discarded_connections_acquire_timeouts_and_503s_are_counted(
    database_url: str, admin: asyncpg.Connection
) -> None:
    settings = Settings(
        database_url=database_url, pool_min_size=1, pool_max_size=1, pool_timeout=0.2
    )
    app = create_app(settings)
    db = app.state.db_client
    async with serving(app) as http:
        token = await token_for(http, "busy-metrics@example.org")
        with pytest.raises(DatabaseUnavailable):
            async with db.transaction():
                pid = await db.fetch_val("SELECT pg_backend_pid()")
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
                await db.fetch_val("SELECT 1")  # the connection died under us: discarded
        async with db.transaction():
            await db.fetch_val("SELECT 1")  # holds the only connection
            assert (await http.get("/readyz")).status_code == 503
            # Refused while authenticating, before routing: still counted under its route.
            assert (await http.get("/auth/me", headers=bearer(token))).status_code == 503
        samples = await scrape(http)
    busy = {"route": "/auth/me", "method": "GET", "status": "503"}
    assert value(samples, "sparc_http_requests_total", **busy) == 1
    assert value(samples, "sparc_db_pool_acquire_timeouts_total") == 2
    assert value(samples, "sparc_db_connections_discarded_total") >= 1
    assert value(samples, "sparc_db_connections_closed_total") >= 1


def test_tallied_observations_expose_as_if_observed_directly() -> None:
    # The request path tallies in plain Python and flushes into prometheus-client's histograms
    # through their private bucket values: the exposition must not tell the difference.
    waits = [0.0, 0.0004, 0.0005, 0.0005001, 0.003, 0.1, 0.25, 9.99, 10, 11, 120]
    metrics = Metrics()
    direct = CollectorRegistry()
    reference = Histogram(
        "sparc_db_pool_acquire_wait_seconds",
        "Time from asking the pool for a connection to getting one.",
        buckets=_WAIT_BUCKETS,
        registry=direct,
    )
    for wait in waits:
        metrics.acquired(wait)
        reference.observe(wait)
    metrics.request_answered({"route": Route("/auth/me", Response), "method": "GET"}, 200, 0.002)

    def wait_samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            key: sample
            for key, sample in parse(text.decode()).items()
            if key[0].startswith("sparc_db_pool_acquire_wait_seconds")
            and not key[0].endswith("_created")
        }

    expected = wait_samples(generate_latest(direct))
    first = metrics.exposition()
    assert wait_samples(first) == expected
    assert wait_samples(metrics.exposition()) == expected  # a second flush adds nothing
    samples = parse(first.decode())
    me = {"route": "/auth/me", "method": "GET", "status": "200"}
    assert value(samples, "sparc_http_requests_total", **me) == 1
    timed = {"route": "/auth/me", "method": "GET", "le": "0.0025"}
    assert value(samples, "sparc_http_request_duration_seconds_bucket", **timed) == 1


async def test_the_status_counted_is_the_one_the_client_got(settings: Settings) -> None:
    answered: list[tuple[str, int]] = []

    def note(scope: Scope, status: int, seconds: float) -> None:
        assert seconds >= 0
        answered.append((scope["path"], status))

    async def fails(request: Request) -> Response:
        raise RuntimeError("the endpoint broke")

    async def commit_fails(request: Request) -> Response:
        # A deferred constraint fails at COMMIT: the 200 is replaced by a 500.
        db = get_db_client()
        await db.execute(
            "CREATE TEMPORARY TABLE pairs (id int PRIMARY KEY, partner int REFERENCES pairs "
            "(id) DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP"
        )
        await db.execute("INSERT INTO pairs VALUES (1, 42)")
        return JSONResponse({"ok": True})

    async def fine(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = tiny_app(settings, on_answered=note, fails=fails, commit_fails=commit_fails, fine=fine)
    async with serving(app, raise_app_exceptions=False) as http:
        assert (await http.get("/fine")).status_code == 200
        assert (await http.get("/fails")).status_code == 500
        assert (await http.post("/commit_fails")).status_code == 500
        assert (await http.get("/nowhere")).status_code == 404
    assert answered == [("/fine", 200), ("/fails", 500), ("/commit_fails", 500), ("/nowhere", 404)]
