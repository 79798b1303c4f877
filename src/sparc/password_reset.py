"""Password reset: ask for a mailed token, then set a new password with it.

- `POST /auth/password-reset {email}` answers 202 with the same body whatever the email, after
  the same single statement either way (no account enumeration, by answer or by timing): for a
  known account under its mail limits it issues a token and queues the mail in the outbox; for
  an unknown one the same statement writes nothing. The mail itself is built and sent by the
  delivery worker, after commit, not in the request.
- Limits: per account, at most MAX_PER_MINUTE reset mails a minute and MAX_PER_HOUR an hour
  (counted from the outbox, apart from other kinds of mail; over them the answer is the same
  202 and the earlier mail's token stays valid); per client address, SPARC_PASSWORD_RESET_IP_MAX
  requests per login window (429).
- `POST /auth/password-reset/confirm {token, new_password}` spends the token, sets the
  password, ends every session, clears the account's login lockouts, records `password_reset`
  and queues a "your password was changed" notice: 204. A bad token of any kind gets one 400.
  Only this POST spends a token: a GET of the mailed link (mail scanners follow links) cannot.
"""

from __future__ import annotations

import json
from datetime import timedelta

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc import account_tokens, audit, outbox
from sparc.auth import EMAIL_MAX_LENGTH, check_new_password
from sparc.clients import client_ip
from sparc.database import get_db_client, retry_on_conflict
from sparc.identity import disabled_now
from sparc.openapi_parts import NO_CONTENT, Operations, json_answer, operation, problem_answer
from sparc.payloads import FieldErrors, read_json_object
from sparc.problems import Problem
from sparc.security import new_token
from sparc.state import login_throttle_of, password_hasher_of, settings_of

MAX_PER_MINUTE = 1
MAX_PER_HOUR = 5
ACCEPTED = {
    "detail": "If an account has this email address, a mail with a reset link is on its way."
}
BAD_TOKEN = "The reset token is unknown, expired or already used."

# One statement for every request, known email or not: the account (if any), its reset mails of
# the last hour, and, only for an account under its limits, the revocation of its earlier
# tokens, the new token and the queued mail.
_REQUEST_RESET = f"""
WITH account AS (
    -- A disabled account gets no reset (the answer is the same 202): its password stays as
    -- the admin who disabled it found it.
    SELECT id, email FROM users WHERE lower(email) = lower(:email) AND NOT {disabled_now()}
), recent AS (
    SELECT count(*) FILTER (WHERE created_at > clock_timestamp() - interval '1 minute') AS minute,
           count(*) AS hour
    FROM mail_outbox
    WHERE user_id = (SELECT id FROM account) AND kind = '{outbox.PASSWORD_RESET}'
      AND created_at > clock_timestamp() - interval '1 hour'
), allowed AS (
    SELECT account.id, account.email FROM account, recent
    WHERE recent.minute < {MAX_PER_MINUTE} AND recent.hour < {MAX_PER_HOUR}
), revoked AS (
    DELETE FROM account_tokens
    WHERE user_id = (SELECT id FROM allowed) AND purpose = '{account_tokens.PASSWORD_RESET}'
), issued AS (
    INSERT INTO account_tokens (token_hash, user_id, purpose, expires_at)
    SELECT :token_hash, id, '{account_tokens.PASSWORD_RESET}',
           now() + CAST(:lifetime AS interval)
    FROM allowed
)
INSERT INTO mail_outbox (user_id, kind, recipient, context)
SELECT id, '{outbox.PASSWORD_RESET}', email, CAST(:context AS jsonb) FROM allowed
"""


@retry_on_conflict
async def request_reset(request: Request) -> Response:
    body = await read_json_object(request)
    errors = FieldErrors()
    email = errors.string(body, "email", min_length=1, max_length=EMAIL_MAX_LENGTH).strip()
    errors.raise_if_any()
    throttle, ip = login_throttle_of(request), client_ip(request)
    retry_after = await throttle.password_reset_retry_after(ip)
    if retry_after is not None:
        raise Problem(
            429,
            f"Too many password reset requests from your address: try again in "
            f"{retry_after} seconds.",
            headers={"Retry-After": str(retry_after)},
        )
    await throttle.record_password_reset(ip)
    token, token_hash = new_token()  # made for every request, used only for a known account
    await get_db_client().execute(
        _REQUEST_RESET,
        {
            "email": email,
            "token_hash": token_hash,
            "lifetime": timedelta(seconds=settings_of(request).password_reset_ttl),
            "context": json.dumps({"token": token}),
        },
    )
    return JSONResponse(ACCEPTED, status_code=202)


@retry_on_conflict
async def confirm_reset(request: Request) -> Response:
    body = await read_json_object(request)
    errors = FieldErrors()
    token = errors.string(body, "token", min_length=1, max_length=account_tokens.TOKEN_MAX_LENGTH)
    new_password = check_new_password(errors, body, "new_password")
    errors.raise_if_any()
    db = get_db_client()
    hasher = password_hasher_of(request)
    # The hashing slot first, so confirmations queued for CPU hold no connection.
    async with hasher.slot():
        user_id = await account_tokens.use(token, account_tokens.PASSWORD_RESET)
        if user_id is None:
            raise Problem(400, BAD_TOKEN)
        password_hash = await hasher.hash(new_password)
    # The token came to the address by mail: that proves the address as verification does.
    email: str | None = await db.fetch_val(
        f"""
        UPDATE users SET password_hash = :password_hash,
                         email_verified_at = coalesce(email_verified_at, now())
        WHERE id = :id AND NOT {disabled_now()} RETURNING email
        """,
        {"password_hash": password_hash, "id": user_id},
    )
    if email is None:  # disabled since the token was mailed
        raise Problem(400, BAD_TOKEN)
    await account_tokens.revoke(user_id, account_tokens.PASSWORD_RESET)
    await db.execute("DELETE FROM sessions WHERE user_id = :user_id", {"user_id": user_id})
    await login_throttle_of(request).forget_account(email)
    await audit.record("password_reset", request, user_id=user_id)
    await outbox.send(to=email, template=outbox.PASSWORD_CHANGED, context={}, user_id=user_id)
    return Response(status_code=204)


routes = [
    Route("/auth/password-reset", request_reset, methods=["POST"]),
    Route("/auth/password-reset/confirm", confirm_reset, methods=["POST"]),
]
operations: Operations = {
    request_reset: operation(
        "Ask for a password reset mail",
        {
            "202": json_answer(
                "Accepted", "The same answer whether or not an account has this address."
            ),
            "429": problem_answer(
                "Too many reset requests from this address; retry after `Retry-After` s.",
                retry_after=True,
            ),
        },
        body="PasswordResetRequest",
    ),
    confirm_reset: operation(
        "Set a new password with a mailed reset token; every session ends",
        {
            "204": NO_CONTENT,
            "400": problem_answer(
                "The token is unknown, expired or already used, or the body is not JSON."
            ),
        },
        body="PasswordResetConfirm",
    ),
}
