"""The numbers in deploy/ agree with SPARC's settings, and systemd accepts the units as written.

tests/test_deploy_topology.py runs the files; this checks the timeouts that only a fault would
show wrong (a stop that SIGKILLs requests in flight, nginx cutting a request SPARC would still
answer, a migration killed while it waits for the lock).
"""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import pytest
import uvicorn

from sparc.settings import Settings, load_settings
from tests.programs import debian_program
from tests.topology import (
    DEPLOY,
    SHIPPED_SPARC,
    SHIPPED_WORKING_DIRECTORY,
    deployed,
    environment_file,
    exec_start,
    installed_sparc,
    unit_values,
)

# CI installs systemd's tools and sets this, so a missing systemd-analyze fails there.
REQUIRE_SYSTEMD_ANALYZE_VARIABLE = "SPARC_REQUIRE_SYSTEMD_ANALYZE"
# What `sparc` exits with for a bad setting (README "Commands").
BAD_SETTING_EXIT_CODE = "2"


@pytest.fixture
def deployed_settings() -> Settings:
    """The settings deploy/systemd/sparc.env gives every instance (SPARC accepts them)."""
    return load_settings(environment_file((DEPLOY / "systemd" / "sparc.env").read_text()))


def service(unit: str) -> dict[str, str]:
    text = (DEPLOY / "systemd" / unit).read_text()
    return dict(unit_values(text, "Service"))


def seconds(text: str) -> float:
    """An nginx or systemd duration as these files write them: `40`, `60s`, `4s`."""
    match = re.fullmatch(r"(\d+)s?", text)
    assert match is not None, f"not a duration in seconds: {text!r}"
    return float(match[1])


def nginx_directive(name: str) -> str:
    site = (DEPLOY / "nginx" / "sparc.conf").read_text()
    (value,) = re.findall(rf"^\s*{name}\s+([^;]+);", site, re.MULTILINE)
    return str(value)


def pgbouncer_setting(name: str) -> str:
    config = configparser.ConfigParser()
    config.read_string((DEPLOY / "pgbouncer" / "pgbouncer.ini").read_text())
    value: str = config["pgbouncer"][name]
    return value


def test_the_instances_go_through_pgbouncer_and_trust_nginx(deployed_settings: Settings) -> None:
    assert deployed_settings.pgbouncer and deployed_settings.statement_cache_size == 0
    assert pgbouncer_setting("pool_mode") == "transaction"
    assert [str(network) for network in deployed_settings.trusted_proxies] == ["127.0.0.1/32"]


def test_systemd_waits_for_a_graceful_stop_before_it_kills(deployed_settings: Settings) -> None:
    unit = service("sparc@.service")
    assert unit["KillSignal"] == "SIGTERM"
    # Requests in flight get the grace, then the pool may take DB_CONNECT_TIMEOUT to close.
    longest_stop = deployed_settings.shutdown_grace + deployed_settings.connect_timeout
    assert seconds(unit["TimeoutStopSec"]) > longest_stop
    assert seconds(unit["TimeoutStopSec"]) > Settings().shutdown_grace + Settings().connect_timeout


def test_systemd_restarts_a_failed_instance_but_not_a_bad_setting() -> None:
    unit = service("sparc@.service")
    assert unit["Restart"] == "on-failure"
    assert unit["RestartPreventExitStatus"] == BAD_SETTING_EXIT_CODE


def test_the_migration_unit_outwaits_another_instances_migration(
    deployed_settings: Settings,
) -> None:
    unit = service("sparc-migrate.service")
    assert exec_start((DEPLOY / "systemd" / "sparc-migrate.service").read_text())[1:] == ["migrate"]
    assert seconds(unit["TimeoutStartSec"]) > deployed_settings.migration_lock_timeout


def test_nginx_waits_longer_than_sparc_takes_to_answer(deployed_settings: Settings) -> None:
    read_timeout = seconds(nginx_directive("proxy_read_timeout"))
    longest_wait = deployed_settings.pool_timeout + deployed_settings.command_deadline
    assert read_timeout > longest_wait
    assert read_timeout > deployed_settings.shutdown_grace


def test_nginx_closes_idle_upstream_connections_before_uvicorn_does() -> None:
    # sparc serve keeps uvicorn's keep-alive timeout.
    uvicorn_keep_alive = uvicorn.Config("sparc.app:create_app").timeout_keep_alive
    assert seconds(nginx_directive("keepalive_timeout")) < uvicorn_keep_alive


def test_nginx_passes_on_only_requests_it_has_not_sent() -> None:
    retried_on = nginx_directive("proxy_next_upstream").split()
    assert "non_idempotent" not in retried_on and "http_503" not in retried_on


def test_pgbouncer_gives_up_on_a_queued_transaction_about_when_sparc_would(
    deployed_settings: Settings,
) -> None:
    assert seconds(pgbouncer_setting("query_wait_timeout")) == deployed_settings.pool_timeout


def test_systemd_analyze_verifies_the_units_without_a_word(tmp_path: Path) -> None:
    analyze = debian_program(
        "systemd-analyze", package="systemd", require_variable=REQUIRE_SYSTEMD_ANALYZE_VARIABLE
    )
    # The units name /opt/sparc, which must exist for systemd to accept them: ours instead.
    replacements = {
        SHIPPED_SPARC: installed_sparc(),
        SHIPPED_WORKING_DIRECTORY: f"WorkingDirectory={tmp_path}",
    }
    # An instance of the template, as `systemctl start sparc@8001` would load it.
    names = {
        "sparc@.service": "sparc@8001.service",
        "sparc-migrate.service": "sparc-migrate.service",
    }
    for unit, name in names.items():
        (tmp_path / name).write_text(deployed(f"systemd/{unit}", replacements))
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / name) for name in names.values())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # It reports unknown keys and unparsable values without failing.
    assert result.stdout + result.stderr == ""
