"""What an admin does to accounts: find, show, disable, enable, promote, revoke, erase.

One place for each rule, shared by the admin API (sparc.admin), DELETE /auth/me and `sparc users`
(sparc.admin_cli). Every function runs on `get_db_client()` inside the caller's transaction, so a
change and its audit event commit or roll back together.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import HTTPConnection

from sparc import account_tokens, audit
from sparc.database import Row, get_db_client
from sparc.identity import disabled_now
from sparc.security import email_digest
from sparc.throttle import email_keys

PAGE_SIZE_DEFAULT = 20
PAGE_SIZE_MAX = 100
SEARCH_MAX_LENGTH = 254
# The timestamps of an account's detail view beyond its creation, each ISO 8601 or null.
DETAIL_TIMESTAMPS = ("email_verified_at", "disabled_at", "disabled_until", "last_login_at")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts on an account: an admin's request (`conn`, `admin_id`), the account's own request
    (`conn` alone), or an operator's `sparc users` on the host (neither)."""

    conn: HTTPConnection | None = None
    admin_id: uuid.UUID | None = None


CLI = Actor()


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of the account list ends: the last account's creation time and id."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = json.dumps([self.created_at.isoformat(), str(self.id)]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor `encode` wrote; ValueError for anything else."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            created_at, user_id = json.loads(raw)
            cursor = cls(datetime.fromisoformat(created_at), uuid.UUID(user_id))
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            raise ValueError("is not a cursor from a page of this list") from None
        if cursor.created_at.tzinfo is None:
            raise ValueError("is not a cursor from a page of this list")
        return cursor


def parse_until(text: str, *, now: datetime | None = None) -> datetime:
    """A `disabled until` time: ISO 8601 with a UTC offset (or Z), in the future."""
    try:
        until = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time such as 2030-01-31T12:00:00Z") from None
    if until.tzinfo is None:
        raise ValueError(f"{text!r} needs a UTC offset, such as Z or +01:00")
    if until <= (now or datetime.now(UTC)):
        raise ValueError(f"{text!r} is not in the future")
    return until


def like_pattern(search: str) -> str:
    """A LIKE pattern matching `search` anywhere, its own %, _ and \\ taken literally."""
    escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def _record(event: str, actor: Actor, *, user_id: uuid.UUID | None) -> None:
    await audit.record(event, actor.conn, user_id=user_id, actor_id=actor.admin_id)


async def create_account(
    email: str, password_hash: str, *, is_admin: bool = False, verified: bool = False
) -> Row | None:
    """Insert the account; None if the email exists in any letter case. `verified`: its address
    counts as verified from the start (an operator vouched for it)."""
    # ON CONFLICT, not a caught UniqueViolation: a failed statement would doom the transaction.
    return await get_db_client().fetch_one(
        """
        INSERT INTO users (email, password_hash, is_admin, email_verified_at)
        VALUES (:email, :password_hash, :is_admin, CASE WHEN :verified THEN now() END)
        ON CONFLICT ((lower(email))) DO NOTHING
        RETURNING id, email
        """,
        {
            "email": email,
            "password_hash": password_hash,
            "is_admin": is_admin,
            "verified": verified,
        },
    )


async def record_creation(user_id: uuid.UUID, actor: Actor) -> None:
    """The audit event of an account an operator or admin created (not a registration)."""
    await _record("admin_user_created", actor, user_id=user_id)


async def account_id(email: str) -> uuid.UUID | None:
    """The id of the account with this email, in any letter case."""
    found: uuid.UUID | None = await get_db_client().fetch_val(
        "SELECT id FROM users WHERE lower(email) = lower(:email)", {"email": email.strip()}
    )
    return found


def _summary(row: Row) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "email": row["email"],
        "created_at": row["created_at"].isoformat(),
        "is_admin": row["is_admin"],
        "disabled": row["disabled"],
    }


async def list_accounts(
    *, search: str | None, limit: int, after: Cursor | None
) -> tuple[list[dict[str, Any]], Cursor | None]:
    """One page of accounts, newest first, whose email holds `search` in any letter case; the
    cursor of the next page, or None on the last."""
    rows = await get_db_client().fetch_all(
        f"""
        SELECT id, email, created_at, is_admin, {disabled_now()} AS disabled FROM users
        WHERE (CAST(:pattern AS text) IS NULL OR lower(email) LIKE lower(:pattern) ESCAPE '\\')
          AND (CAST(:after_created AS timestamptz) IS NULL
               OR (created_at, id) < (:after_created, :after_id))
        ORDER BY created_at DESC, id DESC LIMIT :limit
        """,
        {
            "pattern": like_pattern(search) if search else None,
            "after_created": after.created_at if after else None,
            "after_id": after.id if after else None,
            "limit": limit + 1,
        },
    )
    page = rows[:limit]
    more = len(rows) > limit
    return [_summary(row) for row in page], (
        Cursor(page[-1]["created_at"], page[-1]["id"]) if more else None
    )


