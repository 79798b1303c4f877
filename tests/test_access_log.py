"""The access log: one line per request, with what an operator needs and nothing secret."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
import uvloop
from starlette.authentication import BaseUser, SimpleUser, UnauthenticatedUser

import sparc.access_log as access_log_module
from sparc.access_log import ATOMIC_WRITE, BATCH_LINES, FLUSH_SECONDS, AccessLog
from sparc.app import create_app
from sparc.request_ids import REQUEST_ID_SCOPE_KEY
from sparc.settings import Settings
from tests.conftest import poll_until, serving
from tests.helpers import PASSWORD, add_failing_routes, bearer, login, register, token_for

pytestmark = pytest.mark.anyio

EMAIL = "ada@example.org"
ACCESS_KEYS = [
    "time",
    "level",
    "logger",
    "message",
    "request_id",
    "client",
    "method",
    "route",
    "path",
    "status",
    "duration_ms",
    "user_id",
]


async def access_lines(capsys: pytest.CaptureFixture[str], count: int) -> list[str]:
    """The next `count` lines the access log writes (to stdout, in a batch soon after)."""
    seen: list[str] = []

    def enough() -> bool:
        seen.extend(capsys.readouterr().out.splitlines())
        return len(seen) >= count

    await poll_until(enough)
    assert len(seen) == count, seen
    return seen


async def access_records(capsys: pytest.CaptureFixture[str], count: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in await access_lines(capsys, count)]


@pytest.fixture
def json_settings(settings: Settings) -> Settings:
    return replace(settings, log_format="json")


@pytest.fixture
async def json_http(json_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(create_app(json_settings), check_openapi=True) as client:
        yield client


async def test_a_line_names_the_request_and_the_authenticated_user(
    json_http: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    token = await token_for(json_http, EMAIL)
    await access_lines(capsys, 2)  # register, login
    me = await json_http.get("/auth/me", headers={**bearer(token), "X-Request-ID": "ticket-7"})
    [line] = await access_records(capsys, 1)
    assert list(line) == ACCESS_KEYS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert (line["level"], line["logger"]) == ("info", "sparc.access")
    assert line["message"] == "GET /auth/me 200"
    assert line["request_id"] == "ticket-7" == me.headers["x-request-id"]
    assert line["client"] == "127.0.0.1"  # httpx's in-process transport
    assert (line["method"], line["route"], line["path"]) == ("GET", "/auth/me", "/auth/me")
    assert line["status"] == 200
    assert 0 < line["duration_ms"] < 10_000
    assert line["user_id"] == me.json()["id"]


async def test_an_anonymous_request_has_no_user_id_and_keeps_its_route(
    json_http: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    await json_http.get("/auth/me")  # answered 401 before routing
    [line] = await access_records(capsys, 1)
    assert (line["status"], line["route"], line["user_id"]) == (401, "/auth/me", None)


async def test_a_path_no_route_serves_has_no_route(
    json_http: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    await json_http.get("/no/such/page")
    [line] = await access_records(capsys, 1)
    assert (line["status"], line["route"], line["path"]) == (404, None, "/no/such/page")


async def test_a_route_template_is_logged_beside_the_path(
    json_http: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    token = await token_for(json_http, EMAIL)
    await access_lines(capsys, 2)
    await json_http.delete("/auth/sessions/nope", headers=bearer(token))
    [line] = await access_records(capsys, 1)
    assert (line["route"], line["path"], line["status"]) == (
        "/auth/sessions/{session_id}",
        "/auth/sessions/nope",
        404,
    )


async def test_no_token_password_or_query_string_is_logged(
    json_http: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    await register(json_http, EMAIL)
    token = (await login(json_http, EMAIL)).json()["access_token"]
    await json_http.get("/auth/me", headers=bearer(token))
    await json_http.get("/auth/events?limit=5&secret=sauce", headers=bearer(token))
    await json_http.post("/auth/logout", headers=bearer(token))
    lines = await access_lines(capsys, 5)
    text = "\n".join(lines)
    for secret in (token, PASSWORD, "sauce", EMAIL):
        assert secret not in text
    assert json.loads(lines[3])["path"] == "/auth/events"


async def test_a_hostile_path_stays_one_line_and_decodes_to_what_was_sent(
    json_http: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    sent = "/x\nforged line\x1b[2J\x9b\u2028\u202e"
    await json_http.get("/x%0Aforged%20line%1B[2J%C2%9B%E2%80%A8%E2%80%AE")
    [line] = await access_lines(capsys, 1)
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]", line)
    assert json.loads(line)["path"] == sent


async def test_the_text_format_is_one_escaped_line(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    app = create_app(replace(settings, log_format="text"))
    async with serving(app) as http:
        await http.get("/x%0AINFO:%20forged%1B[2J", headers={"X-Request-ID": "r-1"})
    [line] = await access_lines(capsys, 1)
    assert re.fullmatch(
        r"\S+Z INFO:     sparc\.access: 127\.0\.0\.1 GET /x\\nINFO: forged\\x1b\[2J 404 "
        r"\d+\.\dms route=- user_id=- request_id=r-1",
        line,
    ), line


async def test_the_client_is_the_address_trusted_proxies_tell(
    json_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    proxies = (ipaddress.ip_network("127.0.0.1/32"),)
    app = create_app(replace(json_settings, trusted_proxies=proxies))
    async with serving(app) as http:
        await http.get("/healthz", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7"})
    [line] = await access_records(capsys, 1)
    assert line["client"] == "203.0.113.7"


async def test_the_database_middlewares_503_and_a_500_are_logged_with_their_status(
    json_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    app = create_app(json_settings)
    add_failing_routes(app)
    async with serving(app, raise_app_exceptions=False) as http:
        await http.get("/auth/busy")
        await http.get("/boom")
    busy_line, boom_line = await access_records(capsys, 2)
    assert (busy_line["route"], busy_line["status"]) == ("/auth/busy", 503)
    assert (boom_line["route"], boom_line["status"]) == ("/boom", 500)


@pytest.mark.parametrize(
    "changes", [{"access_log": False}, {"log_level": "warning"}], ids=["off", "level-warning"]
)
async def test_no_line_when_the_access_log_is_off_or_the_level_above_info(
    json_settings: Settings, capsys: pytest.CaptureFixture[str], changes: dict[str, Any]
) -> None:
    app = create_app(replace(json_settings, **changes))
    async with serving(app) as http:
        for _ in range(3):
            assert (await http.get("/healthz")).status_code == 200
        # Something that does log, so the check below is not merely early.
        marker = create_app(json_settings)
        async with serving(marker) as logged:
            await logged.get("/healthz")
        [line] = await access_records(capsys, 1)
    assert line["path"] == "/healthz"


class Writes(io.StringIO):
    """A stdout that keeps what each flush wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())
        self.seek(0)
        self.truncate()

    def lines(self) -> list[str]:
        return "".join(self.flushed).splitlines()


