"""The audit log: every account event, written with the change it records."""

from __future__ import annotations

import hashlib

import asyncpg
import httpx
import pytest

from tests.helpers import PASSWORD, assert_problem, bearer, login, register, token_for

pytestmark = pytest.mark.anyio


async def events(http: httpx.AsyncClient, token: str, **params: str) -> dict[str, object]:
    response = await http.get("/auth/events", params=params, headers=bearer(token))
    assert response.status_code == 200
    body: dict[str, object] = response.json()
    return body


async def types_of(admin: asyncpg.Connection) -> list[str]:
    return [row["type"] for row in await admin.fetch("SELECT type FROM auth_events ORDER BY id")]


async def test_every_account_event_is_recorded(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await register(http, "audited@example.org")
    await login(http, "audited@example.org", "wrong")
    token = (await login(http, "audited@example.org")).json()["access_token"]
    spare = (await login(http, "audited@example.org")).json()["access_token"]
    sessions = (await http.get("/auth/sessions", headers=bearer(token))).json()["sessions"]
    other = next(s["id"] for s in sessions if not s["current"])
    await http.delete(f"/auth/sessions/{other}", headers=bearer(token))
    await http.post(
        "/auth/password",
        json={"current_password": PASSWORD, "new_password": "another password"},
        headers=bearer(token),
    )
    await http.post("/auth/logout", headers=bearer(token))
    token = (await login(http, "audited@example.org", "another password")).json()["access_token"]
    await http.post("/auth/logout-all", headers=bearer(token))
    assert (await http.get("/auth/me", headers=bearer(spare))).status_code == 401
    assert await types_of(admin) == [
        "register",
        "login_failed",
        "login_succeeded",
        "login_succeeded",
        "session_revoked",
        "password_changed",
        "logout",
        "login_succeeded",
        "logout_all",
    ]
    user_ids = {row["user_id"] for row in await admin.fetch("SELECT user_id FROM auth_events")}
    assert len(user_ids) == 1 and None not in user_ids


async def test_failed_login_for_unknown_email_records_its_hash_not_the_address(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await login(http, "Nobody@Example.org", "whatever")
    row = await admin.fetchrow(
        "SELECT type, user_id, email_hash, ip::text, user_agent FROM auth_events"
    )
    assert row["type"] == "login_failed"
    assert row["user_id"] is None
    assert bytes(row["email_hash"]) == hashlib.sha256(b"nobody@example.org").digest()
    assert row["ip"] == "127.0.0.1/32"
    assert row["user_agent"].startswith("python-httpx")


async def test_throttled_login_is_recorded(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await register(http, "locked@example.org")
    for _ in range(5):
        await login(http, "locked@example.org", "wrong")
    assert_problem(await login(http, "locked@example.org"), 429)
    assert (await types_of(admin))[-1] == "login_throttled"


async def test_events_are_written_in_the_same_transaction_as_the_change(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    # A register that fails (409) rolls back: no user row, and no "register" event either.
    await register(http, "once@example.org")
    assert (await register(http, "ONCE@example.org")).status_code == 409
    assert await types_of(admin) == ["register"]
    assert await admin.fetchval("SELECT count(*) FROM users") == 1


async def test_events_show_only_the_callers_own_newest_first_in_pages(
    http: httpx.AsyncClient,
) -> None:
    token = await token_for(http, "pager@example.org")
    for _ in range(4):
        await login(http, "pager@example.org")
    await token_for(http, "stranger@example.org")
    first = await events(http, token, limit="3")
    listed = first["events"]
    assert isinstance(listed, list) and len(listed) == 3
    assert [e["type"] for e in listed] == ["login_succeeded"] * 3
    ids = [e["id"] for e in listed]
    assert ids == sorted(ids, reverse=True)
    second = await events(http, token, limit="3", before=str(first["next_before"]))
    assert [e["type"] for e in second["events"]] == [
        "login_succeeded",
        "login_succeeded",
        "register",
    ]  # type: ignore[index]
    assert second["next_before"] is None


@pytest.mark.parametrize(
    "params", [{"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"before": "-1"}]
)
async def test_bad_paging_parameters_are_422(
    http: httpx.AsyncClient, params: dict[str, str]
) -> None:
    token = await token_for(http, "params@example.org")
    response = await http.get("/auth/events", params=params, headers=bearer(token))
    body = assert_problem(response, 422)
    assert [e["field"] for e in body["errors"]] == list(params)
