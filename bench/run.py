"""The benchmark: SPARC's GET /auth/me against a bare asyncpg endpoint and a connection-per-request
endpoint, plus overload, memory and scaling checks. One command, one machine:

    python -m bench.run [--database-url URL] [--rounds 10] [--seconds 10] [--connections 64]

Starts PostgreSQL (a throwaway embedded one unless a URL is given); SPARC as a user runs it,
`sparc serve` with its defaults (its access log on, written to a file), and the same with
SPARC_ACCESS_LOG=false; the two reference apps (bench/reference_apps.py) and the fastapi-users
peer (bench/fastapi_users_app.py) under uvicorn with nothing logged. It loads them in turn,
A B C D E, B C D E A, ..., with wrk, and prints medians, ratios and the targets' verdicts. Results
go to bench/results/latest.json and the chart to bench/auth_me.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from bench import fastapi_users_app
from bench.common import REPO_ROOT, SPARC_SERVE, WrkResult, bearer_token, database, server, wrk

RESULTS = REPO_ROOT / "bench" / "results"
CHART = REPO_ROOT / "bench" / "auth_me.png"  # kept in git: the README shows it
SHIPPED = "sparc serve"
NO_ACCESS_LOG = "sparc serve, SPARC_ACCESS_LOG=false"
BARE = "bare asyncpg"
PER_REQUEST = "connection per request"
PEER = "fastapi-users"
# Each target: what serves it and the environment it gets on top of the database's.
APPS: dict[str, tuple[str, dict[str, str]]] = {
    SHIPPED: (SPARC_SERVE, {}),
    NO_ACCESS_LOG: (SPARC_SERVE, {"SPARC_ACCESS_LOG": "false"}),
    BARE: ("bench.reference_apps:bare", {}),
    PER_REQUEST: ("bench.reference_apps:per_request", {}),
    # The peer a team would build instead (bench/peer.py measures its logins and overload).
    PEER: ("bench.fastapi_users_app:create_app", {}),
}


def server_pid(base: str) -> int:
    """The uvicorn process listening on `base`'s port."""
    port = int(base.rsplit(":", 1)[1])
    for connection in psutil.net_connections("tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == "LISTEN":
            assert connection.pid is not None
            return connection.pid
    raise RuntimeError(f"nothing listens on {port}")


def loadtest(base: str, url: str, concurrency: int, seconds: int) -> dict[str, object]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparc",
            "loadtest",
            "--url",
            base,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(seconds),
            "--json",
            "--database-url",
            url,
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="SPARC's benchmark")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    # Ten: one round on a shared 2-core machine varies by ±5 % on a good day and by ±20 % on a
    # bad one (seen here); the median of ten, and of ten paired ratios, moves far less.
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=10)
    args = parser.parse_args()
    figures: dict[str, object] = {"settings": vars(args) | {"database_url": None}}

    with database(args.database_url) as url:
        env = {
            "DATABASE_URL": url,
            "BENCH_DATABASE_URL": url,
            "DB_POOL_MAX_SIZE": str(args.pool_size),
        }
        runs: dict[str, list[WrkResult]] = {name: [] for name in APPS}
        with contextlib.ExitStack() as servers:
            bases = {
                name: servers.enter_context(server(app, env | extra_env))
                for name, (app, extra_env) in APPS.items()
            }
            headers = {"Authorization": f"Bearer {bearer_token(bases[SHIPPED])}"}
            # Each app's `me` lookup and bearer token: the peer has users and a path of its own.
            me = {name: (f"{base}/auth/me", headers) for name, base in bases.items()}
            me[PEER] = (
                f"{bases[PEER]}{fastapi_users_app.ME_PATH}",
                {"Authorization": f"Bearer {fastapi_users_app.bearer_token(bases[PEER])}"},
            )
            for me_url, me_headers in me.values():  # warm every app up before measuring
                wrk(me_url, connections=8, seconds=2, headers=me_headers)
            names = list(me)
            for round_number in range(1, args.rounds + 1):
                # Each round starts one app further on (A B C D E, B C D E A, ...), so that no
                # app always follows the same one (the per-request app leaves PostgreSQL busy
                # with the backends it forked) and each takes every place once in five rounds.
                start = (round_number - 1) % len(names)
                for name in names[start:] + names[:start]:
                    me_url, me_headers = me[name]
                    result = wrk(
                        me_url,
                        connections=args.connections,
                        seconds=args.seconds,
                        headers=me_headers,
                    )
                    runs[name].append(result)
                    print(
                        f"round {round_number} {name:36} {result.requests_per_second:9.1f} req/s  "
                        f"p99 {result.p99_ms:7.1f} ms  "
                        f"errors {result.non_2xx + result.socket_errors}",
                        flush=True,
                    )

            # Where connection-per-request breaks: more clients than PostgreSQL takes connections.
            crowd = 200
            crowd_runs = {
                name: wrk(
                    f"{bases[name]}/auth/me",
                    connections=crowd,
                    seconds=args.seconds,
                    headers=headers,
                )
                for name in (SHIPPED, PER_REQUEST)
            }

        # SPARC alone from here, so pg_stat_activity shows its connections and nobody else's.
        with server(SPARC_SERVE, env) as sparc:
            headers = {"Authorization": f"Bearer {bearer_token(sparc)}"}
            # 20x overload, checked by sparc loadtest against pg_stat_activity.
            overload = loadtest(sparc, url, 20 * args.pool_size, args.seconds)

            # Memory: RSS after a warm-up, then after 100,000 more requests.
            pid = server_pid(sparc)
            wrk(f"{sparc}/auth/me", connections=args.connections, seconds=3, headers=headers)
            rss_before = psutil.Process(pid).memory_info().rss
            served = 0
            while served < 100_000:
                served += wrk(
                    f"{sparc}/auth/me", connections=args.connections, seconds=5, headers=headers
                ).requests
            rss_after = psutil.Process(pid).memory_info().rss

        # Scaling: the same load on one and on two workers.
        scaling: dict[int, float] = {}
        for workers in (1, 2):
            with server(SPARC_SERVE, env, workers=workers) as base:
                time.sleep(1)
                token = bearer_token(base, email=f"workers{workers}@example.org")
                wrk(
                    f"{base}/auth/me",
                    connections=8,
                    seconds=2,
                    headers={"Authorization": f"Bearer {token}"},
                )
                scaling[workers] = statistics.median(
                    wrk(
                        f"{base}/auth/me",
                        connections=args.connections,
                        seconds=args.seconds,
                        headers={"Authorization": f"Bearer {token}"},
                    ).requests_per_second
                    for _ in range(2)
                )

    median = {
        name: statistics.median(r.requests_per_second for r in results)
        for name, results in runs.items()
    }
    p99 = {name: statistics.median(r.p99_ms for r in results) for name, results in runs.items()}
    errors = {
        name: sum(r.non_2xx + r.socket_errors for r in results) for name, results in runs.items()
    }
    shipped, no_log, bare = median[SHIPPED], median[NO_ACCESS_LOG], median[BARE]
    # The same ratios round by round: two apps loaded one after the other share the machine's
    # state of the moment, so a round's ratio does not move with what drifts over a whole run.
    log_cost_by_round = [
        round(1 - a.requests_per_second / b.requests_per_second, 3)
        for a, b in zip(runs[SHIPPED], runs[NO_ACCESS_LOG], strict=True)
    ]
    bare_ratio_by_round = [
        round(a.requests_per_second / b.requests_per_second, 3)
        for a, b in zip(runs[SHIPPED], runs[BARE], strict=True)
    ]
    targets = {
        "req/s >= 1.0x bare, as shipped (access log on)": shipped >= bare,
        "access log on within 5% of off": shipped >= 0.95 * no_log,
        "p99 <= bare, as shipped": p99[SHIPPED] <= p99[BARE],
        ">= 10x connection-per-request": shipped / median[PER_REQUEST] >= 10,
        f"no errors at {crowd} clients where per-request fails": (
            crowd_runs[SHIPPED].non_2xx + crowd_runs[SHIPPED].socket_errors == 0
            and crowd_runs[PER_REQUEST].non_2xx + crowd_runs[PER_REQUEST].socket_errors > 0
        ),
        "20x overload: peak <= bound, no error but 503": bool(overload["passed"]),
        "RSS grows < 10% over 100k requests": rss_after < 1.10 * rss_before,
        "--workers 2 scales req/s": scaling[2] > scaling[1],
    }
    figures.update(
        median_requests_per_second=median,
        median_p99_ms=p99,
        errors=errors,
        ratio_to_bare=round(shipped / bare, 3),
        ratio_to_bare_without_access_log=round(no_log / bare, 3),
        access_log_cost=round(1 - shipped / no_log, 3),
        access_log_cost_by_round=log_cost_by_round,
        median_access_log_cost_by_round=statistics.median(log_cost_by_round),
        ratio_to_bare_by_round=bare_ratio_by_round,
        p99_ratio_to_bare=round(p99[SHIPPED] / p99[BARE], 3),
        ratio_to_per_request=round(shipped / median[PER_REQUEST], 1),
        ratio_to_fastapi_users=round(shipped / median[PEER], 2),
        p99_ratio_to_fastapi_users=round(p99[SHIPPED] / p99[PEER], 3),
        crowd={
            name: {
                "clients": crowd,
                "requests_per_second": r.requests_per_second,
                "errors": r.non_2xx + r.socket_errors,
            }
            for name, r in crowd_runs.items()
        },
        overload=overload,
        rss_mib={
            "before": round(rss_before / 2**20, 1),
            "after": round(rss_after / 2**20, 1),
            "requests": served,
            "growth": round(rss_after / rss_before - 1, 4),
        },
        workers_scaling={
            "1": scaling[1],
            "2": scaling[2],
            "factor": round(scaling[2] / scaling[1], 2),
        },
        targets=targets,
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(figures, indent=2))
    chart(median, p99, CHART)

    print()
    for name in APPS:
        print(
            f"{name:36} median {median[name]:9.1f} req/s   "
            f"median p99 {p99[name]:7.1f} ms   errors {errors[name]}"
        )
    print(
        f"sparc serve / bare: {figures['ratio_to_bare']}x req/s "
        f"({figures['ratio_to_bare_without_access_log']}x without the access log, which costs "
        f"{figures['access_log_cost']:.1%}), {figures['p99_ratio_to_bare']}x p99; "
        f"sparc serve / per-request: {figures['ratio_to_per_request']}x"
    )
    print(
        "by round: the access log costs "
        + ", ".join(f"{cost:.1%}" for cost in log_cost_by_round)
        + f" (median {figures['median_access_log_cost_by_round']:.1%}); sparc serve / bare "
        + ", ".join(f"{ratio}x" for ratio in bare_ratio_by_round)
    )
    print(
        f"sparc serve / fastapi-users: {figures['ratio_to_fastapi_users']}x req/s, "
        f"{figures['p99_ratio_to_fastapi_users']}x p99"
    )
    for name, r in crowd_runs.items():
        print(
            f"{crowd} clients, {name}: {r.requests_per_second:.1f} req/s, "
            f"errors {r.non_2xx + r.socket_errors}"
        )
    print(
        f"20x overload: {overload['requests']} requests, statuses {overload['status_counts']}, "
        f"peak {overload['peak_connections']} of {overload['connection_bound']}"
    )
    print(f"RSS {figures['rss_mib']}")
    print(f"workers: {figures['workers_scaling']}")
    for target, met in targets.items():
        print(f"{'PASS' if met else 'FAIL'}  {target}")


def chart(median: dict[str, float], p99: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(median)
    labels = [textwrap.fill(name, 12) for name in names]  # five names side by side
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["#2a7", "#7c9", "#888", "#c44", "#37c"][: len(names)]
    left.bar(labels, [median[n] for n in names], color=colors)
    left.set_title("GET /auth/me, requests/s (median)")
    right.bar(labels, [p99[n] for n in names], color=colors)
    right.set_title("p99 latency, ms (median)")
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=7, labelrotation=12)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
