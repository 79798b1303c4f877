"""Statement deadlines: one timer for every statement in flight, and a cut when one is overdue."""

from __future__ import annotations

import asyncio

import pytest

from sparc.database.deadlines import Deadlines
from tests.conftest import poll_until

pytestmark = pytest.mark.anyio


async def test_an_overdue_statement_is_cut_and_a_finished_one_is_not() -> None:
    cut: list[str] = []
    deadlines: Deadlines[str] = Deadlines(0.05, cut.append)
    deadlines.start("slow")
    deadlines.start("quick")
    assert deadlines.finish("quick")
    await poll_until(lambda: cut == ["slow"], within=2)
    assert not deadlines.finish("slow")  # its statement learns it was cut


async def test_a_cut_that_fails_leaves_the_other_statements_watched() -> None:
    cut: list[str] = []

    def cut_or_fail(connection: str) -> None:
        if connection == "already released":
            raise RuntimeError("cannot terminate a connection that went back to the pool")
        cut.append(connection)

    deadlines: Deadlines[str] = Deadlines(0.05, cut_or_fail)
    deadlines.start("already released")
    deadlines.start("first")
    await asyncio.sleep(0.02)
    deadlines.start("later")  # its deadline comes after the timer's first firing
    await poll_until(lambda: cut == ["first", "later"], within=2)