def writes_to(monkeypatch: pytest.MonkeyPatch) -> Writes:
    """sys.stdout for the rest of the test, as a Writes. (Set in the test itself: pytest's own
    capture takes sys.stdout back between a fixture's setup and the test.)"""
    writes = Writes()
    monkeypatch.setattr(sys, "stdout", writes)
    return writes


def get(path: str, **more: Any) -> dict[str, Any]:
    """The scope of a GET of `path`, as the access log sees it."""
    return {"type": "http", "method": "GET", "path": path, **more}


async def test_a_busy_moment_is_written_in_whole_lines_of_at_most_a_pipe_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = writes_to(monkeypatch)
    # Under --workers N every worker writes to the same pipe: a write up to PIPE_BUF bytes is
    # never interleaved with another's, so no line is cut into by another worker's.
    access_log = AccessLog("json")
    scope = get("/é" * 50, client=("192.0.2.1", 1))
    for _ in range(100):  # in one turn of the loop
        access_log.request_answered(scope, 200, 0.001)
    # Whole batches at once, the last few (100 is no multiple of BATCH_LINES) a moment later.
    assert 100 - BATCH_LINES < len(stdout.lines()) < 100
    await poll_until(lambda: len(stdout.lines()) == 100)
    assert all(len(block.encode()) <= ATOMIC_WRITE for block in stdout.flushed)
    assert all(block.endswith("\n") for block in stdout.flushed)
    lines = stdout.lines()
    assert all(json.loads(line)["path"] == "/é" * 50 for line in lines)


