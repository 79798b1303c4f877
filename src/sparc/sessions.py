"""A user's sessions: list them, revoke one, revoke all."""

from __future__ import annotations

import uuid
from datetime import timedelta

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc import audit
from sparc.database import get_db_client, retry_on_conflict
from sparc.identity import current_user
from sparc.openapi_parts import (
    NO_CONTENT,
    Operations,
    json_answer,
    operation,
    problem_answer,
    string_schema,
)
from sparc.problems import Problem
from sparc.state import settings_of


async def list_sessions(request: Request) -> Response:
    """The caller's live sessions (unexpired and not idle), newest first."""
    user = current_user(request)
    settings = settings_of(request)
    rows = await get_db_client().fetch_all(
        """
        SELECT id, created_at, last_seen_at, expires_at, user_agent, host(ip) AS ip
        FROM sessions
        WHERE user_id = :user_id AND expires_at > now()
          AND last_seen_at > now() - CAST(:idle_timeout AS interval)
        ORDER BY created_at DESC, id
        """,
        {"user_id": user.id, "idle_timeout": timedelta(seconds=settings.token_idle_timeout)},
    )
    return JSONResponse(
        {
            "sessions": [
                {
                    "id": str(row["id"]),
                    "created_at": row["created_at"].isoformat(),
                    "last_seen_at": row["last_seen_at"].isoformat(),
                    "expires_at": row["expires_at"].isoformat(),
                    "user_agent": row["user_agent"],
                    "ip": row["ip"],
                    "current": row["id"] == user.session_id,
                }
                for row in rows
            ]
        }
    )


async def revoke_session(request: Request) -> Response:
    user = current_user(request)
    not_found = Problem(404, "You have no session with this id.")
    try:
        session_id = uuid.UUID(request.path_params["session_id"])
    except ValueError:
        raise not_found from None
    revoked = await get_db_client().fetch_val(
        "DELETE FROM sessions WHERE id = :id AND user_id = :user_id RETURNING id",
        {"id": session_id, "user_id": user.id},
    )
    if revoked is None:
        raise not_found  # another user's session looks exactly like a missing one
    await audit.record("session_revoked", request, user_id=user.id)
    return Response(status_code=204)


@retry_on_conflict
async def logout_all(request: Request) -> Response:
    user = current_user(request)
    await get_db_client().execute("DELETE FROM sessions WHERE user_id = :id", {"id": user.id})
    await audit.record("logout_all", request, user_id=user.id)
    return Response(status_code=204)


routes = [
    Route("/auth/sessions", list_sessions, methods=["GET"]),
    Route("/auth/sessions/{session_id}", revoke_session, methods=["DELETE"]),
    Route("/auth/logout-all", logout_all, methods=["POST"]),
]
operations: Operations = {
    list_sessions: operation(
        "The caller's live sessions",
        {"200": json_answer("SessionList", "Newest first.")},
        secured=True,
    ),
    revoke_session: operation(
        "Revoke one of the caller's sessions",
        {"204": NO_CONTENT, "404": problem_answer("The caller has no session with this id.")},
        secured=True,
        parameters=[
            {
                "name": "session_id",
                "in": "path",
                "required": True,
                "schema": string_schema(format="uuid"),
            }
        ],
    ),
    logout_all: operation("End every session of the caller", {"204": NO_CONTENT}, secured=True),
}
