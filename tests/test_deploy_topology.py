"""The reference topology of deploy/, run from its files: nginx -> two `sparc serve` -> PgBouncer
(transaction mode) -> PostgreSQL, on a fresh database.

The module starts it once: both instances at the same moment, as sparc@.service starts them,
then nginx in front. The tests run in file order; the rolling restart comes last.
"""

from __future__ import annotations

import collections
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import httpx
import pytest

from sparc.migrations import head_revision
from tests.conftest import empty_database, poll_until
from tests.helpers import PASSWORD, bearer
from tests.topology import (
    Instance,
    Nginx,
    instances,
    run_migrate_unit,
    running_deployed_pgbouncer,
    running_nginx,
    stopped_at_exit,
)

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

# The steady load of the rolling restart: this many clients back to back through nginx, each
# request a GET /auth/me but every LOGIN_EVERY-th, a login (a write: a session, an audit event).
CLIENTS = 8
LOGIN_EVERY = 10
# Requests served before the first instance stops, so that the load is steady by then.
WARM_UP_REQUESTS = 200
# Bounds, generous for a busy 2-core machine: the whole restart of both instances, and how long
# nginx may take to send a request to an instance that came back.
RESTART_WITHIN = 300
BACK_IN_TURN_WITHIN = 60
# A client whose connections come from another loopback address than nginx's own 127.0.0.1,
# which the deployed sparc.env trusts as the proxy.
CLIENT_ADDRESS = "127.0.0.2"


@dataclass(frozen=True)
class Topology:
    nginx: Nginx
    instances: list[Instance]
    first_readiness: list[dict[str, object]]


