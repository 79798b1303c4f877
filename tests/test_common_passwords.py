"""Common passwords: refused as new passwords in any letter case, from a list the package ships."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from sparc.auth import TOO_COMMON
from sparc.common_passwords import common_passwords, is_common
from sparc.security import PasswordHasher
from tests.helpers import (
    PASSWORD,
    assert_problem,
    change_password,
    login,
    register,
    token_for,
)

pytestmark = pytest.mark.anyio

COMMON = ["password", "12345678", "Password1", "PASSWORD", "PassWord", "iloveyou", "QWERTYUIOP"]


def test_the_list_holds_at_least_the_10000_most_common_passwords_lowercase() -> None:
    listed = common_passwords()
    assert len(listed) >= 10_000
    assert {"123456", "password", "12345678", "qwerty", "dragon"} <= listed
    assert all(entry == entry.lower() and entry.strip() == entry and entry for entry in listed)
    assert not any(entry.startswith("#") for entry in listed)  # the header is not on it


def test_the_check_ignores_letter_case_and_knows_strong_passwords() -> None:
    assert is_common("Dragon") and is_common("dRaGoN")
    assert not is_common(PASSWORD)


@pytest.mark.parametrize("password", COMMON)
async def test_register_refuses_a_common_password(
    http: httpx.AsyncClient, admin: asyncpg.Connection, password: str
) -> None:
    body = assert_problem(await register(http, "ada@example.org", password), 422)
    assert body["errors"] == [{"field": "password", "message": TOO_COMMON}]
    assert await admin.fetchval("SELECT count(*) FROM users") == 0


async def test_register_accepts_a_strong_password(http: httpx.AsyncClient) -> None:
    assert (await register(http, "ada@example.org", "violet staple 42 orbit")).status_code == 201


async def test_a_short_common_password_is_refused_for_its_length_alone(
    http: httpx.AsyncClient,
) -> None:
    body = assert_problem(await register(http, "ada@example.org", "123456"), 422)
    assert [error["message"] for error in body["errors"]] == ["must be 8 to 256 characters long"]


# A common new_password on POST /auth/password: test_sessions.py, beside the length rules.


async def test_a_password_change_accepts_a_strong_new_password(http: httpx.AsyncClient) -> None:
    token = await token_for(http, "ada@example.org")
    response = await change_password(http, token, "violet staple 42 orbit")
    assert response.status_code == 204
    assert (await login(http, "ada@example.org", "violet staple 42 orbit")).status_code == 200


async def test_an_account_with_a_common_password_still_logs_in(
    http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    # The rule is for setting a password, not checking one: accounts made before it log in.
    password_hash = await PasswordHasher().hash("password")
    await admin.execute(
        "INSERT INTO users (email, password_hash) VALUES ('old@example.org', $1)", password_hash
    )
    assert (await login(http, "old@example.org", "password")).status_code == 200
