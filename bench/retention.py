"""The retention figures: a spray of distinct unknown emails, then the purge once its window passed.

    python -m bench.retention [--database-url URL] [--emails 10000] [--concurrency 10]

Records one failed login for each of N distinct unknown emails through LoginThrottle, as
POST /auth/login does (one transaction each, `--concurrency` at a time), and locks one account
out with five more. Then it moves the spray's clock a window (plus a second) into the past and
runs the purge once, as `sparc purge` does: rows before and after, the time it took, its
batches. The lockout must survive. Point --database-url at a throwaway database: the spray's
rows are added to it.
"""

from __future__ import annotations

import argparse
import time
import uuid
from datetime import timedelta

import anyio

from bench.common import database
from sparc.database import DatabaseClient, bind_db_client
from sparc.retention import PurgeEvents, purge
from sparc.settings import Settings
from sparc.throttle import LoginThrottle, account_key


class Batches(PurgeEvents):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def rows_purged(self, table: str, count: int) -> None:
        self.sizes.append(count)


async def measure(url: str, emails: int, concurrency: int) -> None:
    settings = Settings(database_url=url, pool_max_size=concurrency)
    throttle = LoginThrottle(
        max_failures=settings.login_max_failures,
        ip_max_failures=settings.login_ip_max_failures,
        window=settings.login_window,
    )
    run = uuid.uuid4().hex[:8]
    spray = [f"spray-{run}-{n}@unknown.example" for n in range(emails)]
    async with DatabaseClient(settings) as client:

        async def rows() -> int:
            count: int = await client.fetch_val("SELECT count(*) FROM login_throttles")
            return count

        async def fail(email: str) -> None:
            async with client.transaction():
                await throttle.record_failure(email, None)

        async def spray_part(part: list[str]) -> None:
            for email in part:
                await fail(email)

        with bind_db_client(client):
            started = time.perf_counter()
            async with anyio.create_task_group() as group:
                for worker in range(concurrency):
                    group.start_soon(spray_part, spray[worker::concurrency])
            spray_seconds = time.perf_counter() - started
            victim = f"victim-{run}@example.org"
            for _ in range(settings.login_max_failures):
                await fail(victim)
        before = await rows()
        await client.execute(
            "UPDATE login_throttles SET window_started_at = window_started_at"
            " - CAST(:passed AS interval) WHERE key = ANY(:keys)",
            {
                "passed": timedelta(seconds=settings.login_window + 1),
                "keys": [account_key(email) for email in spray],
            },
        )
        batches = Batches()
        report = await purge(client, settings, events=batches)
        after = await rows()
        with bind_db_client(client):
            still_locked = await throttle.retry_after(victim, None) is not None
    print(f"spray: {emails:,} failed logins in {spray_seconds:.2f} s")
    print(f"login_throttles rows: {before:,} before the purge, {after:,} after")
    print(
        f"purge: {report.deleted['login_throttles']:,} throttle rows in {report.seconds:.3f} s, "
        f"{len(batches.sizes)} batches of at most {max(batches.sizes, default=0):,}"
    )
    print(f"the live lockout survived: {still_locked}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", help="a throwaway database (default: embedded)")
    parser.add_argument("--emails", type=int, default=10_000, help="distinct emails (10000)")
    parser.add_argument("--concurrency", type=int, default=10, help="spray transactions (10)")
    args = parser.parse_args()
    with database(args.database_url) as url:
        anyio.run(measure, url, args.emails, args.concurrency)


if __name__ == "__main__":
    main()
