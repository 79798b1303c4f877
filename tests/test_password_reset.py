"""Password reset through the mail a real SMTP server (aiosmtpd) receives: the token works
once, expires, is replaced by a newer one and undone by a password change; nothing tells a
known email from an unknown one."""

from __future__ import annotations

from dataclasses import replace

import asyncpg
import httpx
import pytest

from sparc.app import create_app
from sparc.password_reset import ACCEPTED, BAD_TOKEN, MAX_PER_HOUR
from sparc.settings import Settings
from tests.conftest import poll_until, serving
from tests.helpers import (
    PASSWORD,
    assert_problem,
    bearer,
    change_password,
    login,
    register,
    token_for,
    without_request_id,
)
from tests.smtp import SmtpServer, link_in, token_in, with_subject

pytestmark = pytest.mark.anyio

RESET = "Reset your password"
CHANGED = "Your password was changed"
NEW_PASSWORD = "a brand new passphrase"


async def ask_reset(http: httpx.AsyncClient, email: str) -> httpx.Response:
    response = await http.post("/auth/password-reset", json={"email": email})
    assert response.status_code == 202, response.text
    return response


async def confirm(
    http: httpx.AsyncClient, token: str, new_password: str = NEW_PASSWORD
) -> httpx.Response:
    return await http.post(
        "/auth/password-reset/confirm", json={"token": token, "new_password": new_password}
    )


async def reset_token(http: httpx.AsyncClient, smtp: SmtpServer, email: str) -> str:
    """Ask for a reset of `email` and wait for its mail; the token in it."""
    before = len(with_subject(smtp, RESET))
    await ask_reset(http, email)
    await poll_until(lambda: len(with_subject(smtp, RESET)) > before)
    return token_in(with_subject(smtp, RESET)[-1])


async def age_reset_mails(admin: asyncpg.Connection, minutes: int = 2) -> None:
    """Make the account's earlier reset mails older, past the one-a-minute limit."""
    await admin.execute(
        "UPDATE mail_outbox SET created_at = created_at - make_interval(mins => $1) "
        "WHERE kind = 'password_reset'",
        minutes,
    )


async def test_the_mailed_token_sets_a_new_password_and_ends_every_session(
    mail_http: httpx.AsyncClient, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    session = await token_for(mail_http, "ada@example.org")
    token = await reset_token(mail_http, smtp, "ada@example.org")
    mail = with_subject(smtp, RESET)[0]
    assert mail["To"] == "ada@example.org"
    assert link_in(mail).startswith("http://localhost:8000/reset-password?token=")

    assert (await confirm(mail_http, token)).status_code == 204
    assert (await mail_http.get("/auth/me", headers=bearer(session))).status_code == 401
    assert (await login(mail_http, "ada@example.org")).status_code == 401
    assert (await login(mail_http, "ada@example.org", NEW_PASSWORD)).status_code == 200
    await poll_until(lambda: len(with_subject(smtp, CHANGED)) == 1)
    assert with_subject(smtp, CHANGED)[0]["To"] == "ada@example.org"
    events = await admin.fetch("SELECT type FROM auth_events ORDER BY id")
    assert "password_reset" in [row["type"] for row in events]
    # The token is stored only as its digest, and the sent mail's row keeps no token either.
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM account_tokens WHERE purpose = $1", "password_reset"
        )
        == 0
    )
    contexts = await admin.fetch("SELECT context FROM mail_outbox WHERE sent_at IS NOT NULL")
    assert all(token not in row["context"] for row in contexts)


async def test_known_and_unknown_emails_get_the_same_answer_and_only_one_gets_mail(
    mail_http: httpx.AsyncClient, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    await register(mail_http, "known@example.org")
    known = await ask_reset(mail_http, "known@example.org")
    unknown = await ask_reset(mail_http, "unknown@example.org")
    assert known.json() == unknown.json() == ACCEPTED
    assert known.headers["content-type"] == unknown.headers["content-type"]
    assert len(known.content) == len(unknown.content)
    await poll_until(lambda: len(with_subject(smtp, RESET)) == 1)
    assert with_subject(smtp, RESET)[0]["To"] == "known@example.org"
    # Nothing about the unknown address was stored but its throttle digest.
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM mail_outbox WHERE recipient = 'unknown@example.org'"
        )
        == 0
    )