async def account_detail(user_id: uuid.UUID, *, idle_timeout: float) -> dict[str, Any] | None:
    """The account as an admin sees it, or None: its states, last login and live sessions."""
    row = await get_db_client().fetch_one(
        f"""
        SELECT id, email, created_at, is_admin, {disabled_now()} AS disabled,
               {", ".join(DETAIL_TIMESTAMPS)},
               (SELECT count(*) FROM sessions s
                WHERE s.user_id = users.id AND s.expires_at > now()
                  AND s.last_seen_at > now() - CAST(:idle_timeout AS interval)) AS live_sessions
        FROM users WHERE id = :id
        """,
        {"id": user_id, "idle_timeout": timedelta(seconds=idle_timeout)},
    )
    if row is None:
        return None
    detail = _summary(row)
    for column in DETAIL_TIMESTAMPS:
        detail[column] = row[column].isoformat() if row[column] is not None else None
    detail["live_sessions"] = row["live_sessions"]
    return detail


async def _revoke_all(user_id: uuid.UUID) -> int:
    revoked = await get_db_client().fetch_val(
        """
        WITH revoked AS (DELETE FROM sessions WHERE user_id = :id RETURNING 1)
        SELECT count(*) FROM revoked
        """,
        {"id": user_id},
    )
    return int(revoked)


async def disable(user_id: uuid.UUID, actor: Actor, *, until: datetime | None = None) -> int | None:
    """Disable the account (until `until`, or until enabled) and revoke every session of it in
    the same transaction; the sessions revoked, or None for no such account."""
    # The UPDATE first: it waits for a login that has locked the row (sparc.auth.login), so the
    # DELETE after it sees that login's session too.
    found = await get_db_client().fetch_val(
        "UPDATE users SET disabled_at = now(), disabled_until = :until WHERE id = :id RETURNING id",
        {"id": user_id, "until": until},
    )
    if found is None:
        return None
    revoked = await _revoke_all(user_id)
    # A reset link mailed before the disable must not change the password of a disabled account.
    await account_tokens.revoke(user_id, account_tokens.PASSWORD_RESET)
    await _record("admin_user_disabled", actor, user_id=user_id)
    return revoked


async def enable(user_id: uuid.UUID, actor: Actor) -> bool:
    found = await get_db_client().fetch_val(
        "UPDATE users SET disabled_at = NULL, disabled_until = NULL WHERE id = :id RETURNING id",
        {"id": user_id},
    )
    if found is None:
        return False
    await _record("admin_user_enabled", actor, user_id=user_id)
    return True


async def revoke_sessions(user_id: uuid.UUID, actor: Actor) -> int | None:
    """End every session of the account; how many, or None for no such account."""
    found = await get_db_client().fetch_val(
        "SELECT id FROM users WHERE id = :id FOR UPDATE", {"id": user_id}
    )
    if found is None:
        return None
    revoked = await _revoke_all(user_id)
    await _record("admin_sessions_revoked", actor, user_id=user_id)
    return revoked


async def set_admin(user_id: uuid.UUID, actor: Actor, *, is_admin: bool) -> bool:
    found = await get_db_client().fetch_val(
        "UPDATE users SET is_admin = :is_admin WHERE id = :id RETURNING id",
        {"id": user_id, "is_admin": is_admin},
    )
    if found is None:
        return False
    await _record(
        "admin_user_promoted" if is_admin else "admin_user_demoted", actor, user_id=user_id
    )
    return True


async def erase(user_id: uuid.UUID, actor: Actor) -> bool:
    """Delete the account and everything that names it; keep its audit events pseudonymised.

    In the caller's one transaction: the events about the account, those about its email (failed
    or throttled logins before it existed) and those it did as an admin lose their user, email
    digest, address and user agent, and keep their type and time; its throttle rows (keyed by
    its email's digest), its sessions and its row go. Tables that reference users with ON DELETE
    CASCADE go with the row. The erasure's own event names no one but the admin who did it.
    """
    db = get_db_client()
    email = await db.fetch_val("SELECT email FROM users WHERE id = :id", {"id": user_id})
    if email is None:
        return False
    # The throttle rows before the account's row, in the order a login takes them: the two
    # never wait for each other in a cycle.
    await db.execute(
        "DELETE FROM login_throttles WHERE key LIKE ANY(:keys)", {"keys": email_keys(email)}
    )
    if (
        await db.fetch_val("SELECT id FROM users WHERE id = :id FOR UPDATE", {"id": user_id})
        is None
    ):
        return False  # erased meanwhile
    await db.execute(
        """
        UPDATE auth_events SET user_id = NULL, email_hash = NULL, ip = NULL, user_agent = NULL
        WHERE user_id = :id OR email_hash = :digest
        """,
        {"id": user_id, "digest": email_digest(email)},
    )
    await db.execute(
        "UPDATE auth_events SET actor_id = NULL, ip = NULL, user_agent = NULL WHERE actor_id = :id",
        {"id": user_id},
    )
    await db.execute("DELETE FROM sessions WHERE user_id = :id", {"id": user_id})
    await db.execute("DELETE FROM users WHERE id = :id", {"id": user_id})
    if actor.admin_id is None and actor.conn is not None:
        # The account erased itself: its request's address and user agent are its own.
        await audit.record("account_erased", actor.conn, keep_client=False)
    else:
        await _record("admin_user_erased", actor, user_id=None)
    return True
