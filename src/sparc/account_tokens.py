"""Single-use tokens mailed to an account (password reset, email verification).

A token is 32 random bytes (sparc.security.new_token); only its SHA-256 is stored, with its
purpose, account and expiry. Issuing one revokes the account's earlier tokens of that purpose,
and using one deletes it, so each works once and only the newest works at all.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sparc.database import get_db_client
from sparc.security import hash_token, new_token

PASSWORD_RESET = "password_reset"
VERIFY_EMAIL = "verify_email"
# A token a client hands back is at most this long (ours are 43 characters): longer is refused
# unread, so nobody makes us hash megabytes.
TOKEN_MAX_LENGTH = 256


async def issue(user_id: uuid.UUID, purpose: str, *, lifetime: float) -> str:
    """A new token of `purpose` for the account, valid for `lifetime` seconds; the account's
    earlier ones of that purpose stop working."""
    token, token_hash = new_token()
    await revoke(user_id, purpose)
    await get_db_client().execute(
        """
        INSERT INTO account_tokens (token_hash, user_id, purpose, expires_at)
        VALUES (:token_hash, :user_id, :purpose, now() + CAST(:lifetime AS interval))
        """,
        {
            "token_hash": token_hash,
            "user_id": user_id,
            "purpose": purpose,
            "lifetime": timedelta(seconds=lifetime),
        },
    )
    return token


async def use(token: str, purpose: str) -> uuid.UUID | None:
    """Spend `token`: the account it was issued to, or None if it is unknown, of another
    purpose, expired or already used. Deleting it is what spends it, so of two requests racing
    with one token only one gets the account."""
    row = await get_db_client().fetch_one(
        """
        DELETE FROM account_tokens WHERE token_hash = :token_hash AND purpose = :purpose
        RETURNING user_id, expires_at > now() AS live
        """,
        {"token_hash": hash_token(token), "purpose": purpose},
    )
    if row is None or not row["live"]:
        return None
    user_id: uuid.UUID = row["user_id"]
    return user_id


async def revoke(user_id: uuid.UUID, purpose: str) -> None:
    """No token of `purpose` issued to the account works any more."""
    await get_db_client().execute(
        "DELETE FROM account_tokens WHERE user_id = :user_id AND purpose = :purpose",
        {"user_id": user_id, "purpose": purpose},
    )
