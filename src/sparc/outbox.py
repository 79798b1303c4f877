"""The mail outbox table: queue a mail in the caller's transaction; claim, mark sent, retry.

- `send` writes one row through get_db_client(), so inside a request it is part of the
  request's transaction: the mail exists if and only if the request commits (a rollback, a 4xx,
  a replayed race all leave nothing behind, and a replay queues it once).
- `claim` leases due rows to one worker in one statement, its own short transaction (FOR
  UPDATE SKIP LOCKED, then next_attempt_at moves to the lease's end), so no two workers hold the
  same row, and none waits for another's.
- `mark_sent`, `mark_retry` and `mark_failed` end a lease, each in its own short statement.
  A sent or failed row's context (it holds the mailed token) is emptied.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sparc.database import DatabaseClient, get_db_client

# The kinds of mail SPARC sends; each is a set of templates (sparc.mail_messages).
PASSWORD_RESET = "password_reset"
VERIFY_EMAIL = "verify_email"
PASSWORD_CHANGED = "password_changed"
KINDS = (PASSWORD_RESET, VERIFY_EMAIL, PASSWORD_CHANGED)
# last_error is cut to this many characters: it is for an operator, not a dump.
ERROR_MAX_LENGTH = 500


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One claimed row: what to send, and how many attempts (this one included) it has had."""

    id: uuid.UUID
    kind: str
    recipient: str
    context: dict[str, Any]
    attempts: int
    created_at: datetime


async def send(
    *, to: str, template: str, context: Mapping[str, Any], user_id: uuid.UUID | None = None
) -> uuid.UUID:
    """Queue a mail in the current transaction; the delivery worker sends it after commit.

    `template` is one of KINDS; `context` must be JSON (it is what the templates see).
    `user_id` ties the row to an account, so erasing the account erases its mail too.
    """
    if template not in KINDS:
        raise ValueError(f"unknown mail template {template!r}: one of {', '.join(KINDS)}")
    message_id: uuid.UUID = await get_db_client().execute(
        """
        INSERT INTO mail_outbox (user_id, kind, recipient, context)
        VALUES (:user_id, :kind, :recipient, CAST(:context AS jsonb))
        RETURNING id
        """,
        {"user_id": user_id, "kind": template, "recipient": to, "context": json.dumps(context)},
    )
    return message_id


async def seconds_since_last(user_id: uuid.UUID | None, kind: str, within: float) -> list[float]:
    """Ages in seconds of the account's mails of `kind` queued within the last `within` s,
    newest first (none for no account: the query runs all the same)."""
    rows = await get_db_client().fetch_all(
        """
        SELECT extract(epoch FROM clock_timestamp() - created_at) AS age FROM mail_outbox
        WHERE user_id = :user_id AND kind = :kind
          AND created_at > clock_timestamp() - CAST(:within AS interval)
        ORDER BY created_at DESC
        """,
        {"user_id": user_id, "kind": kind, "within": timedelta(seconds=within)},
    )
    return [float(row["age"]) for row in rows]


async def claim(client: DatabaseClient, *, limit: int, lease: float) -> list[OutboxMessage]:
    """Lease up to `limit` due rows to this worker for `lease` seconds, oldest due first.

    Run on `client` outside any unit of work: the statement commits on its own, and its
    connection is back in the pool when this returns."""
    rows = await client.fetch_all(
        """
        WITH due AS (
            SELECT id FROM mail_outbox
            WHERE sent_at IS NULL AND failed_at IS NULL AND next_attempt_at <= clock_timestamp()
            ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED
        )
        UPDATE mail_outbox m SET
            attempts = m.attempts + 1,
            next_attempt_at = clock_timestamp() + CAST(:lease AS interval)
        FROM due WHERE m.id = due.id
        RETURNING m.id, m.kind, m.recipient, m.context, m.attempts, m.created_at
        """,
        {"limit": limit, "lease": timedelta(seconds=lease)},
    )
    return [
        OutboxMessage(
            id=row["id"],
            kind=row["kind"],
            recipient=row["recipient"],
            context=json.loads(row["context"]),
            attempts=row["attempts"],
            created_at=row["created_at"],
        )
        for row in rows
    ]


async def mark_sent(client: DatabaseClient, message_id: uuid.UUID) -> float | None:
    """The row is delivered; seconds from its queueing to now (None if it is gone: the
    account was erased meanwhile)."""
    seconds = await client.fetch_val(
        """
        UPDATE mail_outbox SET sent_at = clock_timestamp(), context = '{}', last_error = NULL
        WHERE id = :id
        RETURNING extract(epoch FROM sent_at - created_at)
        """,
        {"id": message_id},
    )
    return None if seconds is None else float(seconds)


async def mark_retry(
    client: DatabaseClient, message_id: uuid.UUID, *, delay: float, error: str
) -> None:
    """The attempt failed: the row is due again in `delay` seconds."""
    await client.execute(
        """
        UPDATE mail_outbox SET
            next_attempt_at = clock_timestamp() + CAST(:delay AS interval), last_error = :error
        WHERE id = :id
        """,
        {"id": message_id, "delay": timedelta(seconds=delay), "error": error[:ERROR_MAX_LENGTH]},
    )


async def mark_failed(client: DatabaseClient, message_id: uuid.UUID, *, error: str) -> None:
    """No more attempts: the row stays, failed, for an operator to see."""
    await client.execute(
        """
        UPDATE mail_outbox SET failed_at = clock_timestamp(), context = '{}', last_error = :error
        WHERE id = :id
        """,
        {"id": message_id, "error": error[:ERROR_MAX_LENGTH]},
    )
