"""Login throttling: per account and per client IP, counted in PostgreSQL so every worker agrees."""

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


def ip_key(ip: str | None) -> str | None:
    return f"ip:{ip}" if ip else None


class LoginThrottle:
    """After `max_failures` failed logins within `window`, a key is locked for the window,
    doubling with each repeated lockout. Keys: the account (by email) and the client IP."""

    def __init__(self, *, max_failures: int, ip_max_failures: int, window: float) -> None:
        self.max_failures = max_failures
        self.ip_max_failures = ip_max_failures
        self.window = timedelta(seconds=window)

    def _keys(self, email: str, ip: str | None) -> list[tuple[str, int]]:
        keys = [(account_key(email), self.max_failures)]
        ip_throttle_key = ip_key(ip)
        if ip_throttle_key is not None:
            keys.append((ip_throttle_key, self.ip_max_failures))
        return keys

    async def retry_after(self, email: str, ip: str | None) -> int | None:
        """Seconds until a login for `email` from `ip` may be tried again; None if it may now."""
        remaining = await get_db_client().fetch_val(
            """
            SELECT extract(epoch FROM max(locked_until) - now()) FROM login_throttles
            WHERE key = ANY(:keys) AND locked_until > now()
            """,
            {"keys": [key for key, _ in self._keys(email, ip)]},
        )
        return None if remaining is None else max(1, math.ceil(remaining))

    async def record_failure(self, email: str, ip: str | None) -> None:
        db = get_db_client()
        for key, limit in self._keys(email, ip):
            # One atomic upsert per key, so concurrent failures are all counted.
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
                {
                    "key": key,
                    "window": self.window,
                    "doublings": MAX_LOCKOUT_DOUBLINGS,
                    "limit": limit,
                },
            )

    async def forget_account(self, email: str) -> None:
        """A successful login clears the account's failures and lockouts (not the IP's)."""
        await get_db_client().execute(
            "DELETE FROM login_throttles WHERE key = :key", {"key": account_key(email)}
        )
