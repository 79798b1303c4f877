"""The account endpoints: register, log in, who am I, log out, change password."""

from __future__ import annotations

import re
from datetime import timedelta

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc import account_tokens, accounts, audit, outbox
from sparc.clients import client_ip, client_user_agent
from sparc.common_passwords import is_common
from sparc.database import get_db_client, retry_on_conflict
from sparc.email_verification import queue_verification
from sparc.identity import BEARER_CHALLENGE, AuthenticatedUser, current_user, disabled_now
from sparc.openapi_parts import NO_CONTENT, Operations, json_answer, operation, problem_answer
from sparc.payloads import FieldErrors, read_json_object
from sparc.problems import Problem
from sparc.security import new_token
from sparc.state import login_throttle_of, password_hasher_of, settings_of

PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_LENGTH = 256
# A password being checked (at login, or the current one) only needs to be there: it is bounded
# by PASSWORD_MAX_LENGTH alone, so nobody can make us hash megabytes.
GIVEN_PASSWORD_MIN_LENGTH = 1
EMAIL_MAX_LENGTH = 254
# What a 422 says of a new password on the list of sparc.common_passwords.
TOO_COMMON = "is too common: it is on a list of passwords attackers try first"
# No control characters either: an address never holds one, and it is shown back and compared.
_EMAIL_PART = r"[^@\s\x00-\x1f\x7f]+"
_EMAIL_SHAPE = re.compile(rf"^{_EMAIL_PART}@{_EMAIL_PART}\.{_EMAIL_PART}$")


def _check_email(errors: FieldErrors, body: dict[str, object]) -> str:
    email = errors.string(body, "email", min_length=3, max_length=EMAIL_MAX_LENGTH).strip()
    if email and not errors.has("email") and not _EMAIL_SHAPE.match(email):
        errors.add("email", "is not an email address")
    return email


def check_new_password(errors: FieldErrors, body: dict[str, object], field: str) -> str:
    """A password being set (register, change): the length bounds, and not a common one."""
    password = errors.string(
        body, field, min_length=PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH
    )
    if not errors.has(field) and is_common(password):
        errors.add(field, TOO_COMMON)
    return password


def _check_given_password(errors: FieldErrors, body: dict[str, object], field: str) -> str:
    return errors.string(
        body, field, min_length=GIVEN_PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH
    )


def registration_fields(body: dict[str, object]) -> tuple[str, str]:
    """The email and password of a new account (POST /auth/register, `sparc users create`), or a
    422 problem listing what is wrong with them."""
    errors = FieldErrors()
    email = _check_email(errors, body)
    password = check_new_password(errors, body, "password")
    errors.raise_if_any()
    return email, password


def _throttled(retry_after: int) -> Problem:
    return Problem(
        429,
        f"Too many failed logins: try again in {retry_after} seconds.",
        headers={"Retry-After": str(retry_after)},
    )


@retry_on_conflict
async def register(request: Request) -> Response:
    email, password = registration_fields(await read_json_object(request))
    db = get_db_client()
    hasher, throttle = password_hasher_of(request), login_throttle_of(request)
    ip = client_ip(request)
    # Take the hashing slot before the first query, so registrations queued for CPU hold no
    # connection; check the address's count before paying for a hash.
    async with hasher.slot():
        retry_after = await throttle.registration_retry_after(ip)
        if retry_after is not None:
            raise Problem(
                429,
                f"Too many registrations from your address: try again in {retry_after} seconds.",
                headers={"Retry-After": str(retry_after)},
            )
        password_hash = await hasher.hash(password)
    await throttle.record_registration(ip)
    row = await accounts.create_account(email, password_hash)
    if row is None:
        db.keep_writes()  # the registration still counts against the address
        raise Problem(409, "An account with this email already exists.")
    await audit.record("register", request, user_id=row["id"])
    await queue_verification(row["id"], row["email"], settings_of(request))
    return JSONResponse({"id": str(row["id"]), "email": row["email"]}, status_code=201)


