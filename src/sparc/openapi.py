"""The OpenAPI 3.1 description of SPARC's HTTP API, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc import __version__
from sparc.audit import EVENT_TYPES

JSON = "application/json"
PROBLEM = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(schema_name)}}}


def _problem(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM: {"schema": _ref("Problem")}},
    }
    if retry_after:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    return response


def _body(schema_name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": _ref(schema_name)}}}


_NO_CONTENT = {"description": "Done; no body."}
# Every endpoint can answer these.
_COMMON = {
    "500": _problem("The server failed; nothing the request wrote was kept."),
    "503": _problem(
        "The database is unavailable, its pool exhausted, or the request's transaction kept "
        "losing races with others; nothing was kept, retry later.",
        retry_after=True,
    ),
}
_BODY_ERRORS = {
    "400": _problem("The body is not valid JSON."),
    "413": _problem("The body is larger than 64 KiB."),
    "415": _problem("The body is not JSON."),
    "422": _problem("Fields are missing or invalid; `errors` lists them."),
}
_UNAUTHORIZED = {
    "401": _problem("No valid bearer token; the answer carries `WWW-Authenticate: Bearer`.")
}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _operation(
    summary: str,
    responses: dict[str, Any],
    *,
    body: str | None = None,
    secured: bool = False,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {**responses, **_COMMON}}
    if body is not None:
        operation["requestBody"] = _body(body)
        operation["responses"] = {**_BODY_ERRORS, **operation["responses"]}
    if secured:
        operation["security"] = _BEARER
        operation["responses"] = {**_UNAUTHORIZED, **operation["responses"]}
    else:
        operation["security"] = []
    if parameters:
        operation["parameters"] = parameters
    return operation


def _string(**extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra}


_TIMESTAMP = _string(format="date-time")
_NULLABLE_STRING = {"type": ["string", "null"]}

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": _string(),
            "title": _string(),
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": _string(),
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": _string(), "message": _string()},
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
    "Credentials": {
        "type": "object",
        "required": ["email", "password"],
        "properties": {
            "email": _string(format="email", maxLength=254),
            "password": _string(minLength=1, maxLength=256),
        },
    },
    "Registration": {
        "type": "object",
        "required": ["email", "password"],
        "properties": {
            "email": _string(format="email", maxLength=254),
            "password": _string(minLength=8, maxLength=256),
        },
    },
    "PasswordChange": {
        "type": "object",
        "required": ["current_password", "new_password"],
        "properties": {
            "current_password": _string(minLength=1, maxLength=256),
            "new_password": _string(minLength=8, maxLength=256),
        },
    },
    "Account": {
        "type": "object",
        "required": ["id", "email"],
        "properties": {"id": _string(format="uuid"), "email": _string()},
        "additionalProperties": False,
    },
    "Me": {
        "type": "object",
        "required": ["id", "email", "created_at"],
        "properties": {"id": _string(format="uuid"), "email": _string(), "created_at": _TIMESTAMP},
        "additionalProperties": False,
    },
    "Token": {
        "type": "object",
        "required": ["access_token", "token_type", "expires_at"],
        "properties": {
            "access_token": _string(minLength=43),
            "token_type": {"const": "bearer"},
            "expires_at": _TIMESTAMP,
        },
        "additionalProperties": False,
    },
    "Session": {
        "type": "object",
        "required": [
            "id",
            "created_at",
            "last_seen_at",
            "expires_at",
            "user_agent",
            "ip",
            "current",
        ],
        "properties": {
            "id": _string(format="uuid"),
            "created_at": _TIMESTAMP,
            "last_seen_at": _TIMESTAMP,
            "expires_at": _TIMESTAMP,
            "user_agent": _NULLABLE_STRING,
            "ip": _NULLABLE_STRING,
            "current": {"type": "boolean"},
        },
        "additionalProperties": False,
    },
    "SessionList": {
        "type": "object",
        "required": ["sessions"],
        "properties": {"sessions": {"type": "array", "items": _ref("Session")}},
        "additionalProperties": False,
    },
    "Event": {
        "type": "object",
        "required": ["id", "type", "ip", "user_agent", "created_at"],
        "properties": {
            "id": {"type": "integer"},
            "type": {"enum": list(EVENT_TYPES)},
            "ip": _NULLABLE_STRING,
            "user_agent": _NULLABLE_STRING,
            "created_at": _TIMESTAMP,
        },
        "additionalProperties": False,
    },
    "EventPage": {
        "type": "object",
        "required": ["events", "next_before"],
        "properties": {
            "events": {"type": "array", "items": _ref("Event")},
            "next_before": {
                "type": ["integer", "null"],
                "description": "Pass as `before` for the next (older) page; null on the last.",
            },
        },
        "additionalProperties": False,
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
        "additionalProperties": False,
    },
    "Ready": {
        "type": "object",
        "required": ["status", "pool", "workers", "connection_bound"],
        "properties": {
            "status": {"const": "ready"},
            "pool": {
                "type": "object",
                "required": ["size", "idle", "in_use", "max"],
                "properties": {
                    name: {"type": "integer", "minimum": 0}
                    for name in ("size", "idle", "in_use", "max")
                },
                "additionalProperties": False,
            },
            "workers": {"type": "integer", "minimum": 1},
            "connection_bound": {
                "type": "integer",
                "minimum": 1,
                "description": "workers times DB_POOL_MAX_SIZE: the most connections SPARC opens.",
            },
        },
        "additionalProperties": False,
    },
}

_THROTTLED = {
    "429": _problem("Too many failed logins; retry after `Retry-After` s.", retry_after=True)
}

PATHS: dict[str, Any] = {
    "/auth/register": {
        "post": _operation(
            "Create an account",
            {
                "201": _json("Account", "The account was created."),
                "409": _problem("An account with this email (in any letter case) exists."),
            },
            body="Registration",
        )
    },
    "/auth/login": {
        "post": _operation(
            "Log in and get a bearer token",
            {
                "200": _json("Token", "A new session's token (shown only this once)."),
                "401": _problem("Wrong email or password (the same answer for both)."),
                **_THROTTLED,
            },
            body="Credentials",
        )
    },
    "/auth/me": {
        "get": _operation("The caller's account", {"200": _json("Me", "The caller.")}, secured=True)
    },
    "/auth/logout": {"post": _operation("End this session", {"204": _NO_CONTENT}, secured=True)},
    "/auth/logout-all": {
        "post": _operation("End every session of the caller", {"204": _NO_CONTENT}, secured=True)
    },
    "/auth/password": {
        "post": _operation(
            "Change the password; every other session ends",
            {"204": _NO_CONTENT, **_THROTTLED},
            body="PasswordChange",
            secured=True,
        )
    },
    "/auth/sessions": {
        "get": _operation(
            "The caller's live sessions",
            {"200": _json("SessionList", "Newest first.")},
            secured=True,
        )
    },
    "/auth/sessions/{session_id}": {
        "delete": _operation(
            "Revoke one of the caller's sessions",
            {"204": _NO_CONTENT, "404": _problem("The caller has no session with this id.")},
            secured=True,
            parameters=[
                {
                    "name": "session_id",
                    "in": "path",
                    "required": True,
                    "schema": _string(format="uuid"),
                }
            ],
        )
    },
    "/auth/events": {
        "get": _operation(
            "The caller's audit events, newest first",
            {
                "200": _json("EventPage", "One page of events."),
                "422": _problem("`limit` or `before` is invalid."),
            },
            secured=True,
            parameters=[
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                },
                {
                    "name": "before",
                    "in": "query",
                    "description": "`next_before` of the previous page.",
                    "schema": {"type": "integer"},
                },
            ],
        )
    },
    "/healthz": {
        "get": _operation("Liveness: the process runs", {"200": _json("Health", "Alive.")})
    },
    "/readyz": {
        "get": _operation(
            "Readiness: a pooled connection answers",
            {"200": _json("Ready", "Ready, with the pool's figures.")},
        )
    },
    "/metrics": {
        "get": _operation(
            "Prometheus metrics of every worker",
            {
                "200": {
                    "description": "Prometheus text exposition format 0.0.4.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        )
    },
    "/openapi.json": {
        "get": _operation(
            "This document",
            {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {JSON: {"schema": {"type": "object"}}},
                }
            },
        )
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "SPARC",
        "version": __version__,
        "description": "Auth service on one shared, bounded PostgreSQL pool per process.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The access_token from POST /auth/login.",
            }
        },
        "headers": {
            "RetryAfter": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        },
    },
}


async def openapi_document(request: Request) -> Response:
    return JSONResponse(DOCUMENT)


routes = [Route("/openapi.json", openapi_document, methods=["GET"])]
