"""The auth API over HTTP against a real PostgreSQL."""

from __future__ import annotations

import hashlib
from typing import Any
from unittest import mock

import asyncpg
import httpx
import pytest

from sparc import database
from sparc.app import create_app
from sparc.database.unit import UnitOfWork
from sparc.settings import Settings
from tests.conftest import serving
from tests.helpers import PASSWORD, assert_problem, bearer, login, register, token_for

pytestmark = pytest.mark.anyio


async def test_register_creates_an_account(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    response = await register(http, "ada@example.org")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "email"}
    assert body["email"] == "ada@example.org"
    stored = await admin.fetchrow("SELECT id::text, password_hash FROM users")
    assert stored["id"] == body["id"]
    assert stored["password_hash"].startswith("$argon2id$")
    assert PASSWORD not in stored["password_hash"]


async def test_register_same_email_in_any_case_is_a_conflict(http: httpx.AsyncClient) -> None:
    assert (await register(http, "Ada@Example.org")).status_code == 201
    assert_problem(await register(http, "ada@example.ORG"), 409)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "a@b", "password": PASSWORD}, "email"),
        ({"email": "x@example.org", "password": "short"}, "password"),
        ({"email": "x@example.org", "password": "p" * 257}, "password"),
        ({"email": "x@example.org"}, "password"),
        ({"email": 42, "password": PASSWORD}, "email"),
    ],
)
async def test_register_rejects_invalid_fields_with_422(
    http: httpx.AsyncClient, payload: dict[str, object], field: str
) -> None:
    body = assert_problem(await http.post("/auth/register", json=payload), 422)
    assert field in [error["field"] for error in body["errors"]]  # type: ignore[attr-defined]


async def test_password_length_bounds_are_inclusive(http: httpx.AsyncClient) -> None:
    assert (await register(http, "eight@example.org", "p" * 8)).status_code == 201
    assert (await register(http, "long@example.org", "p" * 256)).status_code == 201


async def test_bad_bodies_get_4xx_problems(http: httpx.AsyncClient) -> None:
    assert_problem(
        await http.post(
            "/auth/register", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,
    )
    assert_problem(
        await http.post(
            "/auth/register", content=b"email=a", headers={"content-type": "text/plain"}
        ),
        415,
    )
    assert_problem(await http.post("/auth/register", json=["a", "list"]), 422)
    assert_problem(
        await http.post(
            "/auth/register", content=b"x" * 70_000, headers={"content-type": "application/json"}
        ),
        413,
    )


async def test_login_returns_a_bearer_token_stored_only_as_its_hash(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await register(http, "grace@example.org")
    response = await login(http, "GRACE@example.org")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_at"}
    assert body["token_type"] == "bearer"
    assert response.headers["cache-control"] == "no-store"
    token = body["access_token"]
    assert len(token) >= 43  # 32 random bytes, base64url
    stored = await admin.fetchval("SELECT token_hash FROM sessions")
    assert bytes(stored) == hashlib.sha256(token.encode()).digest()
    row = await admin.fetchrow("SELECT expires_at - created_at AS lifetime, ip::text FROM sessions")
    assert row["lifetime"].total_seconds() == pytest.approx(12 * 3600, abs=5)


async def test_unknown_email_and_wrong_password_look_the_same(http: httpx.AsyncClient) -> None:
    await register(http, "linus@example.org")
    wrong_password = await login(http, "linus@example.org", "not the password")
    unknown_email = await login(http, "nobody@example.org")
    assert_problem(wrong_password, 401)
    # The same answer but for the id each request has of its own.
    assert {**wrong_password.json(), "request_id": None} == {
        **unknown_email.json(),
        "request_id": None,
    }
    assert wrong_password.headers["www-authenticate"] == unknown_email.headers["www-authenticate"]


async def test_me_shows_the_caller(http: httpx.AsyncClient) -> None:
    token = await token_for(http, "ken@example.org")
    response = await http.get("/auth/me", headers=bearer(token))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "email", "email_verified", "created_at"}
    assert body["email"] == "ken@example.org"
    assert body["email_verified"] is False  # until the mailed link is used


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-real-token"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
    ],
)
async def test_me_without_a_valid_token_is_401(
    http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await http.get("/auth/me", headers=headers)
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


async def test_logout_ends_the_session(http: httpx.AsyncClient, admin: asyncpg.Connection) -> None:
    token = await token_for(http, "barbara@example.org")
    other = (await login(http, "barbara@example.org")).json()["access_token"]
    response = await http.post("/auth/logout", headers=bearer(token))
    assert response.status_code == 204
    assert (await http.get("/auth/me", headers=bearer(token))).status_code == 401
    assert (await http.get("/auth/me", headers=bearer(other))).status_code == 200
    assert await admin.fetchval("SELECT count(*) FROM sessions") == 1


async def test_expired_token_is_refused(http: httpx.AsyncClient, admin: asyncpg.Connection) -> None:
    token = await token_for(http, "expired@example.org")
    await admin.execute("UPDATE sessions SET expires_at = now() - interval '1 second'")
    assert (await http.get("/auth/me", headers=bearer(token))).status_code == 401


async def test_no_database_client_is_constructed_per_request(settings: Settings) -> None:
    constructed = 0
    original = database.DatabaseClient.__init__

    def counting_init(self: database.DatabaseClient, *args: Any, **kwargs: Any) -> None:
        nonlocal constructed
        constructed += 1
        original(self, *args, **kwargs)

    with mock.patch.object(database.DatabaseClient, "__init__", counting_init):
        app = create_app(settings)
        async with serving(app) as http:
            token = await token_for(http, "count@example.org")
            for _ in range(20):
                assert (await http.get("/auth/me", headers=bearer(token))).status_code == 200
            assert (await http.get("/readyz")).status_code == 200
    assert constructed == 1


async def test_me_runs_no_transaction(settings: Settings, admin: asyncpg.Connection) -> None:
    # The token lookup is the request's only query and opens no transaction: when the unit of
    # work ends there is nothing to commit, so no BEGIN/COMMIT round trips were paid.
    app = create_app(settings)
    async with serving(app) as http:
        token = await token_for(http, "fast@example.org")
        db = app.state.db_client
        seen_in_transaction: list[bool] = []
        original = UnitOfWork.end

        async def recording_end(self: UnitOfWork, *, commit: bool) -> None:
            seen_in_transaction.append(self.in_transaction)
            await original(self, commit=commit)

        with mock.patch.object(UnitOfWork, "end", recording_end):
            assert (await http.get("/auth/me", headers=bearer(token))).status_code == 200
        assert seen_in_transaction and not any(seen_in_transaction)
        assert db.pool_stats().in_use == 0