async def test_a_reset_token_works_once(mail_http: httpx.AsyncClient, smtp: SmtpServer) -> None:
    await register(mail_http, "once@example.org")
    token = await reset_token(mail_http, smtp, "once@example.org")
    assert (await confirm(mail_http, token)).status_code == 204
    again = assert_problem(await confirm(mail_http, token, "yet another passphrase"), 400)
    assert again["detail"] == BAD_TOKEN
    assert (await login(mail_http, "once@example.org", NEW_PASSWORD)).status_code == 200


async def test_an_expired_reset_token_is_refused_like_an_unknown_one(
    mail_http: httpx.AsyncClient, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    await register(mail_http, "late@example.org")
    token = await reset_token(mail_http, smtp, "late@example.org")
    await admin.execute("UPDATE account_tokens SET expires_at = now() - interval '1 second'")
    expired = assert_problem(await confirm(mail_http, token), 400)
    unknown = assert_problem(await confirm(mail_http, "not-a-token-we-issued"), 400)
    assert without_request_id(expired) == without_request_id(unknown)
    assert (await login(mail_http, "late@example.org")).status_code == 200


async def test_the_reset_lifetime_is_sparc_password_reset_ttl(
    mail_settings: Settings, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    app = create_app(replace(mail_settings, password_reset_ttl=600))
    async with serving(app) as http:
        await register(http, "ttl@example.org")
        await reset_token(http, smtp, "ttl@example.org")
    lifetime = await admin.fetchval(
        "SELECT extract(epoch FROM expires_at - created_at) FROM account_tokens "
        "WHERE purpose = 'password_reset'"
    )
    assert lifetime == 600
    assert "10 minutes" in with_subject(smtp, RESET)[0].get_body().get_content()  # type: ignore[union-attr]


async def test_a_newer_reset_request_invalidates_the_older_token(
    mail_http: httpx.AsyncClient, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    await register(mail_http, "twice@example.org")
    older = await reset_token(mail_http, smtp, "twice@example.org")
    await age_reset_mails(admin)
    newer = await reset_token(mail_http, smtp, "twice@example.org")
    assert newer != older
    assert_problem(await confirm(mail_http, older), 400)
    assert (await confirm(mail_http, newer)).status_code == 204


async def test_a_password_change_invalidates_an_outstanding_reset_token(
    mail_http: httpx.AsyncClient, smtp: SmtpServer
) -> None:
    session = await token_for(mail_http, "changer@example.org")
    token = await reset_token(mail_http, smtp, "changer@example.org")
    assert (await change_password(mail_http, session, NEW_PASSWORD)).status_code == 204
    assert_problem(await confirm(mail_http, token, "the attacker's passphrase"), 400)
    assert (await login(mail_http, "changer@example.org", NEW_PASSWORD)).status_code == 200
    await poll_until(lambda: len(with_subject(smtp, CHANGED)) == 1)  # the security notice


async def reset_mails_queued(admin: asyncpg.Connection) -> int:
    count: int = await admin.fetchval(
        "SELECT count(*) FROM mail_outbox WHERE kind = 'password_reset'"
    )
    return count


async def test_a_second_request_within_a_minute_mails_nothing_and_keeps_the_first_token(
    mail_http: httpx.AsyncClient, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    await register(mail_http, "eager@example.org")
    first = await reset_token(mail_http, smtp, "eager@example.org")
    second = await ask_reset(mail_http, "eager@example.org")
    assert second.json() == ACCEPTED
    assert await reset_mails_queued(admin) == 1
    assert (await confirm(mail_http, first)).status_code == 204


async def test_reset_mails_are_limited_per_address_per_hour_apart_from_other_mail(
    mail_http: httpx.AsyncClient, admin: asyncpg.Connection
) -> None:
    await register(mail_http, "eager@example.org")  # its verification mail does not count
    for _ in range(MAX_PER_HOUR + 2):
        await ask_reset(mail_http, "eager@example.org")
        await age_reset_mails(admin, minutes=2)
    assert await reset_mails_queued(admin) == MAX_PER_HOUR
    await age_reset_mails(admin, minutes=60)  # an hour on, the limit has passed
    await ask_reset(mail_http, "eager@example.org")
    assert await reset_mails_queued(admin) == MAX_PER_HOUR + 1


async def test_reset_requests_are_limited_per_client_address(
    mail_settings: Settings,
) -> None:
    app = create_app(replace(mail_settings, password_reset_ip_max=3))
    async with serving(app, check_openapi=True) as http:
        for n in range(3):
            await ask_reset(http, f"spray{n}@example.org")
        refused = await http.post("/auth/password-reset", json={"email": "spray9@example.org"})
    assert_problem(refused, 429)
    assert int(refused.headers["Retry-After"]) > 0


async def test_a_reset_clears_the_accounts_login_lockouts(
    mail_http: httpx.AsyncClient, smtp: SmtpServer
) -> None:
    await register(mail_http, "locked@example.org")
    for _ in range(5):
        await login(mail_http, "locked@example.org", "wrong password")
    assert_problem(await login(mail_http, "locked@example.org"), 429)
    token = await reset_token(mail_http, smtp, "locked@example.org")
    assert (await confirm(mail_http, token)).status_code == 204
    assert (await login(mail_http, "locked@example.org", NEW_PASSWORD)).status_code == 200


async def test_following_the_link_with_get_does_not_spend_the_token(
    mail_http: httpx.AsyncClient, smtp: SmtpServer
) -> None:
    await register(mail_http, "scanned@example.org")
    token = await reset_token(mail_http, smtp, "scanned@example.org")
    # What a mail scanner does: GET the link (the front end's path) and SPARC's own endpoint.
    link = link_in(with_subject(smtp, RESET)[0])
    assert (await mail_http.get(link.replace("http://localhost:8000", ""))).status_code == 404
    scanned = await mail_http.get(f"/auth/password-reset/confirm?token={token}")
    assert scanned.status_code == 405
    assert (await confirm(mail_http, token)).status_code == 204


async def test_a_new_password_follows_the_register_rules(
    mail_http: httpx.AsyncClient, smtp: SmtpServer
) -> None:
    await register(mail_http, "rules@example.org")
    token = await reset_token(mail_http, smtp, "rules@example.org")
    for weak in ("short", "password123"):
        problem = assert_problem(await confirm(mail_http, token, weak), 422)
        assert problem["errors"][0]["field"] == "new_password"
    # A refused password spent nothing: the token still works.
    assert (await confirm(mail_http, token)).status_code == 204
    assert (await login(mail_http, "rules@example.org", PASSWORD)).status_code == 401


async def test_a_disabled_account_gets_no_reset_and_its_earlier_link_stops_working(
    mail_http: httpx.AsyncClient, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    # Disabled (as an admin would, here by hand): the request answers as for anyone, no mail.
    await register(mail_http, "frozen@example.org")
    await admin.execute("UPDATE users SET disabled_at = now() WHERE email = 'frozen@example.org'")
    await ask_reset(mail_http, "frozen@example.org")
    queued = "SELECT count(*) FROM mail_outbox WHERE kind = 'password_reset'"
    assert await admin.fetchval(queued) == 0
    # A link mailed before the account was disabled no longer changes its password.
    await register(mail_http, "later@example.org")
    token = await reset_token(mail_http, smtp, "later@example.org")
    await admin.execute("UPDATE users SET disabled_at = now() WHERE email = 'later@example.org'")
    stored = "SELECT password_hash FROM users WHERE email = 'later@example.org'"
    before = await admin.fetchval(stored)
    refused = assert_problem(await confirm(mail_http, token), 400)
    assert refused["detail"] == "The reset token is unknown, expired or already used."
    assert await admin.fetchval(stored) == before
