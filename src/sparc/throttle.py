"""Throttling of logins and registrations, counted in PostgreSQL so every worker agrees.

Failed logins are counted three ways, each in its own row, and a login is refused while any of
them is locked:
- per (email, client address), locked after SPARC_LOGIN_MAX_FAILURES: the guesser is stopped,
  but a victim who knows the password logs in from their own address all the same;
- per account across all addresses, locked after SPARC_LOGIN_ACCOUNT_MAX_FAILURES: slows
  guessing spread over many addresses, far above what a few requests can reach;
- per client address across accounts, locked after SPARC_LOGIN_IP_MAX_FAILURES: a spray.
Registrations are counted per client address (SPARC_REGISTRATION_IP_MAX), and so are password
reset requests (SPARC_PASSWORD_RESET_IP_MAX). A lock lasts one window, doubling with each
repeated lockout of the same row.
"""

from __future__ import annotations

import math
from datetime import timedelta

from sparc.database import get_db_client
from sparc.security import email_digest

# Each lockout of the same key lasts twice as long as the one before, up to 2**6 windows.
MAX_LOCKOUT_DOUBLINGS = 6


def account_key(email: str) -> str:
    # Keyed by the email, not the account: unknown emails are throttled exactly like real ones.
    return "account:" + email_digest(email).hex()


def login_key(email: str, ip: str | None) -> str:
    return f"login:{email_digest(email).hex()}:{ip or ''}"


def email_keys(email: str) -> list[str]:
    """LIKE patterns of every row keyed by `email`, whatever the address (for an erasure)."""
    digest = email_digest(email).hex()
    return [f"account:{digest}", f"login:{digest}:%"]


def ip_key(ip: str | None) -> str | None:
    return f"ip:{ip}" if ip else None


def registration_key(ip: str | None) -> str | None:
    return f"register:{ip}" if ip else None


def password_reset_key(ip: str | None) -> str | None:
    return f"reset:{ip}" if ip else None


class LoginThrottle:
    """The limits, and the queries that count against them and look them up."""

    def __init__(
        self,
        *,
        max_failures: int,
        ip_max_failures: int,
        window: float,
        account_max_failures: int = 100,
        registration_ip_max: int = 20,
        password_reset_ip_max: int = 20,
    ) -> None:
        self.max_failures = max_failures
        self.account_max_failures = account_max_failures
        self.ip_max_failures = ip_max_failures
        self.registration_ip_max = registration_ip_max
        self.password_reset_ip_max = password_reset_ip_max
        self.window = timedelta(seconds=window)

    def _login_keys(self, email: str, ip: str | None) -> list[tuple[str, int]]:
        keys = [
            (login_key(email, ip), self.max_failures),
            (account_key(email), self.account_max_failures),
        ]
        ip_throttle_key = ip_key(ip)
        if ip_throttle_key is not None:
            keys.append((ip_throttle_key, self.ip_max_failures))
        return keys

    async def retry_after(self, email: str, ip: str | None) -> int | None:
        """Seconds until a login for `email` from `ip` may be tried again; None if it may now."""
        return await _retry_after([key for key, _ in self._login_keys(email, ip)])

    async def record_failure(self, email: str, ip: str | None) -> None:
        for key, limit in self._login_keys(email, ip):
            await self._count(key, limit)

    async def forget_failures(self, email: str, ip: str | None) -> None:
        """A successful login clears that email's failures from that address (not the
        account-wide count, which only the window clears, nor the address's own)."""
        await get_db_client().execute(
            "DELETE FROM login_throttles WHERE key = :key", {"key": login_key(email, ip)}
        )

    async def registration_retry_after(self, ip: str | None) -> int | None:
        """Seconds until `ip` may register again; None if it may now."""
        key = registration_key(ip)
        return None if key is None else await _retry_after([key])

    async def record_registration(self, ip: str | None) -> None:
        key = registration_key(ip)
        if key is not None:
            await self._count(key, self.registration_ip_max)

    async def password_reset_retry_after(self, ip: str | None) -> int | None:
        """Seconds until `ip` may ask for a password reset again; None if it may now."""
        key = password_reset_key(ip)
        return None if key is None else await _retry_after([key])

    async def record_password_reset(self, ip: str | None) -> None:
        key = password_reset_key(ip)
        if key is not None:
            await self._count(key, self.password_reset_ip_max)

    async def forget_account(self, email: str) -> None:
        """A password reset clears the account's lockouts: its own, and that email's from
        every address (not the addresses' own, which are about the address)."""
        await get_db_client().execute(
            "DELETE FROM login_throttles WHERE key = :account OR starts_with(key, :logins)",
            {"account": account_key(email), "logins": login_key(email, None)},
        )

    async def _count(self, key: str, limit: int) -> None:
        """One more against `key`; at `limit` within the window, lock it."""
        db = get_db_client()
        # One atomic upsert, so concurrent attempts are all counted.
        await db.execute(
            """
            INSERT INTO login_throttles AS t (key, failures, window_started_at)
            VALUES (:key, 1, now())
            ON CONFLICT (key) DO UPDATE SET
                failures = CASE
                    WHEN t.window_started_at < now() - CAST(:window AS interval) THEN 1
                    ELSE t.failures + 1
                END,
                window_started_at = CASE
                    WHEN t.window_started_at < now() - CAST(:window AS interval) THEN now()
                    ELSE t.window_started_at
                END,
                -- a full quiet window after a lockout forgives the earlier lockouts
                lockouts = CASE
                    WHEN t.locked_until < now() - CAST(:window AS interval) THEN 0
                    ELSE t.lockouts
                END
            """,
            {"key": key, "window": self.window},
        )
        await db.execute(
            """
            UPDATE login_throttles SET
                locked_until = now()
                    + CAST(:window AS interval) * power(2, least(lockouts, :doublings)),
                lockouts = lockouts + 1,
                failures = 0,
                window_started_at = now()
            WHERE key = :key AND failures >= :limit
            """,
            {"key": key, "window": self.window, "doublings": MAX_LOCKOUT_DOUBLINGS, "limit": limit},
        )


async def _retry_after(keys: list[str]) -> int | None:
    remaining = await get_db_client().fetch_val(
        """
        SELECT extract(epoch FROM max(locked_until) - now()) FROM login_throttles
        WHERE key = ANY(:keys) AND locked_until > now()
        """,
        {"keys": keys},
    )
    return None if remaining is None else max(1, math.ceil(remaining))
