"""Login throttling per account and per client IP, and password-hash upgrades on login."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from sparc.app import create_app
from sparc.settings import Settings
from tests.conftest import serving
from tests.helpers import PASSWORD, assert_problem, bearer, login, register

pytestmark = pytest.mark.anyio

WINDOW = 600.0


@pytest.fixture
async def http(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        database_url=database_url,
        login_max_failures=3,
        login_ip_max_failures=8,
        login_window=WINDOW,
    )
    async with serving(create_app(settings), check_openapi=True) as client:
        yield client


async def let_time_pass(admin: asyncpg.Connection, seconds: float) -> None:
    """Move every throttle's clock back, as if `seconds` had passed."""
    await admin.execute(
        "UPDATE login_throttles SET window_started_at = window_started_at - $1 * interval '1 s',"
        " locked_until = locked_until - $1 * interval '1 s'",
        seconds,
    )


async def fail(http: httpx.AsyncClient, email: str, times: int) -> list[int]:
    return [(await login(http, email, "wrong password")).status_code for _ in range(times)]


async def test_account_locks_after_max_failures_even_for_the_right_password(
    http: httpx.AsyncClient,
) -> None:
    await register(http, "victim@example.org")
    assert await fail(http, "victim@example.org", 3) == [401, 401, 401]
    locked = await login(http, "victim@example.org")
    assert_problem(locked, 429)
    assert 1 <= int(locked.headers["retry-after"]) <= WINDOW


async def test_lock_lifts_when_the_window_passes(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await register(http, "patient@example.org")
    await fail(http, "patient@example.org", 3)
    assert (await login(http, "patient@example.org")).status_code == 429
    await let_time_pass(admin, WINDOW + 1)
    assert (await login(http, "patient@example.org")).status_code == 200


async def test_repeated_lockouts_grow_exponentially(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await register(http, "stubborn@example.org")
    retry_afters = []
    for _ in range(3):
        await fail(http, "stubborn@example.org", 3)
        response = await login(http, "stubborn@example.org")
        assert response.status_code == 429
        retry_afters.append(int(response.headers["retry-after"]))
        await let_time_pass(admin, float(retry_afters[-1]) + 1)
    assert retry_afters[0] == pytest.approx(WINDOW, abs=5)
    assert retry_afters[1] == pytest.approx(2 * WINDOW, abs=5)
    assert retry_afters[2] == pytest.approx(4 * WINDOW, abs=5)


async def test_failures_outside_the_window_do_not_add_up(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await register(http, "slow@example.org")
    await fail(http, "slow@example.org", 2)
    await let_time_pass(admin, WINDOW + 1)
    assert await fail(http, "slow@example.org", 2) == [401, 401]
    assert (await login(http, "slow@example.org")).status_code == 200


async def test_success_resets_the_account_count(http: httpx.AsyncClient) -> None:
    await register(http, "forgetful@example.org")
    await fail(http, "forgetful@example.org", 2)
    assert (await login(http, "forgetful@example.org")).status_code == 200
    assert await fail(http, "forgetful@example.org", 2) == [401, 401]
    assert (await login(http, "forgetful@example.org")).status_code == 200


async def test_unknown_emails_are_throttled_like_real_ones(http: httpx.AsyncClient) -> None:
    assert await fail(http, "ghost@example.org", 3) == [401, 401, 401]
    assert_problem(await login(http, "ghost@example.org"), 429)


async def test_failure_counts_persist_although_the_answer_is_401(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await register(http, "counted@example.org")
    await fail(http, "counted@example.org", 2)
    counts = await admin.fetch(
        "SELECT key, failures FROM login_throttles WHERE key NOT LIKE 'register:%' ORDER BY key"
    )
    # Per account, per client address, and per (email, address).
    assert [(row["key"].split(":")[0], row["failures"]) for row in counts] == [
        ("account", 2),
        ("ip", 2),
        ("login", 2),
    ]


async def test_one_ip_is_throttled_across_accounts(http: httpx.AsyncClient) -> None:
    await register(http, "innocent@example.org")
    for n in range(4):
        await fail(
            http, f"target{n}@example.org", 2
        )  # 8 failures from one IP, none locks an account
    assert_problem(await login(http, "innocent@example.org"), 429)


async def test_password_change_guesses_are_throttled(http: httpx.AsyncClient) -> None:
    await register(http, "stolen@example.org")
    token = (await login(http, "stolen@example.org")).json()["access_token"]
    statuses = []
    for _ in range(4):
        response = await http.post(
            "/auth/password",
            json={"current_password": "guess", "new_password": "new password!"},
            headers=bearer(token),
        )
        statuses.append(response.status_code)
    assert statuses == [401, 401, 401, 429]


async def test_login_upgrades_a_hash_made_with_older_parameters(
    database_url: str, admin: asyncpg.Connection
) -> None:
    old = Settings(database_url=database_url, argon2_time_cost=1, argon2_memory_kib=8 * 1024)
    async with serving(create_app(old)) as http:
        assert (await register(http, "legacy@example.org")).status_code == 201
    assert "m=8192,t=1,p=1" in await admin.fetchval("SELECT password_hash FROM users")
    new = Settings(database_url=database_url)
    async with serving(create_app(new)) as http:
        assert (await login(http, "legacy@example.org")).status_code == 200
        upgraded = await admin.fetchval("SELECT password_hash FROM users")
        assert "m=19456,t=2,p=1" in upgraded
        assert (await login(http, "legacy@example.org", PASSWORD)).status_code == 200
    assert await admin.fetchval("SELECT password_hash FROM users") == upgraded
