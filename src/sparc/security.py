"""Security primitives: Argon2id hashes off the event loop, bearer tokens, email digests."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import secrets
from collections.abc import AsyncIterator
from contextvars import ContextVar

import anyio
import anyio.to_thread
from argon2 import PasswordHasher as Argon2Hasher
from argon2.exceptions import InvalidHashError, VerificationError

from sparc.settings import Settings

TOKEN_BYTES = 32
# token_urlsafe writes TOKEN_BYTES as base64 without padding: 4 characters for every 3 bytes.
TOKEN_LENGTH = math.ceil(TOKEN_BYTES * 4 / 3)

_holding_slot: ContextVar[bool] = ContextVar("sparc_holding_hash_slot", default=False)


class PasswordHasher:
    """Argon2id in worker threads, at most `max_concurrency` hashes at once.

    A hash costs tens of milliseconds of CPU; bounding how many run at once keeps a burst of
    logins from starving every other request of CPU.
    """

    def __init__(
        self,
        *,
        time_cost: int = 2,
        memory_kib: int = 19 * 1024,
        parallelism: int = 1,
        max_concurrency: int | None = None,
    ) -> None:
        self._argon2 = Argon2Hasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism
        )
        self._limiter = anyio.CapacityLimiter(max_concurrency or os.cpu_count() or 1)
        self._dummy_hash: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PasswordHasher:
        return cls(
            time_cost=settings.argon2_time_cost,
            memory_kib=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            max_concurrency=settings.hash_concurrency,
        )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Reserve a hashing slot for a whole block (hash/verify inside reuse it).

        Login takes the slot before its first query, so requests queued for CPU do not also
        sit on pooled database connections.
        """
        if _holding_slot.get():
            yield
            return
        async with self._limiter:
            token = _holding_slot.set(True)
            try:
                yield
            finally:
                _holding_slot.reset(token)

    async def hash(self, password: str) -> str:
        async with self.slot():
            return await anyio.to_thread.run_sync(self._argon2.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Check `password`; with no stored hash, burn the same time on a dummy and fail."""
        async with self.slot():
            if password_hash is None:
                if self._dummy_hash is None:
                    self._dummy_hash = await anyio.to_thread.run_sync(
                        self._argon2.hash, secrets.token_urlsafe(16)
                    )
                password_hash, password = self._dummy_hash, password + "\x00"
            try:
                return await anyio.to_thread.run_sync(self._argon2.verify, password_hash, password)
            except (VerificationError, InvalidHashError):
                return False

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash was made with other parameters than the current settings."""
        try:
            return self._argon2.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True


def new_token() -> tuple[str, bytes]:
    """A fresh bearer token and the SHA-256 digest that is all the database ever stores."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, hash_token(token)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def email_digest(email: str) -> bytes:
    """How an email is named where the address itself must not be kept (the audit log, the login
    throttle): the same for every letter case and surrounding space."""
    return hashlib.sha256(email.strip().lower().encode()).digest()