@retry_on_conflict
async def login(request: Request) -> Response:
    body = await read_json_object(request)
    errors = FieldErrors()
    email = errors.string(body, "email", min_length=1, max_length=EMAIL_MAX_LENGTH).strip()
    password = _check_given_password(errors, body, "password")
    errors.raise_if_any()
    db = get_db_client()
    hasher, throttle = password_hasher_of(request), login_throttle_of(request)
    ip = client_ip(request)
    # Take the hashing slot before the first query, so logins queued for CPU hold no connection.
    async with hasher.slot():
        retry_after = await throttle.retry_after(email, ip)
        if retry_after is not None:
            await audit.record("login_throttled", request, email=email)
            db.keep_writes()
            raise _throttled(retry_after)
        user = await db.fetch_one(
            "SELECT id, password_hash, email_verified_at FROM users "
            "WHERE lower(email) = lower(:email)",
            {"email": email},
        )
        # Unknown email and wrong password cost the same work and get the same answer.
        valid = await hasher.verify(user["password_hash"] if user else None, password)
        rehashed = (
            await hasher.hash(password)
            if user is not None and valid and hasher.needs_rehash(user["password_hash"])
            else None
        )
    if user is None or not valid:
        await throttle.record_failure(email, ip)
        await audit.record(
            "login_failed",
            request,
            user_id=user["id"] if user else None,
            email=None if user else email,
        )
        db.keep_writes()  # the failure counts and the audit entry outlive the 401
        raise Problem(401, "The email or password is wrong.", headers=BEARER_CHALLENGE)

    await throttle.forget_failures(email, ip)
    # The row lock this takes orders the login against a disable: one waiting for the other, a
    # login either sees the account disabled here or commits its session before the disable
    # revokes every session of the account. Logins do not lock the row while they hash.
    enabled = await db.fetch_val(
        f"""
        UPDATE users SET last_login_at = now(),
                         password_hash = coalesce(:password_hash, password_hash)
        WHERE id = :id AND NOT {disabled_now()}
        RETURNING id
        """,
        {"password_hash": rehashed, "id": user["id"]},
    )
    if enabled is None:
        # Only to the right password: a guesser gets the 401 above, disabled or not.
        await audit.record("login_refused_disabled", request, user_id=user["id"])
        db.keep_writes()
        raise Problem(403, "This account is disabled.", title="Account disabled")
    # Only after the right password: a 403 for a wrong one would tell who has an account.
    if settings_of(request).require_verified_email and user["email_verified_at"] is None:
        raise Problem(
            403,
            "Verify your email first: open the link in the mail we sent. If it is lost or "
            "expired, reset your password (POST /auth/password-reset): that verifies it too.",
        )
    token, token_hash = new_token()
    expires_at = await db.fetch_val(
        """
        INSERT INTO sessions (user_id, token_hash, expires_at, user_agent, ip)
        VALUES (:user_id, :token_hash, now() + CAST(:lifetime AS interval), :user_agent,
                CAST(:ip AS inet))
        RETURNING expires_at
        """,
        {
            "user_id": user["id"],
            "token_hash": token_hash,
            "lifetime": timedelta(seconds=settings_of(request).token_ttl),
            "user_agent": client_user_agent(request),
            "ip": ip,
        },
    )
    await audit.record("login_succeeded", request, user_id=user["id"])
    # Cache-Control: no-store, as on every /auth/ answer (sparc.headers).
    return JSONResponse(
        {"access_token": token, "token_type": "bearer", "expires_at": expires_at.isoformat()}
    )


async def me(request: Request) -> Response:
    user = current_user(request)
    return JSONResponse(
        {
            "id": str(user.id),
            "email": user.email,
            "email_verified": user.email_verified,
            "created_at": user.created_at.isoformat(),
        }
    )


@retry_on_conflict
async def logout(request: Request) -> Response:
    user = current_user(request)
    await get_db_client().execute("DELETE FROM sessions WHERE id = :id", {"id": user.session_id})
    await audit.record("logout", request, user_id=user.id)
    return Response(status_code=204)


