"""Email verification: the mailed token that shows an address belongs to the account holder.

- Registering queues a verification mail (`queue_verification`), valid SPARC_EMAIL_VERIFY_TTL.
- `POST /auth/verify-email {token}` marks the address verified (`users.email_verified_at`):
  204; an unknown, expired or used token gets one 400.
- `POST /auth/verify-email/resend` (bearer token) queues a new mail, whose token replaces the
  earlier ones: 202; within RESEND_COOLDOWN seconds of the last one, 429 with Retry-After; 409
  once the address is verified.
- With SPARC_REQUIRE_VERIFIED_EMAIL, login refuses an unverified address (sparc.auth).
"""

from __future__ import annotations

import math
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sparc import account_tokens, audit, outbox
from sparc.database import get_db_client, retry_on_conflict
from sparc.identity import current_user
from sparc.openapi_parts import NO_CONTENT, Operations, json_answer, operation, problem_answer
from sparc.payloads import FieldErrors, read_json_object
from sparc.problems import Problem
from sparc.settings import Settings
from sparc.state import settings_of

RESEND_COOLDOWN = 60.0
QUEUED = {"detail": "A mail with a verification link is on its way."}
BAD_TOKEN = "The verification token is unknown, expired or already used."


async def queue_verification(user_id: uuid.UUID, email: str, settings: Settings) -> None:
    """Issue a verification token for the account and queue the mail that carries it."""
    token = await account_tokens.issue(
        user_id, account_tokens.VERIFY_EMAIL, lifetime=settings.email_verify_ttl
    )
    await outbox.send(
        to=email, template=outbox.VERIFY_EMAIL, context={"token": token}, user_id=user_id
    )


@retry_on_conflict
async def verify_email(request: Request) -> Response:
    body = await read_json_object(request)
    errors = FieldErrors()
    token = errors.string(body, "token", min_length=1, max_length=account_tokens.TOKEN_MAX_LENGTH)
    errors.raise_if_any()
    user_id = await account_tokens.use(token, account_tokens.VERIFY_EMAIL)
    if user_id is None:
        raise Problem(400, BAD_TOKEN)
    await get_db_client().execute(
        "UPDATE users SET email_verified_at = coalesce(email_verified_at, now()) WHERE id = :id",
        {"id": user_id},
    )
    await account_tokens.revoke(user_id, account_tokens.VERIFY_EMAIL)
    await audit.record("email_verified", request, user_id=user_id)
    return Response(status_code=204)


@retry_on_conflict
async def resend_verification(request: Request) -> Response:
    user = current_user(request)
    if user.email_verified:
        raise Problem(409, "Your email address is already verified.")
    ages = await outbox.seconds_since_last(user.id, outbox.VERIFY_EMAIL, within=RESEND_COOLDOWN)
    if ages:
        retry_after = max(1, math.ceil(RESEND_COOLDOWN - ages[0]))
        raise Problem(
            429,
            f"A verification mail was sent moments ago: try again in {retry_after} seconds.",
            headers={"Retry-After": str(retry_after)},
        )
    await queue_verification(user.id, user.email, settings_of(request))
    return JSONResponse(QUEUED, status_code=202)


routes = [
    Route("/auth/verify-email", verify_email, methods=["POST"]),
    Route("/auth/verify-email/resend", resend_verification, methods=["POST"]),
]
operations: Operations = {
    verify_email: operation(
        "Verify the account's email address with a mailed token",
        {
            "204": NO_CONTENT,
            "400": problem_answer(
                "The token is unknown, expired or already used, or the body is not JSON."
            ),
        },
        body="EmailVerification",
    ),
    resend_verification: operation(
        "Mail a new verification link to the caller",
        {
            "202": json_answer("Accepted", "The mail is queued."),
            "409": problem_answer("The caller's address is already verified."),
            "429": problem_answer(
                f"A verification mail was queued within {RESEND_COOLDOWN:g} s; retry after "
                "`Retry-After` s.",
                retry_after=True,
            ),
        },
        secured=True,
    ),
}
