"""Password hashing off the event loop, bounded; tokens stored only as digests."""

from __future__ import annotations

import hashlib
import threading

import anyio
import pytest
from argon2 import PasswordHasher as Argon2Hasher

from sparc.security import PasswordHasher, hash_token, new_token

pytestmark = pytest.mark.anyio


async def test_hash_and_verify_round_trip() -> None:
    hasher = PasswordHasher()
    stored = await hasher.hash("correct horse")
    assert stored.startswith("$argon2id$")
    assert await hasher.verify(stored, "correct horse")
    assert not await hasher.verify(stored, "wrong horse")
    assert not await hasher.verify("not a hash", "correct horse")


async def test_hashing_runs_in_worker_threads_at_most_n_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hasher = PasswordHasher(max_concurrency=2)
    loop_thread = threading.get_ident()
    running = 0
    peak = 0
    threads: set[int] = set()
    lock = threading.Lock()
    real_hash = Argon2Hasher.hash

    def observed_hash(self: Argon2Hasher, password: str) -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        try:
            return real_hash(self, password)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(Argon2Hasher, "hash", observed_hash)
    async with anyio.create_task_group() as group:
        for n in range(6):
            group.start_soon(hasher.hash, f"password {n}")
    assert peak == 2
    assert loop_thread not in threads


async def test_slot_is_reentrant_so_login_can_hold_it_across_verify() -> None:
    hasher = PasswordHasher(max_concurrency=1)
    with anyio.fail_after(10):
        async with hasher.slot():
            stored = await hasher.hash("inside the slot")
            assert await hasher.verify(stored, "inside the slot")


async def test_verify_without_a_stored_hash_does_the_same_work_and_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hasher = PasswordHasher()
    verified: list[str] = []
    real_verify = Argon2Hasher.verify

    def counting_verify(self: Argon2Hasher, stored: str, password: str) -> bool:
        verified.append(stored)
        return real_verify(self, stored, password)

    monkeypatch.setattr(Argon2Hasher, "verify", counting_verify)
    assert not await hasher.verify(None, "anything")
    assert len(verified) == 1 and verified[0].startswith("$argon2id$")


def test_tokens_are_32_random_bytes_stored_as_sha256() -> None:
    token, digest = new_token()
    assert len(token) == 43  # 32 bytes in unpadded base64url
    assert digest == hashlib.sha256(token.encode()).digest() == hash_token(token)
    assert new_token()[0] != token
