"""The pool's connection turns: first come, first served, each waiter bounded by DB_POOL_TIMEOUT.

All waiters share one timer (see sparc.database.turns.Turns); these tests pin down what that must
never change: nobody times out before their own DB_POOL_TIMEOUT is up, nobody long after it,
and a turn handed to a waiter that has just been cancelled is passed on, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from random import Random

import anyio
import httpx
import pytest

from sparc.database import DatabaseClient, DatabaseUnavailable
from sparc.database._asyncpg import due_for_recycling
from sparc.database.turns import Turns
from sparc.settings import Settings
from tests.conftest import poll_until, serving
from tests.dbapp import hold_connection, query_once, tiny_app

pytestmark = pytest.mark.anyio

POOL_TIMEOUT = 0.6
# Between the two waiters' arrivals: long enough that timing out at the first one's deadline
# would be caught, short enough that the second still waits while the first times out.
ARRIVAL_GAP = 0.3


async def test_each_waiter_times_out_at_its_own_deadline(database_url: str) -> None:
    settings = Settings(
        database_url=database_url, pool_min_size=0, pool_max_size=1, pool_timeout=POOL_TIMEOUT
    )
    holding, release = anyio.Event(), anyio.Event()
    app = tiny_app(settings, hold=hold_connection(holding, release), query=query_once)
    waited: dict[str, tuple[int, float]] = {}

    async def wait_for_a_connection(http: httpx.AsyncClient, name: str) -> None:
        started = time.monotonic()
        response = await http.get("/query")
        waited[name] = (response.status_code, time.monotonic() - started)

    async with serving(app) as http, anyio.create_task_group() as group:
        group.start_soon(http.get, "/hold")
        await holding.wait()
        group.start_soon(wait_for_a_connection, http, "first")
        await poll_until(lambda: app.state.client.pool_stats().waiting == 1)
        await anyio.sleep(ARRIVAL_GAP)  # the second arrives later on purpose, not to wait
        group.start_soon(wait_for_a_connection, http, "second")
        await poll_until(lambda: len(waited) == 2)
        release.set()
    for name, (status, seconds) in waited.items():
        assert status == 503, name
        assert POOL_TIMEOUT <= seconds < POOL_TIMEOUT + 0.5, (name, seconds)


async def test_a_turn_granted_to_a_cancelled_waiter_goes_to_the_next() -> None:
    turns = Turns(1, timeout=30)
    assert turns.take_free()
    first = asyncio.ensure_future(turns.take())
    second = asyncio.ensure_future(turns.take())
    await asyncio.sleep(0)  # both are queued now
    turns.give_back()  # to `first`, which is cancelled before it can run
    first.cancel()
    await asyncio.wait_for(second, 5)
    assert first.cancelled()
    turns.give_back()
    assert turns.take_free()  # the turn is free again, not lost or doubled
    assert not turns.take_free()


async def test_a_waiter_that_left_does_not_hold_up_the_queue() -> None:
    turns = Turns(1, timeout=30)
    assert turns.take_free()
    leaving = asyncio.ensure_future(turns.take())
    staying = asyncio.ensure_future(turns.take())
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    turns.give_back()
    await asyncio.wait_for(staying, 5)
    turns.give_back()
    assert turns.take_free()


async def test_waiters_time_out_in_order_and_the_rest_keep_waiting() -> None:
    turns = Turns(1, timeout=0.3)
    assert turns.take_free()
    first = asyncio.ensure_future(turns.take())
    await asyncio.sleep(0.15)  # the second arrives later on purpose, not to wait
    second = asyncio.ensure_future(turns.take())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(first, 5)
    assert not second.done()  # its own deadline is still ahead
    turns.give_back()
    await asyncio.wait_for(second, 5)


async def test_a_connection_handed_to_a_cancelled_waiter_goes_to_the_next_or_back() -> None:
    orphans: list[object] = []
    turns = Turns(1, timeout=30, on_orphan=orphans.append)
    connection = object()
    assert turns.take_free()
    first = asyncio.ensure_future(turns.take())
    second = asyncio.ensure_future(turns.take())
    await asyncio.sleep(0)
    assert turns.hand_over(connection)  # to `first`, cancelled before it can use it
    first.cancel()
    assert await asyncio.wait_for(second, 5) is connection
    third = asyncio.ensure_future(turns.take())
    await asyncio.sleep(0)
    assert turns.hand_over(connection)
    third.cancel()
    await asyncio.sleep(0)
    assert third.cancelled()
    assert orphans == [connection]  # nobody else waited: back to the pool with its turn
    assert not turns.hand_over(connection)  # nobody waits now


async def test_connections_are_handed_on_until_asyncpg_would_recycle_them(
    database_url: str,
) -> None:
    # Reads asyncpg's own count; should a new asyncpg lay it out differently, every release
    # goes through its pool again (correct, only slower) and this test says so.
    async with DatabaseClient(Settings(database_url=database_url, pool_max_size=1)) as client:
        connection = await client.pool.acquire()
        try:
            assert not due_for_recycling(connection)
        finally:
            await client.pool.release(connection, broken=False, session_changed=False)


async def test_no_turn_is_lost_or_doubled_under_cancellations_and_timeouts(
    database_url: str,
) -> None:
    settings = Settings(
        database_url=database_url, pool_min_size=0, pool_max_size=3, pool_timeout=0.05
    )
    random = Random(7)
    async with DatabaseClient(settings) as client:

        async def one(number: int) -> None:
            pause = {"seconds": random.random() / 100}
            with contextlib.suppress(DatabaseUnavailable):  # timeouts are part of the storm
                if number % 3:
                    await client.fetch_val("SELECT pg_sleep(:seconds)", pause)
                else:
                    async with client.transaction():
                        await client.fetch_val("SELECT pg_sleep(:seconds)", pause)

        for _ in range(10):
            tasks = [asyncio.ensure_future(one(number)) for number in range(60)]
            await asyncio.sleep(random.random() / 50)  # let the storm get going, then cut
            for task in random.sample(tasks, 20):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await poll_until(
            lambda: client.pool_stats().in_use == 0 and not client.pool.cleanups_running
        )
        assert client.pool.turns.take_free() and client.pool.turns.take_free()
        assert client.pool.turns.take_free()
        assert not client.pool.turns.take_free()  # exactly three turns: none lost, none doubled
        for _ in range(3):
            client.pool.turns.give_back()
        assert client.pool_stats().waiting == 0
        assert await client.fetch_val("SELECT 1") == 1
