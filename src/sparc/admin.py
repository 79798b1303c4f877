"""The admin HTTP API under /admin/: accounts listed, shown, disabled, enabled, revoked, erased.

For bearer tokens of admin accounts only (others 403, no token 401). The rules are those of
sparc.accounts, which `sparc users` shares; every action is an audit event naming the admin.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc import accounts
from sparc.database import retry_on_conflict
from sparc.identity import AuthenticatedUser, current_admin
from sparc.openapi_parts import (
    NO_CONTENT,
    Operations,
    json_answer,
    operation,
    problem_answer,
    string_schema,
)
from sparc.payloads import read_json_object
from sparc.problems import Problem
from sparc.state import settings_of
from sparc.text import unstorable

# ASCII digits only: str.isdigit() also takes "²", which int() refuses.
_NUMBER = re.compile(r"[0-9]{1,4}")
_NOT_FOUND = "There is no account with this id."


def _invalid_query(field: str, message: str) -> Problem:
    return Problem(
        422, "The query parameters are invalid.", errors=[{"field": field, "message": message}]
    )


def _target(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["user_id"])
    except ValueError:
        raise Problem(404, _NOT_FOUND) from None


def _acting(request: Request, admin: AuthenticatedUser) -> accounts.Actor:
    return accounts.Actor(request, admin.id)


async def _detail(request: Request, user_id: uuid.UUID) -> Response:
    detail = await accounts.account_detail(
        user_id, idle_timeout=settings_of(request).token_idle_timeout
    )
    if detail is None:
        raise Problem(404, _NOT_FOUND)
    return JSONResponse(detail)


async def list_users(request: Request) -> Response:
    current_admin(request)
    query = request.query_params
    limit = accounts.PAGE_SIZE_DEFAULT
    raw_limit = query.get("limit")
    if raw_limit is not None:
        if (
            _NUMBER.fullmatch(raw_limit) is None
            or not 1 <= int(raw_limit) <= accounts.PAGE_SIZE_MAX
        ):
            raise _invalid_query("limit", f"must be 1 to {accounts.PAGE_SIZE_MAX}")
        limit = int(raw_limit)
    search = query.get("search") or None
    if search is not None and (unstorable(search) or len(search) > accounts.SEARCH_MAX_LENGTH):
        raise _invalid_query(
            "search", f"must be at most {accounts.SEARCH_MAX_LENGTH} storable characters"
        )
    after = None
    raw_after = query.get("after")
    if raw_after is not None:
        try:
            after = accounts.Cursor.decode(raw_after)
        except ValueError as exc:
            raise _invalid_query("after", str(exc)) from None
    users, next_cursor = await accounts.list_accounts(search=search, limit=limit, after=after)
    return JSONResponse(
        {"users": users, "next_after": next_cursor.encode() if next_cursor else None}
    )


async def show_user(request: Request) -> Response:
    current_admin(request)
    return await _detail(request, _target(request))


@retry_on_conflict
async def disable_user(request: Request) -> Response:
    admin = current_admin(request)
    user_id = _target(request)
    # The body is optional: without one the account stays disabled until enabled.
    has_body = request.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in request.headers
    )
    body = await read_json_object(request) if has_body else {}
    until = None
    raw_until = body.get("until")
    if raw_until is not None:
        try:
            if not isinstance(raw_until, str):
                raise ValueError("must be a string (ISO 8601) or null")
            until = accounts.parse_until(raw_until)
        except ValueError as exc:
            raise Problem(
                422,
                "The request body has invalid fields.",
                errors=[{"field": "until", "message": str(exc)}],
            ) from None
    if user_id == admin.id:
        raise Problem(409, "An admin cannot disable their own account.")
    if await accounts.disable(user_id, _acting(request, admin), until=until) is None:
        raise Problem(404, _NOT_FOUND)
    return await _detail(request, user_id)


@retry_on_conflict
async def enable_user(request: Request) -> Response:
    admin = current_admin(request)
    user_id = _target(request)
    if not await accounts.enable(user_id, _acting(request, admin)):
        raise Problem(404, _NOT_FOUND)
    return await _detail(request, user_id)


@retry_on_conflict
async def revoke_user_sessions(request: Request) -> Response:
    admin = current_admin(request)
    if await accounts.revoke_sessions(_target(request), _acting(request, admin)) is None:
        raise Problem(404, _NOT_FOUND)
    return Response(status_code=204)


@retry_on_conflict
async def erase_user(request: Request) -> Response:
    admin = current_admin(request)
    user_id = _target(request)
    if user_id == admin.id:
        raise Problem(409, "Erase your own account with DELETE /auth/me.")
    if not await accounts.erase(user_id, _acting(request, admin)):
        raise Problem(404, _NOT_FOUND)
    return Response(status_code=204)


routes = [
    Route("/admin/users", list_users, methods=["GET"]),
    Route("/admin/users/{user_id}", show_user, methods=["GET"]),
    Route("/admin/users/{user_id}", erase_user, methods=["DELETE"]),
    Route("/admin/users/{user_id}/disable", disable_user, methods=["POST"]),
    Route("/admin/users/{user_id}/enable", enable_user, methods=["POST"]),
    Route("/admin/users/{user_id}/sessions", revoke_user_sessions, methods=["DELETE"]),
]

_USER_ID: list[dict[str, Any]] = [
    {"name": "user_id", "in": "path", "required": True, "schema": string_schema(format="uuid")}
]
_ADMIN_ONLY = {"403": problem_answer("The caller is not an admin.")}
_UNKNOWN = {"404": problem_answer("There is no account with this id.")}
_DISABLE = operation(
    "Disable an account (until a time, or until enabled) and revoke all its sessions",
    {
        "200": json_answer("AdminUser", "The account, disabled."),
        **_ADMIN_ONLY,
        **_UNKNOWN,
        "409": problem_answer("The account is the caller's own."),
    },
    body="Disable",
    secured=True,
    parameters=_USER_ID,
)
_DISABLE["requestBody"]["required"] = False
operations: Operations = {
    list_users: operation(
        "Accounts, newest first, optionally those whose email holds `search`",
        {
            "200": json_answer("AdminUserPage", "One page of accounts."),
            **_ADMIN_ONLY,
            "422": problem_answer("`limit`, `search` or `after` is invalid."),
        },
        secured=True,
        parameters=[
            {
                "name": "search",
                "in": "query",
                "description": "A part of the email, in any letter case; % and _ match themselves.",
                "schema": string_schema(maxLength=accounts.SEARCH_MAX_LENGTH),
            },
            {
                "name": "limit",
                "in": "query",
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": accounts.PAGE_SIZE_MAX,
                    "default": accounts.PAGE_SIZE_DEFAULT,
                },
            },
            {
                "name": "after",
                "in": "query",
                "description": "`next_after` of the previous page (an opaque cursor).",
                "schema": string_schema(),
            },
        ],
    ),
    show_user: operation(
        "One account: its states, last login and live sessions",
        {"200": json_answer("AdminUser", "The account."), **_ADMIN_ONLY, **_UNKNOWN},
        secured=True,
        parameters=_USER_ID,
    ),
    erase_user: operation(
        "Erase an account: its row, sessions and tokens; its audit events pseudonymised",
        {
            "204": NO_CONTENT,
            **_ADMIN_ONLY,
            **_UNKNOWN,
            "409": problem_answer("The account is the caller's own (use DELETE /auth/me)."),
        },
        secured=True,
        parameters=_USER_ID,
    ),
    disable_user: _DISABLE,
    enable_user: operation(
        "Enable a disabled account",
        {"200": json_answer("AdminUser", "The account, enabled."), **_ADMIN_ONLY, **_UNKNOWN},
        secured=True,
        parameters=_USER_ID,
    ),
    revoke_user_sessions: operation(
        "Revoke every session of an account",
        {"204": NO_CONTENT, **_ADMIN_ONLY, **_UNKNOWN},
        secured=True,
        parameters=_USER_ID,
    ),
}