async def test_a_lone_line_is_written_within_the_flush_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = writes_to(monkeypatch)
    access_log = AccessLog("json")
    access_log.request_answered(get("/x"), 204, 0.001)
    started = time.monotonic()
    await asyncio.sleep(0)  # a turn of the loop later, it still waits for company
    assert stdout.flushed == []
    await poll_until(lambda: bool(stdout.flushed))
    assert time.monotonic() - started < FLUSH_SECONDS + 1  # a second's slack for a busy machine
    [line] = stdout.lines()
    assert (json.loads(line)["path"], json.loads(line)["status"]) == ("/x", 204)


async def test_lines_still_waiting_are_written_at_shutdown(
    json_settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access_log_module, "FLUSH_SECONDS", 60)  # only the shutdown writes it
    app = create_app(json_settings)
    async with serving(app) as http:
        await http.get("/healthz", headers={"X-Request-ID": "last-one"})
        assert capsys.readouterr().out == ""
    [line] = [json.loads(each) for each in capsys.readouterr().out.splitlines()]
    assert (line["path"], line["request_id"]) == ("/healthz", "last-one")


async def test_after_close_each_line_is_written_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    stdout = writes_to(monkeypatch)
    # A request cancelled at the end of the grace period ends after the lifespan's close():
    # no later batch, and no timer, would come for it.
    access_log = AccessLog("json")
    access_log.close()
    access_log.request_answered(get("/late"), 503, 0.5)
    [line] = stdout.lines()
    assert json.loads(line)["path"] == "/late"


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
@pytest.mark.parametrize("first_loop_ends", ["closed", "stopped"])
def test_a_line_noted_under_a_loop_that_is_gone_is_written_under_the_next(
    monkeypatch: pytest.MonkeyPatch,
    new_loop: Callable[[], asyncio.AbstractEventLoop],
    first_loop_ends: str,
) -> None:
    stdout = writes_to(monkeypatch)
    # An app served by one event loop after another (tests, embedders): the first loop closed,
    # or only stopped (run_until_complete), before its timer ran; the next loop's line must not
    # wait for a timer that does not come.
    access_log = AccessLog("json")

    async def answer(path: str) -> None:
        access_log.request_answered(get(path), 200, 0.0)

    async def answer_and_wait() -> None:
        await answer("/second")
        await poll_until(lambda: bool(stdout.flushed))

    first, second = new_loop(), new_loop()
    try:
        first.run_until_complete(answer("/first"))
        if first_loop_ends == "closed":
            first.close()
        assert stdout.flushed == []
        second.run_until_complete(answer_and_wait())
    finally:
        first.close()
        second.close()
    paths = [json.loads(line)["path"] for line in stdout.lines()]
    assert paths == ["/first", "/second"]


async def test_each_text_line_of_a_batch_names_its_own_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = writes_to(monkeypatch)
    access_log = AccessLog("text")
    for n in range(3):
        scope = get("/x", **{REQUEST_ID_SCOPE_KEY: f"r-{n}"})
        access_log.request_answered(scope, 200, 0.001)
    await poll_until(lambda: bool(stdout.flushed))
    [batch] = stdout.flushed  # the three in one write
    ids = [line.rsplit(" ", 1)[1] for line in batch.splitlines()]
    assert ids == ["request_id=r-0", "request_id=r-1", "request_id=r-2"]


async def test_long_made_up_paths_are_not_kept(capsys: pytest.CaptureFixture[str]) -> None:
    # The escaped parts of a line are kept per path: a client sending long made-up ones must
    # not pin memory (the server takes a request line of megabytes).
    access_log = AccessLog("json")
    long_path = "/" + "x" * 100_000
    for status in (404, 405):
        access_log.request_answered(get(long_path), status, 0)
    access_log.request_answered(get("/short"), 404, 0)
    access_log.flush()
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["path"] for line in lines] == [long_path, long_path, "/short"]
    assert sum(len(part) for parts in access_log._fixed.values() for part in parts) < 1000


