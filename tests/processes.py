"""Real `sparc` processes for tests: start, poll, signal, and a fresh empty database."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

# What starts a record in SPARC's text log format (sparc.logs): the time, a level, a colon, the
# padding. A line that does not is part of a record's traceback, indented.
LOG_RECORD_START = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL):\s+\S"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def sparc_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "TEST_DATABASE_URL"}}
    # The text format, which the tests read line by line, although stderr is no terminal here
    # (JSON would be the default); tests of the JSON format ask for it.
    env["SPARC_LOG_FORMAT"] = "text"
    env.update(overrides)
    return env


def poll(url: str, *, process: subprocess.Popen[str], timeout: float = 60) -> httpx.Response:
    """GET `url` until it answers 200, while the server process is alive."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _, stderr = process.communicate()
            raise AssertionError(f"sparc exited early with {process.returncode}: {stderr}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{url} never answered 200: {last}")


def stop(process: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM) -> tuple[int, str]:
    """Signal the server, wait for it to exit; its exit code and what it wrote to stderr."""
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    return process.returncode, stderr


def stop_with_output(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """`stop` for a server started with `capture_stdout`: its exit code, stdout and stderr."""
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    return process.returncode, stdout, stderr


def postgres_processes_using(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "postgres" in (process.info["name"] or "") and str(data_dir) in cmdline:
            found.append(process)
    return found


def start_serve(
    env: dict[str, str], *args: str, cwd: Path, capture_stdout: bool = False
) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process = start_sparc(
        "serve", "--port", str(port), *args, env=env, cwd=cwd, capture_stdout=capture_stdout
    )
    return process, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serving_ready(env: dict[str, str], *, cwd: Path) -> Iterator[str]:
    """`sparc serve` started and answering /readyz; its base URL; stopped (SIGTERM) after."""
    process, base = start_serve(env, cwd=cwd)
    try:
        poll(f"{base}/readyz", process=process)
        yield base
    finally:
        if process.poll() is None:
            stop(process)


def start_sparc(
    *args: str, env: dict[str, str], cwd: Path, capture_stdout: bool = False
) -> subprocess.Popen[str]:
    """Start a `sparc` command without waiting for it; what it logs is on its stderr, its access
    log on its stdout (kept with `capture_stdout`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "sparc", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_sparc(
    *args: str,
    env: dict[str, str],
    cwd: Path | None = None,
    timeout: float = 120,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a `sparc` command to its end, `stdin` its input (none: an empty one); its exit code
    and output."""
    return subprocess.run(
        [sys.executable, "-m", "sparc", *args],
        env=env,
        cwd=cwd,
        input=stdin or "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )
