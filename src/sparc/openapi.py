"""The OpenAPI 3.1 description of SPARC's HTTP API, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc import (
    __version__,
    accounts,
    admin,
    audit,
    auth,
    docs,
    email_verification,
    health,
    metrics,
    password_reset,
    sessions,
)
from sparc.account_tokens import TOKEN_MAX_LENGTH
from sparc.audit import EVENT_TYPES
from sparc.auth import (
    EMAIL_MAX_LENGTH,
    GIVEN_PASSWORD_MIN_LENGTH,
    PASSWORD_MAX_LENGTH,
    PASSWORD_MIN_LENGTH,
)
from sparc.clients import USER_AGENT_MAX_LENGTH
from sparc.common_passwords import common_passwords
from sparc.headers import CACHE_CONTROL, CONTENT_TYPE_OPTIONS
from sparc.openapi_parts import (
    JSON_MEDIA_TYPE,
    Operations,
    operation,
    path_items,
    schema_ref,
    string_schema,
)
from sparc.request_ids import REQUEST_ID_MAX_LENGTH, REQUEST_ID_PATTERN
from sparc.security import TOKEN_LENGTH

_TIMESTAMP = string_schema(format="date-time")
_NULLABLE_STRING = {"type": ["string", "null"]}
# Stored cut to this length (sparc.clients), so never longer in an answer.
_USER_AGENT = {**_NULLABLE_STRING, "maxLength": USER_AGENT_MAX_LENGTH}
_EMAIL = string_schema(format="email", maxLength=EMAIL_MAX_LENGTH)
_NEW_PASSWORD = string_schema(
    minLength=PASSWORD_MIN_LENGTH,
    maxLength=PASSWORD_MAX_LENGTH,
    description=f"Not one of the {len(common_passwords()):,} most common passwords, in any case.",
)
_MAILED_TOKEN = string_schema(
    minLength=1,
    maxLength=TOKEN_MAX_LENGTH,
    description="The code from the mail (the `token` of its link).",
)
_GIVEN_PASSWORD = string_schema(minLength=GIVEN_PASSWORD_MIN_LENGTH, maxLength=PASSWORD_MAX_LENGTH)
_REQUEST_ID = string_schema(maxLength=REQUEST_ID_MAX_LENGTH, pattern=REQUEST_ID_PATTERN)

_ADMIN_USER_SUMMARY: dict[str, Any] = {
    "id": string_schema(format="uuid"),
    "email": string_schema(),
    "created_at": _TIMESTAMP,
    "is_admin": {"type": "boolean"},
    "disabled": {
        "type": "boolean",
        "description": "Disabled now: logins answer 403 and it has no sessions.",
    },
}

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": string_schema(),
            "title": string_schema(),
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": string_schema(),
            "request_id": {
                **_REQUEST_ID,
                "description": "The request's id, as in its X-Request-ID answer header and in "
                "every log line of the request: quote it when reporting this answer.",
            },
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": string_schema(), "message": string_schema()},
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
    "Credentials": {
        "type": "object",
        "required": ["email", "password"],
        "properties": {"email": _EMAIL, "password": _GIVEN_PASSWORD},
    },
    "Registration": {
        "type": "object",
        "required": ["email", "password"],
        "properties": {"email": _EMAIL, "password": _NEW_PASSWORD},
    },
    "PasswordChange": {
        "type": "object",
        "required": ["current_password", "new_password"],
        "properties": {"current_password": _GIVEN_PASSWORD, "new_password": _NEW_PASSWORD},
    },
    "PasswordResetRequest": {
        "type": "object",
        "required": ["email"],
        "properties": {"email": string_schema(maxLength=EMAIL_MAX_LENGTH)},
    },
    "PasswordResetConfirm": {
        "type": "object",
        "required": ["token", "new_password"],
        "properties": {"token": _MAILED_TOKEN, "new_password": _NEW_PASSWORD},
    },
    "EmailVerification": {
        "type": "object",
        "required": ["token"],
        "properties": {"token": _MAILED_TOKEN},
    },
    "Accepted": {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": string_schema()},
        "additionalProperties": False,
    },
    "Erasure": {
        "type": "object",
        "required": ["password"],
        "properties": {"password": _GIVEN_PASSWORD},
    },
    "Disable": {
        "type": "object",
        "properties": {
            "until": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "Disabled until this time (with a UTC offset, in the future); "
                "absent or null: until enabled.",
            }
        },
    },
    "AdminUserSummary": {
        "type": "object",
        "required": ["id", "email", "created_at", "is_admin", "disabled"],
        "properties": _ADMIN_USER_SUMMARY,
        "additionalProperties": False,
    },
    "AdminUserPage": {
        "type": "object",
        "required": ["users", "next_after"],
        "properties": {
            "users": {"type": "array", "items": schema_ref("AdminUserSummary")},
            "next_after": {
                "type": ["string", "null"],
                "description": "Pass as `after` for the next page; null on the last.",
            },
        },
        "additionalProperties": False,
    },
    "AdminUser": {
        "type": "object",
        "required": [*_ADMIN_USER_SUMMARY, *accounts.DETAIL_TIMESTAMPS, "live_sessions"],
        "properties": {
            **_ADMIN_USER_SUMMARY,
            **{
                column: {"type": ["string", "null"], "format": "date-time"}
                for column in accounts.DETAIL_TIMESTAMPS
            },
            "live_sessions": {"type": "integer", "minimum": 0},
        },
        "additionalProperties": False,
    },
    "Account": {
        "type": "object",
        "required": ["id", "email"],
        "properties": {"id": string_schema(format="uuid"), "email": string_schema()},
        "additionalProperties": False,
    },
    "Me": {
        "type": "object",
        "required": ["id", "email", "email_verified", "created_at"],
        "properties": {
            "id": string_schema(format="uuid"),
            "email": string_schema(),
            "email_verified": {
                "type": "boolean",
                "description": "The holder showed the address is theirs (a mailed token).",
            },
            "created_at": _TIMESTAMP,
        },
        "additionalProperties": False,
    },
    "Token": {
        "type": "object",
        "required": ["access_token", "token_type", "expires_at"],
        "properties": {
            "access_token": string_schema(minLength=TOKEN_LENGTH),
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
            "id": string_schema(format="uuid"),
            "created_at": _TIMESTAMP,
            "last_seen_at": _TIMESTAMP,
            "expires_at": _TIMESTAMP,
            "user_agent": _USER_AGENT,
            "ip": _NULLABLE_STRING,
            "current": {"type": "boolean"},
        },
        "additionalProperties": False,
    },
    "SessionList": {
        "type": "object",
        "required": ["sessions"],
        "properties": {"sessions": {"type": "array", "items": schema_ref("Session")}},
        "additionalProperties": False,
    },
    "Event": {
        "type": "object",
        "required": ["id", "type", "ip", "user_agent", "created_at"],
        "properties": {
            "id": {"type": "integer"},
            "type": {"enum": list(EVENT_TYPES)},
            "ip": _NULLABLE_STRING,
            "user_agent": _USER_AGENT,
            "created_at": _TIMESTAMP,
        },
        "additionalProperties": False,
    },
    "EventPage": {
        "type": "object",
        "required": ["events", "next_before"],
        "properties": {
            "events": {"type": "array", "items": schema_ref("Event")},
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
        "required": ["status", "pool", "workers", "connection_bound", "schema"],
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
            "schema": {
                "type": "object",
                "required": ["revision", "head"],
                "properties": {
                    "revision": {
                        "type": ["string", "null"],
                        "description": "The database's alembic revision; null if never migrated.",
                    },
                    "head": {
                        "type": "string",
                        "description": "The revision this release's migrations end at.",
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


async def openapi_document(request: Request) -> Response:
    return JSONResponse(DOCUMENT)


routes = [Route("/openapi.json", openapi_document, methods=["GET"])]
operations: Operations = {
    openapi_document: operation(
        "This document",
        {
            "200": {
                "description": "OpenAPI 3.1",
                "content": {JSON_MEDIA_TYPE: {"schema": {"type": "object"}}},
            }
        },
    )
}

# Each module declares its operations' entries beside its routes.
PATHS = path_items(
    (auth.routes, auth.operations),
    (sessions.routes, sessions.operations),
    (audit.routes, audit.operations),
    (password_reset.routes, password_reset.operations),
    (email_verification.routes, email_verification.operations),
    (admin.routes, admin.operations),
    (health.routes, health.operations),
    (metrics.routes, metrics.operations),
    (routes, operations),
    (docs.described_routes, docs.operations),
)

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
            },
            "ContentTypeOptions": {
                "description": "On every answer: take the body as its Content-Type says.",
                "schema": {"const": CONTENT_TYPE_OPTIONS},
            },
            "CacheControl": {
                "description": "On every answer under /auth/ and /admin/ (tokens, personal data).",
                "schema": {"const": CACHE_CONTROL},
            },
            "DocsContentSecurityPolicy": {
                "description": "What the docs page may load: only SPARC's own files.",
                "schema": {"const": docs.CONTENT_SECURITY_POLICY},
            },
            "RequestId": {
                "description": "On every answer: the request's id. The request's own "
                f"X-Request-ID when it is at most {REQUEST_ID_MAX_LENGTH} letters, digits and "
                "`-_.:`, else a new one; every log line of the request and every problem "
                "document (`request_id`) carry it.",
                "schema": _REQUEST_ID,
            },
        },
    },
}