async def test_a_batch_of_text_lines_beyond_ascii_is_written_in_whole_lines_of_a_pipe_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = writes_to(monkeypatch)
    # A text line keeps what is beyond ASCII: a write's size is counted in bytes, not letters.
    access_log = AccessLog("text")
    path = "/" + "é" * 300  # 601 bytes of path in a line, so 12 lines outgrow ATOMIC_WRITE
    for n in range(BATCH_LINES):
        access_log.request_answered(get(path, **{REQUEST_ID_SCOPE_KEY: f"r-{n}"}), 200, 0.001)
    assert len(stdout.flushed) > 1
    assert all(len(block.encode()) <= ATOMIC_WRITE for block in stdout.flushed)
    assert all(block.endswith("\n") for block in stdout.flushed)
    lines = stdout.lines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [f"request_id=r-{n}" for n in range(12)]
    assert all(f" GET {path} 200 " in line for line in lines)


async def test_another_apps_user_class_is_logged_by_its_identity_escaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = writes_to(monkeypatch)
    # An app that adds SPARC's layer to its own authentication: its users are Starlette's
    # BaseUser, whose identity is any text (SPARC's own user is a UUID).
    access_log = AccessLog("json")
    odd = 'ada "the first" \x1b[31m\u00e9'
    access_log.request_answered(get("/x", user=SimpleUser(odd)), 200, 0.001)
    access_log.request_answered(get("/x", user=UnauthenticatedUser()), 200, 0.001)
    access_log.flush()
    records = [json.loads(line) for line in stdout.lines()]
    assert [record["user_id"] for record in records] == [odd, None]
    assert all(line.isascii() for line in stdout.lines())


async def test_durations_print_as_milliseconds_with_three_decimals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = writes_to(monkeypatch)
    access_log = AccessLog("json")
    for seconds in (0, 0.0004, 0.012345, 0.999999, 1.0, 12.3456789):
        access_log.request_answered(get("/x"), 200, seconds)
    access_log.flush()
    # The JSON text itself, not only its value: "1.000", never 1.0 or 1e-06.
    durations = re.findall(r'"duration_ms":([^,]+),', "".join(stdout.flushed))
    assert durations == ["0.000", "0.400", "12.345", "999.999", "1000.000", "12345.678"]


class OddUser(BaseUser):
    """Another app's user: an identity that is no str, or one that raises."""

    def __init__(self, identity: object) -> None:
        self._identity = identity

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def identity(self) -> Any:
        if isinstance(self._identity, Exception):
            raise self._identity
        return self._identity


async def test_a_user_whose_identity_is_no_str_is_logged_by_its_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = writes_to(monkeypatch)
    access_log = AccessLog("json")
    access_log.request_answered(get("/x", user=OddUser(42)), 200, 0.001)
    access_log.flush()
    [line] = stdout.lines()
    assert json.loads(line)["user_id"] == "42"


async def test_a_line_that_cannot_be_made_loses_no_other_and_fails_no_request(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stdout = writes_to(monkeypatch)
    access_log = AccessLog("json")
    broken = get("/broken", user=OddUser(RuntimeError("no identity")))
    broken[REQUEST_ID_SCOPE_KEY] = "the-broken-one"
    # A whole batch, the broken line in its middle: the request that fills it is not failed.
    for n in range(BATCH_LINES):
        access_log.request_answered(broken if n == 5 else get(f"/ok/{n}"), 200, 0.001)
    paths = [json.loads(line)["path"] for line in stdout.lines()]
    assert paths == [f"/ok/{n}" for n in range(BATCH_LINES) if n != 5]
    [record] = [r for r in caplog.records if r.name == "sparc.access_log"]
    assert "the-broken-one" in record.getMessage()
    assert record.exc_info is not None
