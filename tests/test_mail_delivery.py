"""The outbox and its delivery worker against a real SMTP server (aiosmtpd): mail leaves if
and only if its request committed, once, and survives an SMTP outage."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.to_thread
import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sparc import outbox
from sparc.app import create_app
from sparc.database import DatabaseClient, get_db_client, retry_on_conflict
from sparc.mail_delivery import (
    DELIVERY_TASK_NAME,
    MAX_ATTEMPTS,
    MailDelivery,
    delivering_in_background,
)
from sparc.mail_messages import MailBuilder
from sparc.mail_transport import DeliveryFailed, SmtpTransport
from sparc.problems import Problem
from sparc.settings import Settings
from tests.conftest import poll_until, poll_until_async, serving
from tests.dbapp import tiny_app
from tests.smtp import SmtpServer, text_of
from tests.test_retries import LOSE_THE_RACE

pytestmark = pytest.mark.anyio


async def queue_notice(to: str) -> None:
    await outbox.send(to=to, template=outbox.PASSWORD_CHANGED, context={})


async def committed(request: Request) -> Response:
    await queue_notice(request.query_params["to"])
    return JSONResponse({})


async def raises(request: Request) -> Response:
    await queue_notice(request.query_params["to"])
    raise RuntimeError("the endpoint failed after queueing its mail")


async def answers_400(request: Request) -> Response:
    await queue_notice(request.query_params["to"])
    raise Problem(400, "Refused after queueing a mail.")


# Which recipients loses_a_race_once has run for (the first run of each loses its race).
runs: list[str] = []


@retry_on_conflict
async def loses_a_race_once(request: Request) -> Response:
    to = request.query_params["to"]
    runs.append(to)
    await queue_notice(to)
    if runs.count(to) == 1:
        await get_db_client().execute(LOSE_THE_RACE)
    return JSONResponse({})


def mail_app(settings: Settings) -> Starlette:
    return tiny_app(
        settings,
        committed=committed,
        raises=raises,
        answers_400=answers_400,
        race=loses_a_race_once,
    )


@contextlib.asynccontextmanager
async def serving_with_delivery(
    settings: Settings, **options: object
) -> AsyncIterator[httpx.AsyncClient]:
    app = mail_app(settings)
    async with serving(app, raise_app_exceptions=False) as http:
        delivery = MailDelivery(app.state.client, settings, **options)  # type: ignore[arg-type]
        async with delivering_in_background(delivery):
            yield http


def recipients(smtp: SmtpServer) -> list[str]:
    return [message["To"] for message in smtp.messages]


async def test_a_committed_mail_arrives_as_text_and_html(
    mail_settings: Settings, smtp: SmtpServer
) -> None:
    async with serving_with_delivery(mail_settings) as http:
        assert (await http.post("/committed?to=ada@example.org")).status_code == 200
        await poll_until(lambda: len(smtp.messages) == 1)
    message = smtp.messages[0]
    assert message["To"] == "ada@example.org"
    assert message["Subject"] == "Your password was changed"
    assert message.get_content_type() == "multipart/alternative"
    assert "ada@example.org was changed" in text_of(message)
    assert "ada@example.org was changed" in text_of(message, "html")
    assert message["Message-ID"].endswith("@localhost>")


@pytest.mark.parametrize("path", ["raises", "answers_400"])
async def test_a_request_that_rolls_back_sends_nothing(
    path: str, mail_settings: Settings, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    async with serving_with_delivery(mail_settings) as http:
        failed = await http.post(f"/{path}?to=rolled-back@example.org")
        assert failed.status_code in (400, 500)
        # A mail committed after it arrives; had the rolled-back one been queued, it would be
        # due first and have arrived before.
        assert (await http.post("/committed?to=after@example.org")).status_code == 200
        await poll_until(lambda: len(smtp.messages) >= 1)
    assert recipients(smtp) == ["after@example.org"]
    assert await admin.fetchval("SELECT count(*) FROM mail_outbox") == 1


async def test_a_request_replayed_after_a_lost_race_sends_once(
    mail_settings: Settings, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    async with serving_with_delivery(mail_settings) as http:
        assert (await http.post("/race?to=replayed@example.org")).status_code == 200
        assert runs.count("replayed@example.org") == 2  # the lost run, then its replay
        assert (await http.post("/committed?to=after@example.org")).status_code == 200
        await poll_until(lambda: len(smtp.messages) >= 2)
    assert sorted(recipients(smtp)) == ["after@example.org", "replayed@example.org"]
    assert await admin.fetchval("SELECT count(*) FROM mail_outbox") == 2


async def test_mail_queued_while_smtp_is_down_arrives_once_it_is_back(
    mail_settings: Settings, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    await anyio.to_thread.run_sync(smtp.stop)
    addresses = [f"patient{n}@example.org" for n in range(5)]
    async with serving_with_delivery(mail_settings) as http:
        for address in addresses:
            assert (await http.post(f"/committed?to={address}")).status_code == 200

        async def all_retried() -> bool:
            least = await admin.fetchval("SELECT min(attempts) FROM mail_outbox")
            return bool(least >= 2)

        await poll_until_async(all_retried)
        assert smtp.messages == []
        errors = await admin.fetch("SELECT last_error FROM mail_outbox")
        assert all(str(smtp.port) in row["last_error"] for row in errors)
        await anyio.to_thread.run_sync(smtp.start)  # the same port, as a restarted server
        await poll_until(lambda: len(smtp.messages) == len(addresses))
        await poll_until_async(
            lambda: admin.fetchval("SELECT bool_and(sent_at IS NOT NULL) FROM mail_outbox")
        )
    assert sorted(recipients(smtp)) == addresses  # none lost, none twice
    rows = await admin.fetch("SELECT failed_at, context FROM mail_outbox")
    assert all(row["failed_at"] is None and row["context"] == "{}" for row in rows)


async def test_two_workers_on_one_outbox_send_each_mail_once(
    mail_settings: Settings, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    addresses = sorted(f"many{n:02d}@example.org" for n in range(40))
    await admin.executemany(
        "INSERT INTO mail_outbox (kind, recipient) VALUES ('password_changed', $1)",
        [(address,) for address in addresses],
    )
    first, second = DatabaseClient(mail_settings), DatabaseClient(mail_settings)
    async with first, second:
        workers = [MailDelivery(first, mail_settings), MailDelivery(second, mail_settings)]
        async with delivering_in_background(workers[0]), delivering_in_background(workers[1]):
            await poll_until(lambda: len(smtp.messages) >= len(addresses))
            await poll_until_async(
                lambda: admin.fetchval("SELECT bool_and(sent_at IS NOT NULL) FROM mail_outbox")
            )
    assert sorted(recipients(smtp)) == addresses
    assert await admin.fetchval("SELECT max(attempts) FROM mail_outbox") == 1


async def test_a_worker_stopped_after_the_server_took_a_mail_leaves_it_to_be_sent_again(
    mail_settings: Settings, smtp: SmtpServer, admin: asyncpg.Connection
) -> None:
    # At least once: the server has the mail, but the worker stops before it hears the 250.
    await admin.execute(
        "INSERT INTO mail_outbox (kind, recipient) VALUES ('password_changed', 'twice@x.org')"
    )
    smtp.handler.acknowledging.clear()
    async with DatabaseClient(mail_settings) as client:
        async with delivering_in_background(MailDelivery(client, mail_settings)):
            await poll_until(lambda: len(smtp.messages) == 1)
        row = await admin.fetchrow("SELECT attempts, sent_at FROM mail_outbox")
        assert row is not None and (row["attempts"], row["sent_at"]) == (1, None)
        # The row stays leased; once the lease ends, a worker sends it again.
        smtp.handler.acknowledging.set()
        await admin.execute("UPDATE mail_outbox SET next_attempt_at = now()")
        async with delivering_in_background(MailDelivery(client, mail_settings)):
            await poll_until(lambda: len(smtp.messages) == 2)
            await poll_until_async(
                lambda: admin.fetchval("SELECT sent_at IS NOT NULL FROM mail_outbox")
            )
    first, second = smtp.messages
    assert first["Message-ID"] == second["Message-ID"]  # so the receiver can drop the copy


async def test_a_mail_the_server_refuses_for_good_fails_at_once(
    mail_settings: Settings,
    smtp: SmtpServer,
    admin: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp.handler.refused.add("nobody@example.org")
    async with serving_with_delivery(mail_settings) as http:
        assert (await http.post("/committed?to=nobody@example.org")).status_code == 200
        await poll_until_async(
            lambda: admin.fetchval("SELECT bool_and(failed_at IS NOT NULL) FROM mail_outbox")
        )
    row = await admin.fetchrow("SELECT attempts, last_error, context FROM mail_outbox")
    assert row is not None
    assert row["attempts"] == 1 and "550" in row["last_error"] and row["context"] == "{}"
    assert any("not retried" in record.getMessage() for record in caplog.records)


async def test_delivery_gives_up_after_max_attempts_and_logs_it(
    mail_settings: Settings,
    smtp: SmtpServer,
    admin: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await anyio.to_thread.run_sync(smtp.stop)
    fast = replace(mail_settings, mail_retry_delay=0.01)
    async with serving_with_delivery(fast) as http:
        assert (await http.post("/committed?to=never@example.org")).status_code == 200
        await poll_until_async(
            lambda: admin.fetchval("SELECT bool_and(failed_at IS NOT NULL) FROM mail_outbox")
        )
    assert await admin.fetchval("SELECT attempts FROM mail_outbox") == MAX_ATTEMPTS
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and "failed" in r.msg]
    assert len(failures) == 1


async def test_without_an_smtp_url_mail_is_written_as_eml_files_named_in_the_log(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file_settings = replace(settings, data_dir=tmp_path)
    caplog.set_level(logging.INFO, logger="sparc.mail")
    async with serving_with_delivery(file_settings) as http:
        assert (await http.post("/committed?to=ada@example.org")).status_code == 200
        await poll_until(lambda: any((tmp_path / "mail").glob("*.eml")))
    (path,) = (tmp_path / "mail").glob("*.eml")
    assert any(str(path) in record.getMessage() for record in caplog.records)
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["To"] == "ada@example.org"
    assert uuid.UUID(path.stem)  # named after its outbox row


SECRET = "s3cret-Pa55word"


async def test_the_smtp_password_is_in_no_repr_error_or_log(
    settings: Settings, smtp: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"smtp://mailer:{SECRET}@127.0.0.1:{smtp.port}"
    secret_settings = replace(settings, smtp_url=url)
    transport = SmtpTransport(url, timeout=5)
    assert SECRET not in repr(secret_settings) and SECRET not in secret_settings.masked_smtp_url
    assert SECRET not in repr(transport) and SECRET not in transport.description
    # This server offers no STARTTLS: the password must not be sent, nor shown in the error.
    message = outbox.OutboxMessage(
        uuid.uuid4(), outbox.PASSWORD_CHANGED, "ada@example.org", {}, 1, datetime.now(UTC)
    )
    with pytest.raises(DeliveryFailed) as refused:
        await transport.deliver(MailBuilder(settings).build(message), message_id=message.id)
    assert "STARTTLS" in str(refused.value) and SECRET not in str(refused.value)
    assert smtp.messages == []
    await anyio.to_thread.run_sync(smtp.stop)
    with pytest.raises(DeliveryFailed) as unreachable:
        await transport.deliver(MailBuilder(settings).build(message), message_id=message.id)
    assert SECRET not in str(unreachable.value)
    assert all(SECRET not in record.getMessage() for record in caplog.records)


def delivery_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == DELIVERY_TASK_NAME]


async def test_the_app_delivers_in_the_background_and_stops_at_shutdown(
    mail_settings: Settings,
) -> None:
    async with serving(create_app(mail_settings)):
        assert len(delivery_tasks()) == 1
    assert delivery_tasks() == []
