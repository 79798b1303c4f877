"""Debian programs the tests run (pgbouncer, nginx, systemd-analyze): found, skipped or failed."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest


def debian_program(name: str, *, package: str, require_variable: str) -> str:
    """The path of `name`; skips the test when it is not installed, or fails it when
    `require_variable` is set (CI installs the package and sets it)."""
    # Debian installs daemons in /usr/sbin, which a non-root PATH often lacks.
    candidates = (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}")
    found = next((path for path in candidates if path and os.access(path, os.X_OK)), None)
    if found is None:
        message = f"{name} is not installed (Debian: apt-get install {package})"
        if os.environ.get(require_variable):
            pytest.fail(message)
        pytest.skip(message)
    return found


@contextlib.contextmanager
def running_program(
    command: Sequence[str], *, port: int, log: Path, within: float
) -> Iterator[None]:
    """Run a server in the foreground until the block ends, entering the block once it accepts
    connections on `port`; fail with its `log` if it exits first or `within` seconds pass."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_until_listening(process, Path(command[0]).name, port, log, within)
        yield
    finally:
        process.terminate()
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def _wait_until_listening(
    process: subprocess.Popen[str], name: str, port: int, log: Path, within: float
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _, stderr = process.communicate()
            shown = log.read_text() if log.exists() else ""
            raise AssertionError(f"{name} exited with {process.returncode}: {stderr}{shown}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} did not start listening within {within:g} s")
