"""Hostile strings in bodies and query strings: refused with a 4xx naming the field, never a 500,
and nothing of them reaches PostgreSQL or Argon2."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from sparc.clients import USER_AGENT_MAX_LENGTH
from sparc.payloads import UNSTORABLE_MESSAGE
from sparc.text import storable_text
from tests.helpers import PASSWORD, assert_problem, bearer, login, register, token_for

pytestmark = pytest.mark.anyio

EMAIL = "mallory@example.org"
# JSON escapes, written into the body as they are: json.dumps cannot send a lone surrogate.
NUL = "\\u0000"
HIGH_SURROGATE = "\\ud800"
LOW_SURROGATE = "\\udfff"
REVERSED_PAIR = "\\ude00\\ud83d"
UNSTORABLE = [NUL, HIGH_SURROGATE, LOW_SURROGATE, REVERSED_PAIR]


def body_of(**fields: str) -> bytes:
    """A JSON object of `fields`, each value inserted raw between quotes (escapes stay escapes)."""
    return ("{" + ", ".join(f'"{name}": "{raw}"' for name, raw in fields.items()) + "}").encode()


async def post_raw(
    http: httpx.AsyncClient, path: str, content: bytes, token: str | None = None
) -> httpx.Response:
    headers = {"content-type": "application/json", **(bearer(token) if token else {})}
    return await http.post(path, content=content, headers=headers)


def assert_refused_field(response: httpx.Response, field: str) -> None:
    body = assert_problem(response, 422)
    assert body["errors"] == [{"field": field, "message": UNSTORABLE_MESSAGE}]


@pytest.mark.parametrize("bad", UNSTORABLE)
@pytest.mark.parametrize("path", ["/auth/register", "/auth/login"])
@pytest.mark.parametrize("field", ["email", "password"])
async def test_an_unstorable_string_in_a_credential_is_a_422_naming_it(
    http: httpx.AsyncClient, admin: asyncpg.Connection, path: str, field: str, bad: str
) -> None:
    fields = {"email": EMAIL, "password": PASSWORD.replace(" ", "_")}
    fields[field] = f"{fields[field][:4]}{bad}{fields[field][4:]}"
    assert_refused_field(await post_raw(http, path, body_of(**fields)), field)
    assert await admin.fetchval("SELECT count(*) FROM users") == 0
    assert await admin.fetchval("SELECT count(*) FROM login_throttles") == 0
    assert await admin.fetchval("SELECT count(*) FROM auth_events") == 0


@pytest.mark.parametrize("bad", UNSTORABLE)
@pytest.mark.parametrize("field", ["current_password", "new_password"])
async def test_an_unstorable_string_in_a_password_change_is_a_422_naming_it(
    http: httpx.AsyncClient, admin: asyncpg.Connection, field: str, bad: str
) -> None:
    token = await token_for(http, EMAIL)
    fields = {"current_password": PASSWORD, "new_password": "a brand new secret"}
    fields[field] = fields[field] + bad
    assert_refused_field(await post_raw(http, "/auth/password", body_of(**fields), token), field)
    # No failed guess was counted (the registration's own count is another row).
    failures = "SELECT count(*) FROM login_throttles WHERE key NOT LIKE 'register:%'"
    assert await admin.fetchval(failures) == 0
    assert (await login(http, EMAIL)).status_code == 200  # the password did not change


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        # An unknown top-level key is named escaped, so the answer itself can be encoded.
        (b'"x\\ud800": 1', "x\\ud800"),
        (b'"\\u0000": 1', "\\x00"),
        (b'"extra": ["\\u0000"]', "extra"),
        (b'"extra": {"\\udc00": 1}', "extra"),
        (b'"x": [[{"y": "\\ud8ff"}]]', "x"),
    ],
)
async def test_an_unstorable_key_or_nested_string_is_a_422_naming_its_field(
    http: httpx.AsyncClient, admin: asyncpg.Connection, extra: bytes, field: str
) -> None:
    content = b'{"email": "a@example.org", "password": "long enough", ' + extra + b"}"
    assert_refused_field(await post_raw(http, "/auth/register", content), field)
    assert await admin.fetchval("SELECT count(*) FROM users") == 0


async def test_every_refused_field_is_listed(http: httpx.AsyncClient) -> None:
    content = body_of(email=f"a{NUL}@example.org", password=f"long enough{HIGH_SURROGATE}")
    body = assert_problem(await post_raw(http, "/auth/register", content), 422)
    assert [error["field"] for error in body["errors"]] == ["email", "password"]


async def test_a_surrogate_pair_is_one_character_and_welcome(http: httpx.AsyncClient) -> None:
    emoji_password = "correct horse \\ud83d\\ude00"
    response = await post_raw(http, "/auth/register", body_of(email=EMAIL, password=emoji_password))
    assert response.status_code == 201, response.text
    assert (await login(http, EMAIL, "correct horse \U0001f600")).status_code == 200


@pytest.mark.parametrize(
    "content",
    [
        b'{"email": "a@example.org", "password": "long \xed\xa0\x80 enough"}',  # UTF-8 surrogate
        b'{"email": "a@example.org", "password": "long \xff enough"}',
        b'{"email": "a@example.org", "password": "long \xc0\x80 enough"}',  # overlong NUL
        '{"email": "a@example.org", "password": "long enough"}'.encode("utf-16"),
        b"[" * 60_000,
        b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b'{"email": ' + b"1" * 5_000 + b', "password": "long enough"}',
    ],
    ids=[
        "utf8-surrogate",
        "invalid-byte",
        "overlong-nul",
        "utf16",
        "deep-arrays",
        "deep-nested-field",
        "5000-digit-number",
    ],
)
async def test_bytes_that_are_not_utf8_json_are_a_400(
    http: httpx.AsyncClient, content: bytes
) -> None:
    assert_problem(await post_raw(http, "/auth/register", content), 400)


@pytest.mark.parametrize("control", ["\x1b", "\x07", "\x7f", "\x00", "\x85"])
async def test_an_email_with_a_control_character_is_not_an_email(
    http: httpx.AsyncClient, control: str
) -> None:
    response = await register(http, f"mal{control}lory@example.org")
    body = assert_problem(response, 422)
    assert [error["field"] for error in body["errors"]] == ["email"]


async def test_a_password_may_hold_control_characters(http: httpx.AsyncClient) -> None:
    # It is only ever hashed: never stored, shown or logged.
    password = "correct\x1b[31m horse\t\x7f"
    assert (await register(http, EMAIL, password)).status_code == 201
    assert (await login(http, EMAIL, password)).status_code == 200


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"email": "a" * 243 + "@example.org", "password": PASSWORD}, "email"),
        ({"email": EMAIL, "password": "p" * 257}, "password"),
        ({"email": EMAIL, "password": 12345678}, "password"),
        ({"email": EMAIL, "password": True}, "password"),
        ({"email": EMAIL, "password": None}, "password"),
        ({"email": EMAIL, "password": ["correct horse"]}, "password"),
        ({"email": EMAIL, "password": {"$gt": ""}}, "password"),
        ({"email": 1.5e300, "password": PASSWORD}, "email"),
    ],
)
async def test_a_too_long_or_non_string_field_is_a_422_naming_it(
    http: httpx.AsyncClient, fields: dict[str, object], field: str
) -> None:
    for path in ("/auth/register", "/auth/login"):
        body = assert_problem(await http.post(path, json=fields), 422)
        assert field in [error["field"] for error in body["errors"]]


async def test_a_string_as_long_as_the_body_allows_is_a_413(http: httpx.AsyncClient) -> None:
    response = await http.post("/auth/login", json={"email": EMAIL, "password": "x" * 70_000})
    assert_problem(response, 413)


@pytest.mark.parametrize("query", ["limit=%C2%B2", "before=%C2%B2", "limit=%00", "before=1%00"])
async def test_a_query_parameter_that_is_not_ascii_digits_is_a_422(
    http: httpx.AsyncClient, query: str
) -> None:
    token = await token_for(http, EMAIL)
    response = await http.get(f"/auth/events?{query}", headers=bearer(token))
    assert_problem(response, 422)


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("Mozilla/5.0 (X11; Linux x86_64)", "Mozilla/5.0 (X11; Linux x86_64)"),
        ("evil\x1b[2J\x1b[31m", "evil\\x1b[2J\\x1b[31m"),
        ("tab\tand one-byte CSI \x9b31m", "tab\\tand one-byte CSI \\x9b31m"),
        ("line\nINFO:     sparc: forged\r", "line\\nINFO:     sparc: forged\\r"),
        ("x" * 600, "x" * USER_AGENT_MAX_LENGTH),
        # An escape that would not fit whole is left out rather than cut in half.
        ("x" * (USER_AGENT_MAX_LENGTH - 2) + "\x1b", "x" * (USER_AGENT_MAX_LENGTH - 2)),
        ("\x07" * 600, "\\x07" * (USER_AGENT_MAX_LENGTH // 4)),
    ],
)
def test_a_user_agent_is_stored_escaped_and_cut(sent: str, stored: str) -> None:
    assert storable_text(sent, USER_AGENT_MAX_LENGTH) == stored


async def test_control_characters_in_a_user_agent_are_stored_escaped(
    http: httpx.AsyncClient,
) -> None:
    # Over HTTP a header can carry tabs and bytes 0x80-0xff (read as Latin-1: \x9b is a CSI).
    await register(http, EMAIL)
    response = await http.post(
        "/auth/login",
        json={"email": EMAIL, "password": PASSWORD},
        headers={"user-agent": b"agent\t\x9b2J\x1b[31m"},
    )
    token = response.json()["access_token"]
    stored = "agent\\t\\x9b2J\\x1b[31m"
    sessions = (await http.get("/auth/sessions", headers=bearer(token))).json()["sessions"]
    assert [session["user_agent"] for session in sessions] == [stored]
    events = (await http.get("/auth/events", headers=bearer(token))).json()["events"]
    assert events[0]["user_agent"] == stored
