"""How /healthz answers while a flood of logins keeps every core hashing passwords.

    python -m bench.login_flood [--database-url URL] [--seconds 10] [--connections 32]

Runs SPARC (one worker) twice: with hashing bounded to the CPU count (the default) and with
SPARC_HASH_CONCURRENCY=64 (effectively unbounded), drives POST /auth/login with wrk, and
samples GET /healthz latency from a separate client every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import httpx

from bench.common import database, flood_logins, percentile, probing, server


def measure(
    url: str, hash_concurrency: str | None, seconds: int, connections: int
) -> dict[str, float]:
    env = {"DATABASE_URL": url}
    if hash_concurrency is not None:
        env["SPARC_HASH_CONCURRENCY"] = hash_concurrency
    with server("sparc.app:create_app", env) as base:
        credentials = {"email": "flood@example.org", "password": "flood password"}
        httpx.post(f"{base}/auth/register", json=credentials, timeout=30)
        with probing(f"{base}/healthz") as idle:
            time.sleep(3)
        result, flooded = flood_logins(
            base,
            json.dumps(credentials),
            "application/json",
            probe_url=f"{base}/healthz",
            connections=connections,
            seconds=seconds,
        )
    return {
        "logins_per_second": result.requests_per_second,
        "login_p99_ms": result.p99_ms,
        "login_errors": result.non_2xx + result.socket_errors,
        "healthz_idle_p50_ms": percentile(idle, 0.5),
        "healthz_idle_p99_ms": percentile(idle, 0.99),
        "healthz_flood_p50_ms": percentile(flooded, 0.5),
        "healthz_flood_p99_ms": percentile(flooded, 0.99),
        "healthz_flood_max_ms": max(flooded),
        "healthz_samples": len(flooded),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    with database(args.database_url) as url:
        rows = [
            ("bounded (CPU count)", measure(url, None, args.seconds, args.connections)),
            ("unbounded (64)", measure(url, "64", args.seconds, args.connections)),
        ]
    print(f"{'':24}" + "".join(f"{name:>22}" for name, _ in rows))
    for key in rows[0][1]:
        print(f"{key:24}" + "".join(f"{figures[key]:>22.1f}" for _, figures in rows))


if __name__ == "__main__":
    main()
