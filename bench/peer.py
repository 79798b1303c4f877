"""SPARC against the peer a team would build instead, fastapi-users (bench/fastapi_users_app.py):
logins per second under both hash settings, and a 20 x overload of the `me` lookup.

    python -m bench.peer [--database-url URL] [--seconds 10] [--pool-size 10]
                         [--login-connections 32]

(`python -m bench.run` measures the `me` lookup's throughput and p99 with the peer among the
other apps.) Each server runs alone on the database while it is measured, one worker, under
uvicorn with the same flags. While wrk floods POST /auth/login, a client of its own times the
`me` lookup every 20 ms, as bench/login_flood.py times /healthz. The overload drives 20 x the
pool size of keep-alive clients with wrk while a sampler counts the database's client
connections in pg_stat_activity every 50 ms: the same driver and the same sampler for both
apps. Results go to bench/results/peer.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
from dataclasses import asdict, dataclass
from urllib.parse import urlencode

import asyncpg

from bench import fastapi_users_app
from bench.common import (
    REPO_ROOT,
    app_env,
    bearer_token,
    database,
    flood_logins,
    percentile,
    server,
    wrk,
)

SPARC_APP = "sparc.app:create_app"
PEER_APP = "bench.fastapi_users_app:create_app"
SAMPLE_SECONDS = 0.05
LOGIN = {"email": "peer-login@example.org", "password": "benchmark password"}


class ConnectionSampler(threading.Thread):
    """Counts the client connections to one database (its own excluded) until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.peak = 0
        self.samples = 0
        self._stopping = threading.Event()  # not _stop: Thread has one

    def run(self) -> None:
        asyncio.run(self._sample())

    async def _sample(self) -> None:
        connection = await asyncpg.connect(self.url)
        try:
            while not self._stopping.is_set():
                now = await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                self.peak = max(self.peak, now)
                self.samples += 1
                await asyncio.sleep(SAMPLE_SECONDS)
        finally:
            await connection.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join()


@dataclass(frozen=True)
class Overload:
    clients: int
    requests_per_second: float
    p99_ms: float
    requests: int
    errors: int
    peak_connections: int
    pool_bound: int


def logins(base: str, *, peer: bool, seconds: int, connections: int) -> dict[str, float]:
    """POST /auth/login with the right password, as fast as the server takes them, while a
    client of its own times the `me` lookup: hashing on the event loop stalls everything."""
    if peer:
        token = fastapi_users_app.bearer_token(base, email=LOGIN["email"])  # registers too
        me = f"{base}{fastapi_users_app.ME_PATH}"
        form = {"username": LOGIN["email"], "password": LOGIN["password"]}
        body, content_type = urlencode(form), "application/x-www-form-urlencoded"
    else:
        token = bearer_token(base, email=LOGIN["email"])
        me = f"{base}/auth/me"
        body, content_type = json.dumps(LOGIN), "application/json"
    result, during = flood_logins(
        base,
        body,
        content_type,
        probe_url=me,
        probe_headers={"Authorization": f"Bearer {token}"},
        connections=connections,
        seconds=seconds,
    )
    return {
        "logins_per_second": result.requests_per_second,
        "p99_ms": result.p99_ms,
        "errors": result.non_2xx + result.socket_errors,
        "me_during_p50_ms": percentile(during, 0.5),
        "me_during_p99_ms": percentile(during, 0.99),
        "me_during_max_ms": max(during),
        # Every 20 ms unless the server stalls: a stalled event loop answers a few, late.
        "me_during_samples": len(during),
    }


def overload(
    base: str, path: str, token: str, *, url: str, pool_size: int, seconds: int
) -> Overload:
    """20 x the pool size of clients on the `me` lookup, server connections sampled."""
    headers = {"Authorization": f"Bearer {token}"}
    wrk(f"{base}{path}", connections=8, seconds=2, headers=headers)  # warm-up
    sampler = ConnectionSampler(url)
    sampler.start()
    try:
        result = wrk(f"{base}{path}", connections=20 * pool_size, seconds=seconds, headers=headers)
    finally:
        sampler.stop()
    return Overload(
        clients=20 * pool_size,
        requests_per_second=result.requests_per_second,
        p99_ms=result.p99_ms,
        requests=result.requests,
        errors=result.non_2xx + result.socket_errors,
        peak_connections=sampler.peak,
        pool_bound=pool_size,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--login-connections", type=int, default=32)
    args = parser.parse_args()
    figures: dict[str, object] = {"settings": vars(args) | {"database_url": None}}

    with database(args.database_url) as url:
        env = app_env(url, args.pool_size)
        login_figures: dict[str, dict[str, float]] = {}
        overloads: dict[str, Overload] = {}
        runs = [
            ("sparc", SPARC_APP, {}),
            ("fastapi-users", PEER_APP, {"BENCH_PEER_HASH": "default"}),
            ("fastapi-users, SPARC's Argon2id", PEER_APP, {"BENCH_PEER_HASH": "sparc"}),
        ]
        for name, app, extra in runs:
            peer = app == PEER_APP
            with server(app, env | extra) as base:
                login_figures[name] = logins(
                    base, peer=peer, seconds=args.seconds, connections=args.login_connections
                )
                print(f"logins  {name:32} {login_figures[name]}", flush=True)
                if extra.get("BENCH_PEER_HASH") == "sparc":
                    continue  # the hash does not touch the `me` lookup
                token = fastapi_users_app.bearer_token(base) if peer else bearer_token(base)
                path = fastapi_users_app.ME_PATH if peer else "/auth/me"
                overloads[name] = overload(
                    base, path, token, url=url, pool_size=args.pool_size, seconds=args.seconds
                )
                print(f"overload {name:31} {overloads[name]}", flush=True)

    figures.update(logins=login_figures, overload={n: asdict(o) for n, o in overloads.items()})
    results = REPO_ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "peer.json").write_text(json.dumps(figures, indent=2))

    print()
    print(
        f"{'logins':34} {'per second':>11} {'p99 ms':>9} {'errors':>7}"
        f" {'me p50 / p99 / max during, ms':>30} {'me answers':>10}"
    )
    for name, row in login_figures.items():
        during = (
            f"{row['me_during_p50_ms']:.1f} / {row['me_during_p99_ms']:.1f} / "
            f"{row['me_during_max_ms']:.1f}"
        )
        print(
            f"{name:34} {row['logins_per_second']:11.1f} {row['p99_ms']:9.1f} "
            f"{row['errors']:7} {during:>30} {row['me_during_samples']:10}"
        )
    print()
    print(
        f"{'20 x overload of me':34} {'clients':>7} {'req/s':>9} {'p99 ms':>9} {'errors':>7} "
        f"{'peak conn':>10}"
    )
    for name, o in overloads.items():
        print(
            f"{name:34} {o.clients:7} {o.requests_per_second:9.1f} {o.p99_ms:9.1f} {o.errors:7} "
            f"{o.peak_connections:>5} of {o.pool_bound}"
        )


if __name__ == "__main__":
    main()
