"""Admins over HTTP: roles, disabled accounts, the /admin/ API, and erasure leaving nothing."""

from __future__ import annotations

import hashlib
import ipaddress
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import httpx
import pytest

from sparc.app import create_app
from sparc.settings import Settings
from tests.conftest import serving
from tests.helpers import (
    PASSWORD,
    assert_problem,
    bearer,
    login,
    register,
    token_for,
    without_request_id,
)

pytestmark = pytest.mark.anyio

# The erased user's own client: an address and user agent nobody else in these tests uses.
VICTIM_IP = "203.0.113.77"
VICTIM_AGENT = "victim-agent/1.0"
VICTIM = {"X-Forwarded-For": VICTIM_IP, "User-Agent": VICTIM_AGENT}
LOGIN_MAX_FAILURES = 3


@pytest.fixture
async def http(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app behind a trusted proxy at 127.0.0.1, so each test client names its address."""
    settings = Settings(
        database_url=database_url,
        pool_max_size=5,
        trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
        login_max_failures=LOGIN_MAX_FAILURES,
    )
    async with serving(create_app(settings), check_openapi=True) as client:
        yield client


async def make_admin(http: httpx.AsyncClient, admin: asyncpg.Connection, email: str) -> str:
    """Register `email`, make it an admin by hand (as `sparc users promote` does), log in."""
    await register(http, email)
    await admin.execute("UPDATE users SET is_admin = true WHERE email = $1", email)
    return await token_for(http, email)


async def user_id(http: httpx.AsyncClient, token: str) -> str:
    return str((await http.get("/auth/me", headers=bearer(token))).json()["id"])


async def disable(
    http: httpx.AsyncClient, token: str, target: str, **body: object
) -> httpx.Response:
    return await http.post(f"/admin/users/{target}/disable", json=body, headers=bearer(token))


async def test_a_disabled_account_gets_403_for_the_right_password_and_401_for_a_wrong_one(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    target = await user_id(http, await token_for(http, "locked@example.org"))
    assert (await disable(http, boss, target)).status_code == 200
    problem = assert_problem(await login(http, "locked@example.org"), 403)
    assert problem["title"] == "Account disabled"
    # A guesser learns nothing: a wrong password answers exactly as for any account.
    wrong = assert_problem(await login(http, "locked@example.org", "not the password"), 401)
    unknown = assert_problem(await login(http, "nobody@example.org", "not the password"), 401)
    assert without_request_id(wrong) == without_request_id(unknown)


async def test_disabling_revokes_the_accounts_reset_links(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    target = await user_id(http, await token_for(http, "taken@example.org"))
    asked = await http.post("/auth/password-reset", json={"email": "taken@example.org"})
    assert asked.status_code == 202
    resets = "SELECT count(*) FROM account_tokens WHERE purpose = 'password_reset'"
    assert await admin.fetchval(resets) == 1
    assert (await disable(http, boss, target)).status_code == 200
    assert await admin.fetchval(resets) == 0  # a link already mailed cannot change the password


async def test_disabling_ends_every_session_so_a_live_token_answers_401_at_once(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    first = await token_for(http, "victim@example.org")
    second = await token_for(http, "victim@example.org")
    target = await user_id(http, first)
    detail = (await disable(http, boss, target)).json()
    assert (detail["disabled"], detail["live_sessions"]) == (True, 0)
    for token in (first, second):
        assert_problem(await http.get("/auth/me", headers=bearer(token)), 401)
    assert await admin.fetchval("SELECT count(*) FROM sessions WHERE user_id = $1", target) == 0


async def test_a_disable_until_a_time_past_lets_the_account_log_in_again(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    target = await user_id(http, await token_for(http, "paused@example.org"))
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    detail = (await disable(http, boss, target, until=until)).json()
    assert detail["disabled"] and datetime.fromisoformat(detail["disabled_until"]) > datetime.now(
        UTC
    )
    assert_problem(await login(http, "paused@example.org"), 403)
    # The hour has passed (moved by hand rather than waited for).
    await admin.execute(
        "UPDATE users SET disabled_until = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(target),
    )
    assert (await login(http, "paused@example.org")).status_code == 200
    shown = await http.get(f"/admin/users/{target}", headers=bearer(boss))
    assert shown.json()["disabled"] is False


async def test_concurrent_logins_of_one_account_all_succeed(http: httpx.AsyncClient) -> None:
    # Each login locks the account's row at its end (last_login_at): they queue, never deadlock.
    await register(http, "busy@example.org")
    statuses: list[int] = []

    async def one_login() -> None:
        statuses.append((await login(http, "busy@example.org")).status_code)

    async with anyio.create_task_group() as group:
        for _ in range(8):
            group.start_soon(one_login)
    assert statuses == [200] * 8


@pytest.mark.parametrize(
    ("until", "message"),
    [
        ("2001-01-01T00:00:00Z", "is not in the future"),
        ("2999-01-01T00:00:00", "needs a UTC offset"),
        ("next tuesday", "is not an ISO 8601 time"),
        (3, "must be a string"),
    ],
)
async def test_a_disable_until_must_be_a_future_time_with_an_offset(
    http: httpx.AsyncClient, admin: asyncpg.Connection, until: object, message: str
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    target = await user_id(http, await token_for(http, "someone@example.org"))
    problem = assert_problem(await disable(http, boss, target, until=until), 422)
    [error] = problem["errors"]
    assert error["field"] == "until" and message in error["message"]
    assert (await login(http, "someone@example.org")).status_code == 200


async def test_non_admins_get_403_and_callers_without_a_token_401_everywhere_under_admin(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    plain = await token_for(http, "plain@example.org")
    target = await user_id(http, await token_for(http, "other@example.org"))
    calls = [
        ("GET", "/admin/users"),
        ("GET", f"/admin/users/{target}"),
        ("POST", f"/admin/users/{target}/disable"),
        ("POST", f"/admin/users/{target}/enable"),
        ("DELETE", f"/admin/users/{target}/sessions"),
        ("DELETE", f"/admin/users/{target}"),
    ]
    for method, path in calls:
        assert_problem(await http.request(method, path, headers=bearer(plain)), 403)
        anonymous = await http.request(method, path)
        assert_problem(anonymous, 401)
        assert anonymous.headers["WWW-Authenticate"] == "Bearer"
    assert (await login(http, "other@example.org")).status_code == 200
    assert await admin.fetchval("SELECT count(*) FROM auth_events WHERE actor_id IS NOT NULL") == 0


async def test_the_whole_admin_flow_and_every_action_names_the_admin(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    boss_id = await user_id(http, boss)
    target_token = await token_for(http, "Flow.User@example.org")
    await token_for(http, "flow.user@example.org")  # a second session (409 on register)
    target = await user_id(http, target_token)

    found = (await http.get("/admin/users", params={"search": "FLOW"}, headers=bearer(boss))).json()
    assert [user["id"] for user in found["users"]] == [target] and found["next_after"] is None
    shown = (await http.get(f"/admin/users/{target}", headers=bearer(boss))).json()
    assert shown["email"] == "Flow.User@example.org"
    assert (shown["is_admin"], shown["disabled"], shown["live_sessions"]) == (False, False, 2)
    assert shown["last_login_at"] is not None and shown["disabled_at"] is None

    revoked = await http.delete(f"/admin/users/{target}/sessions", headers=bearer(boss))
    assert revoked.status_code == 204
    assert_problem(await http.get("/auth/me", headers=bearer(target_token)), 401)
    assert (await disable(http, boss, target)).json()["disabled"] is True
    enabled = await http.post(f"/admin/users/{target}/enable", headers=bearer(boss))
    assert (enabled.json()["disabled"], enabled.json()["disabled_at"]) == (False, None)
    assert (await login(http, "flow.user@example.org")).status_code == 200
    erased = await http.delete(f"/admin/users/{target}", headers=bearer(boss))
    assert erased.status_code == 204
    assert_problem(await http.get(f"/admin/users/{target}", headers=bearer(boss)), 404)
    assert_problem(await http.delete(f"/admin/users/{target}", headers=bearer(boss)), 404)

    actions = await admin.fetch(
        "SELECT type, actor_id, via FROM auth_events WHERE type LIKE 'admin_%' ORDER BY id"
    )
    assert [row["type"] for row in actions] == [
        "admin_sessions_revoked",
        "admin_user_disabled",
        "admin_user_enabled",
        "admin_user_erased",
    ]
    assert {(str(row["actor_id"]), row["via"]) for row in actions} == {(boss_id, "http")}


async def test_an_admin_cannot_disable_or_erase_their_own_account_here(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    own = await user_id(http, boss)
    assert_problem(await disable(http, boss, own), 409)
    assert_problem(await http.delete(f"/admin/users/{own}", headers=bearer(boss)), 409)
    assert (await http.get("/auth/me", headers=bearer(boss))).status_code == 200


async def test_unknown_and_malformed_ids_answer_404(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    for target in (str(uuid.uuid4()), "not-a-uuid"):
        assert_problem(await http.get(f"/admin/users/{target}", headers=bearer(boss)), 404)
        assert_problem(await disable(http, boss, target), 404)


async def test_search_takes_like_wildcards_literally(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    for email in ("a_b@example.org", "axb@example.org", "100%@example.org", "back\\slash@x.org"):
        await register(http, email)

    async def search(text: str) -> list[str]:
        response = await http.get("/admin/users", params={"search": text}, headers=bearer(boss))
        return sorted(user["email"] for user in response.json()["users"])

    assert await search("a_b") == ["a_b@example.org"]
    assert await search("%") == ["100%@example.org"]
    assert await search("\\") == ["back\\slash@x.org"]
    assert await search("xb@") == ["axb@example.org"]
    bad = assert_problem(
        await http.get("/admin/users", params={"search": "a\x00b"}, headers=bearer(boss)), 422
    )
    assert bad["errors"][0]["field"] == "search"


async def test_the_list_pages_with_an_opaque_cursor_at_most_100_a_page(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    emails = [f"page{n}@example.org" for n in range(5)]
    for email in emails:
        await register(http, email)
    seen: list[str] = []
    after: str | None = None
    while True:
        params = {"limit": "2", "search": "page", **({"after": after} if after else {})}
        page = (await http.get("/admin/users", params=params, headers=bearer(boss))).json()
        assert len(page["users"]) <= 2
        seen += [user["email"] for user in page["users"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == list(reversed(emails))  # newest first, each once
    for params in ({"limit": "101"}, {"limit": "0"}, {"after": "garbage"}, {"after": "W10"}):
        assert_problem(await http.get("/admin/users", params=params, headers=bearer(boss)), 422)
    full = await http.get("/admin/users", params={"limit": "100"}, headers=bearer(boss))
    assert len(full.json()["users"]) == 6


# Rows an erasure keeps on purpose: the throttle counters of a client address alone (failed logins
# from it across accounts, registrations from it) belong to the address, not to the account, and
# erasing them would let anyone reset their address's limits with a throwaway account. They go
# with the retention purge, a window after their lock ends.
KEPT_ON_PURPOSE = {("login_throttles", "key"): "key NOT LIKE 'ip:%' AND key NOT LIKE 'register:%'"}


async def personal_data_left(connection: asyncpg.Connection, needles: list[str]) -> list[str]:
    """Every table.column of the schema, of any type, whose text holds one of `needles` (in any
    letter case): the generic check that covers tables added later too."""
    columns = await connection.fetch(
        """
        SELECT table_name, column_name FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name <> 'alembic_version'
        """
    )
    assert len(columns) > 10
    found = []
    for column in columns:
        table, name = column["table_name"], column["column_name"]
        for needle in needles:
            kept = KEPT_ON_PURPOSE.get((table, name), "true")
            hits = await connection.fetchval(
                f'SELECT count(*) FROM "{table}"'
                f' WHERE strpos(lower(CAST("{name}" AS text)), $1) > 0 AND {kept}',
                needle.lower(),
            )
            if hits:
                found.append(f"{table}.{name} holds {needle!r}")
    return found


async def leave_traces(http: httpx.AsyncClient, email: str) -> str:
    """An account with sessions, audit events, throttle rows from its own address; its token."""
    body = {"email": email, "password": PASSWORD}
    assert (await http.post("/auth/register", json=body, headers=VICTIM)).status_code == 201
    assert (await login(http, email, "wrong password", **VICTIM)).status_code == 401
    assert (await login(http, email, PASSWORD, **VICTIM)).status_code == 200
    token = str((await login(http, email, PASSWORD, **VICTIM)).json()["access_token"])
    assert (
        await http.get("/auth/sessions", headers={**bearer(token), **VICTIM})
    ).status_code == 200
    return token


def needles_of(email: str, user: str) -> list[str]:
    digest = hashlib.sha256(email.lower().encode()).hexdigest()
    return [email, VICTIM_IP, VICTIM_AGENT, user, digest]


async def test_an_admin_erasure_leaves_no_personal_data_and_keeps_event_types_and_times(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    boss = await make_admin(http, admin, "boss@example.org")
    email = "Erase.Me@example.org"
    target = await user_id(http, await leave_traces(http, email))
    await disable(http, boss, target)
    await http.post(f"/admin/users/{target}/enable", headers=bearer(boss))
    kept_before = await admin.fetch("SELECT type, created_at FROM auth_events ORDER BY id")
    assert await personal_data_left(admin, needles_of(email, target)) != []

    assert (await http.delete(f"/admin/users/{target}", headers=bearer(boss))).status_code == 204
    assert await personal_data_left(admin, needles_of(email, target)) == []
    kept_after = await admin.fetch("SELECT type, created_at FROM auth_events ORDER BY id")
    assert kept_after[: len(kept_before)] == kept_before
    assert [row["type"] for row in kept_after[len(kept_before) :]] == ["admin_user_erased"]
    # The admin's own account and events are untouched.
    assert (await http.get("/auth/me", headers=bearer(boss))).status_code == 200
    boss_id = uuid.UUID(await user_id(http, boss))
    assert await admin.fetchval("SELECT count(*) FROM auth_events WHERE user_id = $1", boss_id) > 0


async def test_delete_me_erases_the_callers_account_after_the_password_leaving_nothing(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    email = "leaving@example.org"
    token = await leave_traces(http, email)
    target = await user_id(http, token)
    events_before = await admin.fetchval("SELECT count(*) FROM auth_events")
    erased = await http.request(
        "DELETE", "/auth/me", json={"password": PASSWORD}, headers={**bearer(token), **VICTIM}
    )
    assert erased.status_code == 204
    assert await personal_data_left(admin, needles_of(email, target)) == []
    assert await admin.fetchval("SELECT count(*) FROM auth_events") == events_before + 1
    last = await admin.fetchrow("SELECT * FROM auth_events ORDER BY id DESC LIMIT 1")
    assert (last["type"], last["user_id"], last["ip"], last["user_agent"]) == (
        "account_erased",
        None,
        None,
        None,
    )
    assert_problem(await http.get("/auth/me", headers=bearer(token)), 401)
    assert_problem(await login(http, email), 401)
    # The email is free again.
    assert (await register(http, email)).status_code == 201


async def test_delete_me_needs_the_password_and_is_throttled_like_a_login(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    token = await token_for(http, "careful@example.org")
    for _ in range(LOGIN_MAX_FAILURES):
        wrong = await http.request(
            "DELETE", "/auth/me", json={"password": "not it"}, headers=bearer(token)
        )
        assert_problem(wrong, 401)
    throttled = await http.request(
        "DELETE", "/auth/me", json={"password": PASSWORD}, headers=bearer(token)
    )
    assert_problem(throttled, 429)
    assert throttled.headers["Retry-After"]
    assert_problem(await http.request("DELETE", "/auth/me", json={}, headers=bearer(token)), 422)
    assert (await http.get("/auth/me", headers=bearer(token))).status_code == 200
    assert await admin.fetchval("SELECT count(*) FROM users") == 1
