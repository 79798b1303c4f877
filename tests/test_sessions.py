"""Sessions the caller can see and revoke; lifetimes; password change."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from sparc.app import create_app
from sparc.auth import TOO_COMMON
from sparc.settings import Settings
from tests.conftest import serving
from tests.helpers import assert_problem, bearer, change_password, login, token_for

pytestmark = pytest.mark.anyio


async def test_sessions_lists_the_callers_live_sessions(http: httpx.AsyncClient) -> None:
    first = await token_for(http, "lists@example.org")
    second = (await login(http, "lists@example.org", **{"User-Agent": "phone/1.0"})).json()
    await token_for(http, "someone-else@example.org")
    response = await http.get("/auth/sessions", headers=bearer(first))
    assert response.status_code == 200
    sessions = response.json()["sessions"]
    assert len(sessions) == 2
    assert [s["current"] for s in sessions] == [False, True]  # newest first
    assert sessions[0]["user_agent"] == "phone/1.0"
    assert sessions[0]["ip"] == "127.0.0.1"
    assert sessions[0]["expires_at"] == second["expires_at"]


async def test_revoking_a_session_ends_it(http: httpx.AsyncClient) -> None:
    keep = await token_for(http, "revoke@example.org")
    drop = (await login(http, "revoke@example.org")).json()["access_token"]
    sessions = (await http.get("/auth/sessions", headers=bearer(keep))).json()["sessions"]
    other = next(s["id"] for s in sessions if not s["current"])
    assert (await http.delete(f"/auth/sessions/{other}", headers=bearer(keep))).status_code == 204
    assert (await http.get("/auth/me", headers=bearer(drop))).status_code == 401
    assert (await http.get("/auth/me", headers=bearer(keep))).status_code == 200
    assert_problem(await http.delete(f"/auth/sessions/{other}", headers=bearer(keep)), 404)


async def test_another_users_session_is_not_found(http: httpx.AsyncClient) -> None:
    mallory = await token_for(http, "mallory@example.org")
    alice = await token_for(http, "alice@example.org")
    alices = (await http.get("/auth/sessions", headers=bearer(alice))).json()["sessions"][0]["id"]
    response = await http.delete(f"/auth/sessions/{alices}", headers=bearer(mallory))
    assert_problem(response, 404)
    assert_problem(await http.delete("/auth/sessions/not-a-uuid", headers=bearer(mallory)), 404)
    assert (await http.get("/auth/me", headers=bearer(alice))).status_code == 200


async def test_logout_all_ends_every_session(http: httpx.AsyncClient) -> None:
    tokens = [await token_for(http, "all@example.org") for _ in range(3)]
    bystander = await token_for(http, "bystander@example.org")
    assert (await http.post("/auth/logout-all", headers=bearer(tokens[0]))).status_code == 204
    for token in tokens:
        assert (await http.get("/auth/me", headers=bearer(token))).status_code == 401
    assert (await http.get("/auth/me", headers=bearer(bystander))).status_code == 200


async def test_session_endpoints_need_a_token(http: httpx.AsyncClient) -> None:
    assert_problem(await http.get("/auth/sessions"), 401)
    assert_problem(await http.post("/auth/logout-all"), 401)
    assert_problem(await http.delete("/auth/sessions/00000000-0000-0000-0000-000000000000"), 401)


# -- lifetimes --------------------------------------------------------------------------------


async def test_token_ttl_sets_the_absolute_expiry(
    database_url: str, admin: asyncpg.Connection
) -> None:
    settings = Settings(database_url=database_url, token_ttl=90.0)
    async with serving(create_app(settings), check_openapi=True) as http:
        await token_for(http, "ttl@example.org")
    lifetime = await admin.fetchval("SELECT expires_at - created_at FROM sessions")
    assert lifetime.total_seconds() == pytest.approx(90, abs=2)


async def test_expired_session_is_refused_and_not_listed(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    live = await token_for(http, "expiry@example.org")
    expired = (await login(http, "expiry@example.org")).json()["access_token"]
    await admin.execute(
        "UPDATE sessions SET expires_at = now() - interval '1 second' "
        "WHERE id = (SELECT id FROM sessions ORDER BY created_at DESC LIMIT 1)"
    )
    assert_problem(await http.get("/auth/me", headers=bearer(expired)), 401)
    listed = (await http.get("/auth/sessions", headers=bearer(live))).json()["sessions"]
    assert len(listed) == 1


async def test_idle_session_is_refused(http: httpx.AsyncClient, admin: asyncpg.Connection) -> None:
    token = await token_for(http, "idle@example.org")
    assert (await http.get("/auth/me", headers=bearer(token))).status_code == 200
    # 30 minutes without a request (the default SPARC_TOKEN_IDLE_TIMEOUT), though not expired.
    await admin.execute("UPDATE sessions SET last_seen_at = now() - interval '31 minutes'")
    assert_problem(await http.get("/auth/me", headers=bearer(token)), 401)


async def test_last_seen_is_written_at_most_once_a_minute(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    token = await token_for(http, "seen@example.org")
    await admin.execute("UPDATE sessions SET last_seen_at = now() - interval '5 minutes'")
    stale = await admin.fetchval("SELECT last_seen_at FROM sessions")
    assert (await http.get("/auth/me", headers=bearer(token))).status_code == 200
    touched = await admin.fetchval("SELECT last_seen_at FROM sessions")
    assert touched > stale
    # Within the minute, authenticated reads leave the row alone: no write per request.
    tuple_before = await admin.fetchval("SELECT xmin::text FROM sessions")
    for _ in range(5):
        assert (await http.get("/auth/me", headers=bearer(token))).status_code == 200
    assert await admin.fetchval("SELECT xmin::text FROM sessions") == tuple_before
    assert await admin.fetchval("SELECT last_seen_at FROM sessions") == touched


# -- password change --------------------------------------------------------------------------


async def test_password_change_revokes_every_other_session(http: httpx.AsyncClient) -> None:
    current = await token_for(http, "change@example.org")
    other = (await login(http, "change@example.org")).json()["access_token"]
    response = await change_password(http, current, "a brand new secret")
    assert response.status_code == 204
    assert (await http.get("/auth/me", headers=bearer(current))).status_code == 200
    assert_problem(await http.get("/auth/me", headers=bearer(other)), 401)
    assert_problem(await login(http, "change@example.org"), 401)
    assert (await login(http, "change@example.org", "a brand new secret")).status_code == 200


async def test_password_change_with_wrong_current_password_is_401(http: httpx.AsyncClient) -> None:
    token = await token_for(http, "wrong@example.org")
    response = await change_password(http, token, "a brand new secret", "not it")
    assert_problem(response, 401)
    assert (await login(http, "wrong@example.org")).status_code == 200


@pytest.mark.parametrize(
    ("new_password", "message"),
    [
        ("short", "must be 8 to 256 characters long"),
        ("x" * 257, "must be 8 to 256 characters long"),
        *((common, TOO_COMMON) for common in ("password", "12345678", "Password1", "PASSWORD")),
    ],
)
async def test_new_password_follows_the_register_rules(
    http: httpx.AsyncClient, new_password: str, message: str
) -> None:
    token = await token_for(http, "rules@example.org")
    response = await change_password(http, token, new_password)
    body = assert_problem(response, 422)
    assert body["errors"] == [{"field": "new_password", "message": message}]
    assert (await login(http, "rules@example.org")).status_code == 200  # unchanged
