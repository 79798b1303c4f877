"""The audit log: who did what to an account, written in the same transaction as the change."""

from __future__ import annotations

import re
import uuid

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc.clients import client_ip, client_user_agent
from sparc.database import get_db_client
from sparc.identity import current_user
from sparc.openapi_parts import Operations, json_answer, operation, problem_answer
from sparc.problems import Problem
from sparc.security import email_digest

EVENT_TYPES = (
    "register",
    "login_succeeded",
    "login_failed",
    "logout",
    "logout_all",
    "session_revoked",
    "password_changed",
    "login_throttled",
    "password_reset",
    "email_verified",
    # A disabled account's right password: refused with 403.
    "login_refused_disabled",
    # The account erased itself (DELETE /auth/me); kept without user, address or user agent.
    "account_erased",
    # What an admin (actor_id) or an operator at the CLI (via "cli") did to an account.
    "admin_user_created",
    "admin_user_disabled",
    "admin_user_enabled",
    "admin_sessions_revoked",
    "admin_user_promoted",
    "admin_user_demoted",
    "admin_user_erased",
)
PAGE_SIZE_DEFAULT = 20
PAGE_SIZE_MAX = 100
# ASCII digits, at most a bigint's worth: str.isdigit() also takes "²", which int() refuses.
_NUMBER = re.compile(r"[0-9]{1,18}")


async def record(
    event: str,
    conn: HTTPConnection | None,
    *,
    user_id: uuid.UUID | None = None,
    email: str | None = None,
    actor_id: uuid.UUID | None = None,
    keep_client: bool = True,
) -> None:
    """Write one event. `conn` None: it came from the CLI (no address, no user agent);
    `keep_client=False`: the client's address and user agent are not kept (an erasure's own)."""
    assert event in EVENT_TYPES, event
    client = conn if keep_client else None
    await get_db_client().execute(
        """
        INSERT INTO auth_events (type, user_id, email_hash, ip, user_agent, actor_id, via)
        VALUES (:type, :user_id, :email_hash, CAST(:ip AS inet), :user_agent, :actor_id, :via)
        """,
        {
            "type": event,
            "user_id": user_id,
            "email_hash": email_digest(email) if email is not None else None,
            "ip": client_ip(client) if client is not None else None,
            "user_agent": client_user_agent(client) if client is not None else None,
            "actor_id": actor_id,
            "via": "http" if conn is not None else "cli",
        },
    )


def _page_parameters(request: Request) -> tuple[int, int | None]:
    errors = []
    limit, before = PAGE_SIZE_DEFAULT, None
    raw_limit = request.query_params.get("limit")
    if raw_limit is not None:
        if _NUMBER.fullmatch(raw_limit) is None or not 1 <= int(raw_limit) <= PAGE_SIZE_MAX:
            errors.append({"field": "limit", "message": f"must be 1 to {PAGE_SIZE_MAX}"})
        else:
            limit = int(raw_limit)
    raw_before = request.query_params.get("before")
    if raw_before is not None:
        if _NUMBER.fullmatch(raw_before) is None:
            errors.append({"field": "before", "message": "must be an event id from a page"})
        else:
            before = int(raw_before)
    if errors:
        raise Problem(422, "The query parameters are invalid.", errors=errors)
    return limit, before


async def list_events(request: Request) -> Response:
    """The caller's own events, newest first; `next_before` pages on."""
    user = current_user(request)
    limit, before = _page_parameters(request)
    rows = await get_db_client().fetch_all(
        """
        SELECT id, type, host(ip) AS ip, user_agent, created_at FROM auth_events
        WHERE user_id = :user_id AND (CAST(:before AS bigint) IS NULL OR id < :before)
        ORDER BY id DESC LIMIT :limit
        """,
        {"user_id": user.id, "before": before, "limit": limit + 1},
    )
    page = rows[:limit]
    return JSONResponse(
        {
            "events": [
                {
                    "id": row["id"],
                    "type": row["type"],
                    "ip": row["ip"],
                    "user_agent": row["user_agent"],
                    "created_at": row["created_at"].isoformat(),
                }
                for row in page
            ],
            "next_before": page[-1]["id"] if len(rows) > limit else None,
        }
    )


routes = [Route("/auth/events", list_events, methods=["GET"])]
operations: Operations = {
    list_events: operation(
        "The caller's audit events, newest first",
        {
            "200": json_answer("EventPage", "One page of events."),
            "422": problem_answer("`limit` or `before` is invalid."),
        },
        secured=True,
        parameters=[
            {
                "name": "limit",
                "in": "query",
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": PAGE_SIZE_MAX,
                    "default": PAGE_SIZE_DEFAULT,
                },
            },
            {
                "name": "before",
                "in": "query",
                "description": "`next_before` of the previous page.",
                "schema": {"type": "integer"},
            },
        ],
    )
}
