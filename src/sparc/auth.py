"""The auth API: register, log in, who am I, log out; every query through get_db_client()."""

from __future__ import annotations

import re
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
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc.database import UniqueViolation, get_db_client
from sparc.payloads import FieldErrors, read_json_object
from sparc.problems import Problem, problem_response
from sparc.security import PasswordHasher, hash_token, new_token

TOKEN_LIFETIME = timedelta(hours=12)
PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_LENGTH = 256
EMAIL_MAX_LENGTH = 254
_EMAIL_SHAPE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_BEARER = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True, slots=True)
class AuthenticatedUser(BaseUser):
    id: uuid.UUID
    email: str
    created_at: datetime
    session_id: uuid.UUID

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
    """Finds the session of an `Authorization: Bearer <token>` header.

    The lookup is one read on the request's connection that opens no transaction, so an
    endpoint that queries nothing itself (GET /auth/me) costs no BEGIN/COMMIT.
    """

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        header = conn.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise AuthenticationError("The Authorization header must be 'Bearer <token>'.")
        row = await get_db_client().fetch_one_before_transaction(
            """
            SELECT s.id AS session_id, u.id, u.email, u.created_at
            FROM sessions s JOIN users u ON u.id = s.user_id
            WHERE s.token_hash = :token_hash AND s.expires_at > now()
            """,
            {"token_hash": hash_token(token)},
        )
        if row is None:
            return None
        user = AuthenticatedUser(
            id=row["id"],
            email=row["email"],
            created_at=row["created_at"],
            session_id=row["session_id"],
        )
        return AuthCredentials(["authenticated"]), user


def authentication_failed(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    return problem_response(401, str(exc), headers=_BEARER)


def _current_user(request: Request) -> AuthenticatedUser:
    user = request.user
    if not isinstance(user, AuthenticatedUser):
        raise Problem(401, "A valid bearer token is required.", headers=_BEARER)
    return user


def _hasher(request: Request) -> PasswordHasher:
    hasher: PasswordHasher = request.app.state.password_hasher
    return hasher


async def _credentials(request: Request, *, new_password: bool) -> tuple[str, str]:
    body = await read_json_object(request)
    errors = FieldErrors()
    email = errors.string(body, "email", min_length=3, max_length=EMAIL_MAX_LENGTH).strip()
    if email and not errors.errors and not _EMAIL_SHAPE.match(email):
        errors.add("email", "is not an email address")
    minimum = PASSWORD_MIN_LENGTH if new_password else 1
    password = errors.string(body, "password", min_length=minimum, max_length=PASSWORD_MAX_LENGTH)
    errors.raise_if_any()
    return email, password


async def register(request: Request) -> Response:
    email, password = await _credentials(request, new_password=True)
    # Hash before the first query: the request holds no pooled connection while it burns CPU.
    password_hash = await _hasher(request).hash(password)
    try:
        row = await get_db_client().fetch_one(
            """
            INSERT INTO users (email, password_hash) VALUES (:email, :password_hash)
            ON CONFLICT ((lower(email))) DO NOTHING
            RETURNING id, email
            """,
            {"email": email, "password_hash": password_hash},
        )
    except UniqueViolation:
        row = None
    if row is None:
        raise Problem(409, "An account with this email already exists.")
    return JSONResponse({"id": str(row["id"]), "email": row["email"]}, status_code=201)


async def login(request: Request) -> Response:
    email, password = await _credentials(request, new_password=False)
    db = get_db_client()
    hasher = _hasher(request)
    # Take the hashing slot before the connection, so logins queued for CPU hold no connection.
    async with hasher.slot():
        user = await db.fetch_one(
            "SELECT id, password_hash FROM users WHERE lower(email) = lower(:email)",
            {"email": email},
        )
        # Unknown email and wrong password cost the same work and get the same answer.
        valid = await hasher.verify(user["password_hash"] if user else None, password)
    if user is None or not valid:
        raise Problem(401, "The email or password is wrong.", headers=_BEARER)
    token, token_hash = new_token()
    expires_at = await db.fetch_val(
        """
        INSERT INTO sessions (user_id, token_hash, expires_at, user_agent, ip)
        VALUES (:user_id, :token_hash, now() + CAST(:lifetime AS interval), :user_agent, :ip)
        RETURNING expires_at
        """,
        {
            "user_id": user["id"],
            "token_hash": token_hash,
            "lifetime": TOKEN_LIFETIME,
            "user_agent": request.headers.get("user-agent", "")[:512] or None,
            "ip": request.client.host if request.client else None,
        },
    )
    return JSONResponse(
        {"access_token": token, "token_type": "bearer", "expires_at": expires_at.isoformat()},
        headers={"Cache-Control": "no-store"},
    )


async def me(request: Request) -> Response:
    user = _current_user(request)
    return JSONResponse(
        {"id": str(user.id), "email": user.email, "created_at": user.created_at.isoformat()}
    )


async def logout(request: Request) -> Response:
    user = _current_user(request)
    await get_db_client().execute("DELETE FROM sessions WHERE id = :id", {"id": user.session_id})
    return Response(status_code=204)


routes = [
    Route("/auth/register", register, methods=["POST"]),
    Route("/auth/login", login, methods=["POST"]),
    Route("/auth/me", me, methods=["GET"]),
    Route("/auth/logout", logout, methods=["POST"]),
]
