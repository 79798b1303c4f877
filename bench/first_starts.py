"""First starts of the reference topology: N `sparc serve` started at once on a fresh database.

    python -m bench.first_starts [--rounds 5] [--instances 4] [--database-url ADMIN_URL]

Each round creates an empty database, puts PgBouncer in front of it from
deploy/pgbouncer/pgbouncer.ini, starts the instances at the same moment as sparc@.service runs
them (deploy/systemd/sparc.env: through PgBouncer, SPARC_MIGRATE=auto), and times how long until
the last one answers /readyz. Prints each round (and how many instances waited for another's
migration) and the median. Without --database-url (an admin URL) it starts an embedded
PostgreSQL. Needs Debian's pgbouncer.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sparc.embedded import embedded_postgres
from tests.conftest import empty_database
from tests.topology import instances, running_deployed_pgbouncer, stopped_at_exit

WAITED = "waiting for another instance's migration"


@contextlib.contextmanager
def admin_url(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    with (
        tempfile.TemporaryDirectory(prefix="sparc-bench-") as data_dir,
        embedded_postgres(Path(data_dir), database="postgres") as embedded,
    ):
        yield embedded


def one_round(server_url: str, count: int) -> tuple[float, int]:
    """Seconds from the first start until every instance is ready; how many waited."""
    with (
        empty_database(server_url, "sparc_first_starts") as database_url,
        running_deployed_pgbouncer(database_url) as bouncer,
        tempfile.TemporaryDirectory(prefix="sparc-first-starts-") as directory,
        stopped_at_exit(instances(bouncer, count, Path(directory))) as started,
    ):
        began = time.monotonic()
        for instance in started:
            instance.start()
        for instance in started:
            instance.wait_ready(timeout=300)
        elapsed = time.monotonic() - began
        waited = sum(WAITED in instance.log.read_text() for instance in started)
    return elapsed, waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--database-url", help="an admin URL of the server (default: embedded)")
    args = parser.parse_args()
    times = []
    with admin_url(args.database_url) as server_url:
        for number in range(1, args.rounds + 1):
            elapsed, waited = one_round(server_url, args.instances)
            times.append(elapsed)
            print(
                f"round {number}: {args.instances} instances ready in {elapsed:.2f} s "
                f"({waited} waited for another's migration)",
                flush=True,
            )
    print(
        f"{args.instances} simultaneous first starts through PgBouncer: median "
        f"{statistics.median(times):.2f} s, {min(times):.2f}-{max(times):.2f} s over "
        f"{args.rounds} rounds"
    )


if __name__ == "__main__":
    main()