async def _reentered_password(
    request: Request,
    user: AuthenticatedUser,
    password: str,
    *,
    wrong: str,
    then_hash: str | None = None,
) -> str | None:
    """Check the caller's password, throttled like a login; a 401 problem saying `wrong` if it
    is not theirs. With `then_hash`, that password's hash (made in the same hashing slot)."""
    db = get_db_client()
    hasher, throttle = password_hasher_of(request), login_throttle_of(request)
    ip = client_ip(request)
    async with hasher.slot():
        # A stolen token must not turn into unlimited password guesses.
        retry_after = await throttle.retry_after(user.email, ip)
        if retry_after is not None:
            raise _throttled(retry_after)
        stored = await db.fetch_val(
            "SELECT password_hash FROM users WHERE id = :id", {"id": user.id}
        )
        valid = await hasher.verify(stored, password)
        new_hash = await hasher.hash(then_hash) if valid and then_hash is not None else None
    if not valid:
        await throttle.record_failure(user.email, ip)
        db.keep_writes()
        raise Problem(401, wrong)
    return new_hash


@retry_on_conflict
async def change_password(request: Request) -> Response:
    """Set a new password; every other session of the user ends, this one stays."""
    user = current_user(request)
    body = await read_json_object(request)
    errors = FieldErrors()
    current = _check_given_password(errors, body, "current_password")
    new = check_new_password(errors, body, "new_password")
    errors.raise_if_any()
    db = get_db_client()
    new_hash = await _reentered_password(
        request, user, current, wrong="The current password is wrong.", then_hash=new
    )
    await db.execute(
        "UPDATE users SET password_hash = :password_hash WHERE id = :id",
        {"password_hash": new_hash, "id": user.id},
    )
    await db.execute(
        "DELETE FROM sessions WHERE user_id = :user_id AND id <> :session_id",
        {"user_id": user.id, "session_id": user.session_id},
    )
    # A reset link mailed before the change must not undo it.
    await account_tokens.revoke(user.id, account_tokens.PASSWORD_RESET)
    await audit.record("password_changed", request, user_id=user.id)
    await outbox.send(to=user.email, template=outbox.PASSWORD_CHANGED, context={}, user_id=user.id)
    return Response(status_code=204)


@retry_on_conflict
async def erase_me(request: Request) -> Response:
    """Erase the caller's account (sparc.accounts.erase) once they re-enter their password."""
    user = current_user(request)
    body = await read_json_object(request)
    errors = FieldErrors()
    password = _check_given_password(errors, body, "password")
    errors.raise_if_any()
    await _reentered_password(request, user, password, wrong="The password is wrong.")
    await accounts.erase(user.id, accounts.Actor(request))
    return Response(status_code=204)


# The POST endpoints are marked retry_on_conflict: all they change is in their transaction, so a
# run that lost a race to another transaction can safely run again.
routes = [
    Route("/auth/register", register, methods=["POST"]),
    Route("/auth/login", login, methods=["POST"]),
    Route("/auth/me", me, methods=["GET"]),
    Route("/auth/me", erase_me, methods=["DELETE"]),
    Route("/auth/logout", logout, methods=["POST"]),
    Route("/auth/password", change_password, methods=["POST"]),
]
_THROTTLED = {
    "429": problem_answer("Too many failed logins; retry after `Retry-After` s.", retry_after=True)
}
operations: Operations = {
    register: operation(
        "Create an account",
        {
            "201": json_answer("Account", "The account was created."),
            "409": problem_answer("An account with this email (in any letter case) exists."),
            "429": problem_answer(
                "Too many registrations from this address; retry after `Retry-After` s.",
                retry_after=True,
            ),
        },
        body="Registration",
    ),
    login: operation(
        "Log in and get a bearer token",
        {
            "200": json_answer("Token", "A new session's token (shown only this once)."),
            "401": problem_answer("Wrong email or password (the same answer for both)."),
            "403": problem_answer(
                "The password is right, but the account is disabled, or its email is not "
                "verified yet (only with SPARC_REQUIRE_VERIFIED_EMAIL=true)."
            ),
            **_THROTTLED,
        },
        body="Credentials",
    ),
    me: operation("The caller's account", {"200": json_answer("Me", "The caller.")}, secured=True),
    erase_me: operation(
        "Erase the caller's account, after re-entering its password",
        {
            "204": NO_CONTENT,
            "401": problem_answer("No valid bearer token, or the password is wrong."),
            **_THROTTLED,
        },
        body="Erasure",
        secured=True,
    ),
    logout: operation("End this session", {"204": NO_CONTENT}, secured=True),
    change_password: operation(
        "Change the password; every other session ends",
        {"204": NO_CONTENT, **_THROTTLED},
        body="PasswordChange",
        secured=True,
    ),
}
