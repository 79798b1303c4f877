"""Who is calling: the bearer-token authentication backend and the authenticated user."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
)
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from sparc.database import DatabaseUnavailable, WritesRefused, get_db_client
from sparc.problems import Problem, problem_response
from sparc.security import hash_token

logger = logging.getLogger("sparc.identity")

BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}
# last_seen_at is written at most this often, so authenticated reads stay reads.
LAST_SEEN_RESOLUTION = timedelta(minutes=1)
# After the database refused the last_seen_at write, the next try waits this long.
WRITES_REFUSED_BACKOFF = timedelta(seconds=10)


def disabled_now(users: str = "users") -> str:
    """SQL that is true while the row `users` of the users table is disabled: from disabled_at
    on, until disabled_until if that is set."""
    return (
        f"({users}.disabled_at IS NOT NULL"
        f" AND ({users}.disabled_until IS NULL OR {users}.disabled_until > now()))"
    )


def _interval(duration: timedelta) -> str:
    """`duration` as an SQL interval literal (whole microseconds, never an exponent)."""
    return f"CAST('{duration.total_seconds():.6f} seconds' AS interval)"


@dataclass(frozen=True, slots=True)
class AuthenticatedUser(BaseUser):
    id: uuid.UUID
    email: str
    created_at: datetime
    session_id: uuid.UUID
    email_verified: bool = False
    is_admin: bool = False

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.email

    @property
    def identity(self) -> str:
        return str(self.id)


class BearerTokenBackend(AuthenticationBackend):
    """Finds the live session of an `Authorization: Bearer <token>` header.

    One read on the request's connection, outside the request's transaction, checks the
    absolute expiry and the idle timeout; at most once a minute per session a second statement
    moves last_seen_at. An endpoint that queries nothing itself (GET /auth/me) so pays no
    BEGIN/COMMIT.
    """

    def __init__(self, *, idle_timeout: float) -> None:
        # The lookup's text is made once: every authenticated request sends it, and settings
        # written into it as literals are parameters the driver need not encode each time.
        self._lookup = f"""
            SELECT s.id AS session_id, u.id, u.email, u.created_at, u.is_admin,
                   u.email_verified_at IS NOT NULL AS email_verified,
                   s.last_seen_at < now() - {_interval(LAST_SEEN_RESOLUTION)} AS seen_long_ago
            FROM sessions s JOIN users u ON u.id = s.user_id
            WHERE s.token_hash = :token_hash AND s.expires_at > now()
              AND s.last_seen_at > now() - {_interval(timedelta(seconds=idle_timeout))}
              AND NOT {disabled_now("u")}
            """
        # While the database refuses writes, the bump is not tried again before this.
        self._writes_refused_until = 0.0

    async def _note_activity(self, session_id: uuid.UUID) -> None:
        """Move last_seen_at, best effort: a read must not fail because this write did.

        At most once a minute per session, and outside the request's transaction: the activity
        happened whether or not the request goes on to succeed.
        """
        if time.monotonic() < self._writes_refused_until:
            return
        try:
            await get_db_client().fetch_one_before_transaction(
                "UPDATE sessions SET last_seen_at = now() WHERE id = :id RETURNING id",
                {"id": session_id},
            )
        except WritesRefused:
            # A read-only database (a switchover, a standby): reads go on; retrying the bump
            # on every request would only cost each one a failed statement.
            self._writes_refused_until = time.monotonic() + WRITES_REFUSED_BACKOFF.total_seconds()
        except DatabaseUnavailable as exc:
            logger.info("last_seen_at not moved: %s", exc)

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        header = conn.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token or len(token) > 256:
            raise AuthenticationError("The Authorization header must be 'Bearer <token>'.")
        db = get_db_client()
        # Disabling deletes the account's sessions; refusing disabled accounts here as well
        # covers one disabled by hand in SQL.
        row = await db.fetch_one_before_transaction(self._lookup, {"token_hash": hash_token(token)})
        if row is not None and row["seen_long_ago"]:
            await self._note_activity(row["session_id"])
        if row is None:
            return None  # unknown, expired, idle or disabled: protected endpoints answer 401
        user = AuthenticatedUser(
            id=row["id"],
            email=row["email"],
            created_at=row["created_at"],
            session_id=row["session_id"],
            email_verified=row["email_verified"],
            is_admin=row["is_admin"],
        )
        return AuthCredentials(["authenticated"]), user


def authentication_failed(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    return problem_response(401, str(exc), headers=BEARER_CHALLENGE)


def current_admin(request: Request) -> AuthenticatedUser:
    """The caller if an admin; a 401 problem without a valid token, a 403 for anyone else."""
    user = current_user(request)
    if not user.is_admin:
        raise Problem(403, "This endpoint is for admin accounts only.")
    return user


def current_user(request: Request) -> AuthenticatedUser:
    """The caller, or a 401 problem with a Bearer challenge."""
    user = request.user
    if not isinstance(user, AuthenticatedUser):
        raise Problem(401, "A valid, unexpired bearer token is required.", headers=BEARER_CHALLENGE)
    return user
