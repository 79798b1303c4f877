"""Mail from `sparc serve` as shipped: with no SPARC_SMTP_URL the whole reset flow runs on the
.eml files it writes under SPARC_DATA_DIR/mail/; bad mail settings stop it at startup."""

from __future__ import annotations

import email
import email.policy
import time
from email.message import EmailMessage
from pathlib import Path
from typing import cast

import httpx

from tests.processes import poll, run_sparc, sparc_env, start_serve, stop
from tests.smtp import token_in


def wait_for_mail(
    directory: Path, subject: str, *, within: float = 30.0
) -> tuple[Path, EmailMessage]:
    """The first .eml file in `directory` with this subject, once there is one (polled)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for path in sorted(directory.glob("*.eml")):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            if message["Subject"] == subject:
                return path, cast(EmailMessage, message)
        time.sleep(0.05)
    raise AssertionError(f"no mail {subject!r} in {directory} after {within} s")


def test_serve_without_smtp_runs_the_reset_flow_through_eml_files(
    cli_database: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    env = sparc_env(DATABASE_URL=cli_database, SPARC_DATA_DIR=str(data_dir))
    process, base = start_serve(env, cwd=tmp_path)
    try:
        poll(f"{base}/readyz", process=process)
        account = {"email": "files@example.org", "password": "long enough words"}
        assert httpx.post(f"{base}/auth/register", json=account).status_code == 201
        asked = httpx.post(f"{base}/auth/password-reset", json={"email": account["email"]})
        assert asked.status_code == 202
        path, mail = wait_for_mail(data_dir / "mail", "Reset your password")
        confirmed = httpx.post(
            f"{base}/auth/password-reset/confirm",
            json={"token": token_in(mail), "new_password": "another long passphrase"},
        )
        assert confirmed.status_code == 204
        login = httpx.post(
            f"{base}/auth/login",
            json={"email": account["email"], "password": "another long passphrase"},
        )
        assert login.status_code == 200
        wait_for_mail(data_dir / "mail", "Your password was changed")
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
    assert f"written to {path}" in stderr


def test_serve_refuses_a_template_that_does_not_compile(tmp_path: Path) -> None:
    (tmp_path / "password_reset.txt").write_text("{% if token %}never closed\n")
    result = run_sparc("serve", env=sparc_env(SPARC_MAIL_TEMPLATES=str(tmp_path)), cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "SPARC_MAIL_TEMPLATES" in line and "password_reset.txt" in line