@pytest.fixture(scope="module")
def topology(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    directory = tmp_path_factory.mktemp("topology")
    with (
        empty_database(server_url, "sparc_topology") as database_url,
        running_deployed_pgbouncer(database_url) as bouncer,
        stopped_at_exit(instances(bouncer, 2, directory)) as both,
    ):
        for instance in both:
            instance.start()
        readiness = [instance.wait_ready() for instance in both]
        with running_nginx(both) as nginx:
            yield Topology(nginx, both, readiness)


def test_both_instances_started_at_once_on_a_fresh_database_are_ready_at_head(
    topology: Topology,
) -> None:
    schemas = [ready["schema"] for ready in topology.first_readiness]
    assert schemas == [{"revision": head_revision(), "head": head_revision()}] * 2
    logs = [instance.log.read_text() for instance in topology.instances]
    # One ran the migrations; the other waited its turn on the lock and found the schema at head.
    assert sum("Running upgrade" in log for log in logs) == 1, logs
    assert "Traceback" not in "".join(logs)
    assert httpx.get(f"{topology.nginx.base}/readyz", timeout=30).status_code == 200


async def test_sparc_records_the_address_nginx_saw_not_the_one_the_client_wrote(
    topology: Topology,
) -> None:
    transport = httpx.AsyncHTTPTransport(local_address=CLIENT_ADDRESS)
    spoofed = {"X-Forwarded-For": "203.0.113.7"}
    credentials = {"email": new_email(), "password": PASSWORD}
    async with httpx.AsyncClient(
        base_url=topology.nginx.base, transport=transport, timeout=30
    ) as http:
        registered = await http.post("/auth/register", json=credentials, headers=spoofed)
        assert registered.status_code == 201, registered.text
        logged_in = await http.post("/auth/login", json=credentials, headers=spoofed)
        assert logged_in.status_code == 200, logged_in.text
        token = bearer(logged_in.json()["access_token"])
        sessions = (await http.get("/auth/sessions", headers={**token, **spoofed})).json()
        events = (await http.get("/auth/events", headers={**token, **spoofed})).json()
    assert [session["ip"] for session in sessions["sessions"]] == [CLIENT_ADDRESS]
    assert [(event["type"], event["ip"]) for event in events["events"]] == [
        ("login_succeeded", CLIENT_ADDRESS),
        ("register", CLIENT_ADDRESS),
    ]


@dataclass
class Tally:
    """What the clients of the steady load got."""

    requests: int = 0
    failures: list[str] = field(default_factory=list)

    def record(self, method: str, answer: httpx.Response | Exception) -> None:
        self.requests += 1
        if isinstance(answer, Exception):
            self.failures.append(f"{method}: {answer!r}")
        elif answer.status_code != 200:
            self.failures.append(f"{method}: {answer.status_code} {answer.text[:200]}")


async def test_a_rolling_restart_under_steady_load_fails_no_request(
    topology: Topology, capsys: pytest.CaptureFixture[str]
) -> None:
    credentials = {"email": new_email(), "password": PASSWORD}
    tally = Tally()
    stop_load = anyio.Event()
    async with httpx.AsyncClient(base_url=topology.nginx.base, timeout=60) as http:
        assert (await http.post("/auth/register", json=credentials)).status_code == 201
        logged_in = await http.post("/auth/login", json=credentials)
        token = bearer(logged_in.json()["access_token"])

        async def client() -> None:
            turn = 0
            while not stop_load.is_set():
                turn += 1
                logs_in = turn % LOGIN_EVERY == 0
                method = "POST /auth/login" if logs_in else "GET /auth/me"
                try:
                    if logs_in:
                        answer = await http.post("/auth/login", json=credentials)
                    else:
                        answer = await http.get("/auth/me", headers=token)
                except httpx.TransportError as exc:
                    tally.record(method, exc)
                else:
                    tally.record(method, answer)

        async with anyio.create_task_group() as group:
            for _ in range(CLIENTS):
                group.start_soon(client)
            try:
                with anyio.fail_after(RESTART_WITHIN):
                    await poll_until(lambda: tally.requests >= WARM_UP_REQUESTS, within=60)
                    # A release: migrate (sparc-migrate.service; at head, nothing to do), then
                    # roll the instances one at a time.
                    first = topology.instances[0]
                    migrated = await anyio.to_thread.run_sync(
                        run_migrate_unit, first.env, first.log.parent
                    )
                    assert migrated.returncode == 0, migrated.stderr
                    assert "Running upgrade" not in migrated.stderr
                    for instance in topology.instances:
                        await restart(instance, topology.nginx)
            finally:
                stop_load.set()
    passed_on = [line for line in upstream_lines(topology.nginx) if ", " in line.upstreams]
    with capsys.disabled():
        print(
            f"\nrolling restart of 2 instances behind nginx: {tally.requests} requests, "
            f"{len(tally.failures)} failed; nginx passed {len(passed_on)} on from a stopped "
            "instance to the other"
        )
    assert tally.failures == [], failure_report(tally, topology.nginx)
    assert passed_on, "no request met a stopped instance: the restart was not under load"


def failure_report(tally: Tally, nginx: Nginx) -> str:
    """The kinds of failure and how often each came, and what nginx logged about them."""
    kinds = collections.Counter(failure[:120] for failure in tally.failures)
    logged = [line for line in nginx.error_log.read_text().splitlines() if "upstream" in line]
    return "\n".join([*(f"{count} x {kind}" for kind, count in kinds.most_common()), *logged[-20:]])


async def restart(instance: Instance, nginx: Nginx) -> None:
    """Stop `instance` as systemd would, start it again, and return once it is ready and nginx
    sends it requests again."""
    code = await anyio.to_thread.run_sync(instance.stop)
    assert code == 0, instance.log.read_text()
    served_before = len(upstream_lines(nginx))
    instance.start()
    await anyio.to_thread.run_sync(instance.wait_ready)

    def back_in_turn() -> bool:
        later = upstream_lines(nginx)[served_before:]
        return any(line.answered_by == instance.address and line.status == 200 for line in later)

    await poll_until(back_in_turn, within=BACK_IN_TURN_WITHIN, every=0.05)


@dataclass(frozen=True)
class UpstreamLine:
    """One line of the site's access log (log_format sparc_upstreams)."""

    status: int
    upstreams: str  # every instance tried, in order

    @property
    def answered_by(self) -> str:
        return self.upstreams.split(", ")[-1]


UPSTREAM_LINE = re.compile(r'" (?P<status>\d{3}) upstream=(?P<upstreams>.+?) upstream_status=')


def upstream_lines(nginx: Nginx) -> list[UpstreamLine]:
    found = (UPSTREAM_LINE.search(line) for line in nginx.access_log.read_text().splitlines())
    return [UpstreamLine(int(m["status"]), m["upstreams"]) for m in found if m is not None]


def new_email() -> str:
    return f"topology-{uuid.uuid4().hex[:10]}@example.org"
