"""Real faults against `sparc serve` as shipped (its defaults): a frozen server and a switchover.

    python -m bench.faults [--freeze 30] [--clients 20]

freeze: PostgreSQL of its own on TCP; clients call GET /auth/me back to back while every
process of the server is SIGSTOPped for `--freeze` seconds, then thawed. switchover: two
servers behind a multi-host DATABASE_URL (target_session_attrs=read-write); clients log in (each
login writes a session) while the primary turns read-only and the other server writable.
Each prints the worst request time, the statuses, and how long after the fault ended requests
succeeded again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from bench.common import REPO_ROOT, free_port
from tests.tcp_postgres import TcpPostgres, running

EMAIL = "faults@example.org"
PASSWORD = "benchmark password"


@dataclass(frozen=True, slots=True)
class Answer:
    at: float
    seconds: float
    status: int  # 0: no HTTP answer


@contextlib.contextmanager
def sparc_serve(database_url: str) -> Iterator[str]:
    """`sparc serve` with nothing but DATABASE_URL set; its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "SPARC_"))}
    env["DATABASE_URL"] = database_url
    process = subprocess.Popen(
        [sys.executable, "-m", "sparc", "serve", "--port", str(port)],
        env=env,
        cwd=tempfile.mkdtemp(prefix="sparc-faults-"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("sparc serve did not start")
            time.sleep(0.1)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


async def drive(
    base: str, request: str, clients: int, seconds: float, token: str = ""
) -> list[Answer]:
    answers: list[Answer] = []
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                if request == "me":
                    status = (await http.get("/auth/me", headers=headers)).status_code
                else:  # a login writes a session: refused while the database is read-only
                    body = {"email": EMAIL, "password": PASSWORD}
                    status = (await http.post("/auth/login", json=body)).status_code
            except httpx.TransportError:
                status = 0
            answers.append(Answer(started, time.monotonic() - started, status))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return answers


def token(base: str) -> str:
    credentials = {"email": EMAIL, "password": PASSWORD}
    httpx.post(f"{base}/auth/register", json=credentials, timeout=30)
    response = httpx.post(f"{base}/auth/login", json=credentials, timeout=30)
    response.raise_for_status()
    return str(response.json()["access_token"])


def report(name: str, answers: list[Answer], fault_ended: float, good: int) -> None:
    statuses = collections.Counter(answer.status for answer in answers)
    worst = max(answer.seconds for answer in answers)
    after = sorted((a for a in answers if a.at >= fault_ended), key=lambda a: a.at)
    healed = next((a.at + a.seconds - fault_ended for a in after if a.status == good), None)
    healed_text = f"{healed:.2f} s" if healed is not None else "never"
    print(
        f"{name}: {len(answers)} requests, statuses {dict(sorted(statuses.items()))}, "
        f"worst {worst:.2f} s, first {good} {healed_text} after the fault ended",
        flush=True,
    )


async def freeze(seconds: float, clients: int, directory: Path) -> None:
    with running(directory / "freeze") as server:
        await prepare(server)
        with sparc_serve(server.url) as base:
            bearer = token(base)
            load = asyncio.ensure_future(drive(base, "me", clients, seconds + 20, bearer))
            await asyncio.sleep(5)
            server.freeze()
            await asyncio.sleep(seconds)
            server.thaw()
            thawed = time.monotonic()
            answers = await load
        report(f"{seconds:g} s freeze of the whole server", answers, thawed, 200)


async def switchover(clients: int, directory: Path) -> None:
    with running(directory / "old") as old, running(directory / "new") as new:
        for server in (old, new):
            await prepare(server)
        await new.set_read_only(True)
        url = (
            f"postgresql://postgres@127.0.0.1:{old.port},127.0.0.1:{new.port}/sparc"
            "?target_session_attrs=read-write"
        )
        with sparc_serve(url) as base:
            token(base)  # the account, on the old primary
            await copy_accounts(old, new)  # as replication would have
            load = asyncio.ensure_future(drive(base, "login", clients, 15))
            await asyncio.sleep(5)
            await old.set_read_only(True)
            await new.set_read_only(False)
            switched = time.monotonic()
            answers = await load
        report("read-only switchover (logins)", answers, switched, 200)


async def copy_accounts(source: TcpPostgres, target: TcpPostgres) -> None:
    """The users table of `source` into `target` (a standby has the primary's data)."""
    read = await asyncpg.connect(source.socket_url())
    write = await asyncpg.connect(target.socket_url())
    try:
        rows = await read.fetch("SELECT id, email, password_hash, created_at FROM users")
        async with write.transaction():
            await write.execute("SET TRANSACTION READ WRITE")
            await write.copy_records_to_table(
                "users", records=rows, columns=["id", "email", "password_hash", "created_at"]
            )
    finally:
        await read.close()
        await write.close()


async def prepare(server: TcpPostgres) -> None:
    await server.create_database()
    await asyncio.to_thread(server.migrate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--freeze", type=float, default=30.0, help="seconds frozen (30)")
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    os.chdir(REPO_ROOT)
    with tempfile.TemporaryDirectory(prefix="sparc-faults-") as directory:
        asyncio.run(freeze(args.freeze, args.clients, Path(directory)))
        asyncio.run(switchover(args.clients, Path(directory)))


if __name__ == "__main__":
    main()
