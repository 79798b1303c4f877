"""The headers every answer carries (nosniff; no-store under /auth/; Retry-After on every 429
and 503), and 503s that tell a client nothing about the database server."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sparc.app import create_app
from sparc.database import (
    CommandTimeout,
    DatabaseUnavailable,
    PoolQueueFull,
    PoolTimeout,
    StatementTimeout,
    TransactionConflict,
    WritesRefused,
)
from sparc.settings import Settings, database_hosts
from tests.conftest import refusing_connections, serving
from tests.helpers import (
    assert_problem,
    bearer,
    change_password,
    login,
    register,
    token_for,
    without_request_id,
)

pytestmark = pytest.mark.anyio

# What a hostile or careless error message would give away: the server, its port, its user.
SERVER_SECRETS = ("db.internal", "5432", "sparc_owner")
LEAKY = "cannot reach PostgreSQL at db.internal:5432 as sparc_owner: connection refused"


def assert_headers(response: httpx.Response) -> None:
    """nosniff everywhere; no-store exactly on the answers under /auth/."""
    assert response.headers["x-content-type-options"] == "nosniff"
    under_auth = response.request.url.path.startswith("/auth/")
    assert response.headers.get("cache-control") == ("no-store" if under_auth else None)
    assert response.headers.get_list("cache-control") == (["no-store"] if under_auth else [])


async def test_every_route_and_status_carries_the_headers(http: httpx.AsyncClient) -> None:
    token = await token_for(http, "ada@example.org")
    other_session = (await login(http, "ada@example.org")).json()["access_token"]
    bad_json = {"content-type": "application/json"}
    answers = [
        (await http.get("/healthz"), 200),
        (await http.get("/readyz"), 200),
        (await http.get("/metrics"), 200),
        (await http.get("/openapi.json"), 200),
        (await http.get("/docs"), 200),
        (await register(http, "bob@example.org"), 201),
        (await register(http, "bob@example.org"), 409),
        (await register(http, "bob@example.org", "password"), 422),
        (await http.post("/auth/register", content=b"{", headers=bad_json), 400),
        (await http.post("/auth/register", content=b"{}", headers={}), 415),
        (await http.post("/auth/login", content=b"{}" + b" " * 70_000, headers=bad_json), 413),
        (await login(http, "ada@example.org"), 200),
        (await login(http, "ada@example.org", "wrong password"), 401),
        (await http.get("/auth/me", headers=bearer(token)), 200),
        (await http.get("/auth/me"), 401),
        (await http.get("/auth/me", headers={"Authorization": "Basic x"}), 401),
        (await http.get("/auth/sessions", headers=bearer(token)), 200),
        (await http.delete("/auth/sessions/nope", headers=bearer(token)), 404),
        (await http.get("/auth/events", headers=bearer(token)), 200),
        (await http.get("/auth/events?limit=0", headers=bearer(token)), 422),
        (await http.post("/auth/logout", headers=bearer(other_session)), 204),
        (await http.get("/no/such/page"), 404),
        (await http.get("/auth/no/such/page"), 404),
        (await http.get("/auth/login"), 405),
    ]
    answers.append((await change_password(http, token, "violet staple 42 orbit"), 204))
    answers.append((await http.post("/auth/logout-all", headers=bearer(token)), 204))
    for response, status in answers:
        assert response.status_code == status, (response.request.url, response.text)
        assert_headers(response)


async def test_a_framework_500_carries_the_headers(settings: Settings) -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    app = create_app(settings)
    app.router.routes += [Route("/boom", boom), Route("/auth/boom", boom)]
    async with serving(app, raise_app_exceptions=False) as http:
        for path in ("/boom", "/auth/boom"):
            response = await http.get(path)
            assert_problem(response, 500)
            assert_headers(response)


async def test_no_store_stands_beside_a_cache_control_of_an_endpoints_own(
    settings: Settings,
) -> None:
    # A cache combines the two, and no-store forbids keeping the answer whatever else they say.
    async def cached(request: Request) -> Response:
        return PlainTextResponse("ok", headers={"Cache-Control": "public, max-age=60"})

    app = create_app(settings)
    app.router.routes.append(Route("/auth/cached", cached))
    async with serving(app) as http:
        response = await http.get("/auth/cached")
    assert response.headers.get_list("cache-control") == ["public, max-age=60", "no-store"]
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.fixture
async def throttled_http(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database_url=database_url, login_max_failures=2)
    async with serving(create_app(settings), check_openapi=True) as client:
        yield client


async def test_every_429_carries_retry_after(throttled_http: httpx.AsyncClient) -> None:
    http = throttled_http
    token = await token_for(http, "ada@example.org")
    for _ in range(2):
        assert_problem(await login(http, "ada@example.org", "wrong password"), 401)
    login_locked = await login(http, "ada@example.org")
    change_locked = await change_password(http, token, "violet staple 42 orbit")
    for response in (login_locked, change_locked):
        assert_problem(response, 429)
        assert int(response.headers["retry-after"]) >= 1
        assert_headers(response)


@pytest.mark.parametrize(
    ("error", "retry_after", "detail"),
    [
        (PoolTimeout(LEAKY), "1", "Every database connection is busy"),
        (PoolQueueFull(LEAKY), "1", "Every database connection is busy"),
        (StatementTimeout(LEAKY), "1", "ran too long and was cancelled"),
        (CommandTimeout(LEAKY), "5", "did not answer in time"),
        (WritesRefused(LEAKY), "2", "it is read-only for now"),
        (TransactionConflict(LEAKY, sqlstate="40001"), "1", "kept losing races"),
        (DatabaseUnavailable(LEAKY), "5", "The database is unavailable"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
async def test_every_kind_of_503_has_retry_after_and_a_detail_naming_no_server(
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    error: DatabaseUnavailable,
    retry_after: str,
    detail: str,
) -> None:
    async def fails(request: Request) -> Response:
        raise error

    caplog.set_level(logging.INFO, "sparc.database")
    # No replays: a TransactionConflict answers at once.
    app = create_app(Settings(database_url=database_url, retry_attempts=0))
    app.router.routes.append(Route("/auth/fails", fails))
    async with serving(app) as http:
        response = await http.get("/auth/fails")
    body = assert_problem(response, 503)
    assert response.headers["retry-after"] == retry_after
    assert_headers(response)
    assert detail in body["detail"]
    # All of the answer but its request id: 32 random hex digits hold "5432" now and then.
    shown = json.dumps(without_request_id(body))
    assert not any(secret in shown for secret in SERVER_SECRETS)
    assert LEAKY in caplog.text  # the operator still reads the whole message


async def test_a_database_that_refuses_connections_answers_503_naming_no_server(
    http: httpx.AsyncClient,
    database_url: str,
    server_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "sparc.database")
    token = await token_for(http, "ada@example.org")
    async with refusing_connections(server_url, database_url) as name:
        # /readyz, a 503 raised while authenticating, and one from an endpoint's own query.
        refused = [
            await http.get("/readyz"),
            await http.get("/auth/me", headers=bearer(token)),
            await register(http, "bob@example.org"),
        ]
    hosts = database_hosts(database_url)  # e.g. ["127.0.0.1:5432"]
    user = urlsplit(database_url).username or ""
    for response in refused:
        body = assert_problem(response, 503)
        assert response.headers["retry-after"] == "5"
        assert_headers(response)
        assert body["detail"] == "The database is unavailable; nothing was kept, retry later."
        for secret in (*hosts, name, user):
            assert secret not in response.text
    assert f"cannot reach PostgreSQL at {', '.join(hosts)}" in caplog.text


async def test_a_503_while_authenticating_carries_retry_after(database_url: str) -> None:
    settings = Settings(
        database_url=database_url, pool_min_size=1, pool_max_size=1, pool_timeout=0.2
    )
    app = create_app(settings)
    db = app.state.db_client
    async with serving(app, check_openapi=True) as http:
        token = await token_for(http, "ada@example.org")
        async with db.transaction():
            await db.fetch_val("SELECT 1")  # holds the only connection
            response = await http.get("/auth/me", headers=bearer(token))
    body = assert_problem(response, 503)
    assert response.headers["retry-after"] == "1"
    assert_headers(response)
    assert "busy" in body["detail"]
