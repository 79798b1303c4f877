"""Mails built from templates: both parts, links from SPARC_PUBLIC_URL, HTML escaped, shipped
templates replaced one by one from SPARC_MAIL_TEMPLATES."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import pytest

from sparc import outbox
from sparc.mail_messages import MailBuilder, TemplateMissing, human_duration
from sparc.outbox import OutboxMessage
from sparc.settings import Settings, SettingsError
from tests.smtp import text_of


def queued(kind: str, recipient: str = "ada@example.org", **context: object) -> OutboxMessage:
    return OutboxMessage(uuid.uuid4(), kind, recipient, dict(context), 1, datetime.now(UTC))


def test_a_reset_mail_has_text_and_html_with_the_link_and_the_code() -> None:
    settings = Settings(public_url="https://app.example.org", password_reset_ttl=1800)
    message = queued(outbox.PASSWORD_RESET, token="abc-123_XYZ")
    mail = MailBuilder(settings).build(message)
    link = "https://app.example.org/reset-password?token=abc-123_XYZ"
    assert mail["Subject"] == "Reset your password"
    assert mail["From"] == "SPARC <sparc@localhost>"
    assert mail["Message-ID"] == f"<{message.id}@localhost>"
    for subtype in ("plain", "html"):
        assert link in text_of(mail, subtype) and "30 minutes" in text_of(mail, subtype)


def test_html_is_escaped_and_text_is_not() -> None:
    mail = MailBuilder(Settings()).build(queued(outbox.PASSWORD_CHANGED, "<b>x</b>@example.org"))
    assert "&lt;b&gt;x&lt;/b&gt;@example.org" in text_of(mail, "html")
    assert "<b>x</b>@example.org" in text_of(mail)


def test_a_template_in_sparc_mail_templates_replaces_the_shipped_one(tmp_path: Path) -> None:
    (tmp_path / "password_changed.subject.txt").write_text("Security notice for {{ recipient }}")
    builder = MailBuilder(replace(Settings(), mail_templates=tmp_path))
    builder.check_templates()
    mail = builder.build(queued(outbox.PASSWORD_CHANGED))
    assert mail["Subject"] == "Security notice for ada@example.org"
    assert "was changed" in text_of(mail)  # the body is still the shipped one


def test_a_template_using_an_unknown_name_fails_the_check(tmp_path: Path) -> None:
    (tmp_path / "verify_email.txt").write_text("{{ tokne }}\n")
    builder = MailBuilder(replace(Settings(), mail_templates=tmp_path))
    builder.check_templates()  # it compiles; only rendering finds the typo
    with pytest.raises(jinja2.UndefinedError, match="tokne"):
        builder.build(queued(outbox.VERIFY_EMAIL, token="t"))


def test_a_template_that_does_not_compile_is_a_settings_error(tmp_path: Path) -> None:
    (tmp_path / "password_reset.html").write_text("{% for %}")
    with pytest.raises(SettingsError, match=r"^SPARC_MAIL_TEMPLATES=.*password_reset\.html"):
        MailBuilder(replace(Settings(), mail_templates=tmp_path)).check_templates()


def test_an_unknown_kind_of_mail_has_no_template() -> None:
    with pytest.raises(TemplateMissing):
        MailBuilder(Settings()).build(queued("newsletter"))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(3600, "1 hour"), (86400, "1 day"), (5400, "90 minutes"), (45, "45 seconds"), (1, "1 second")],
)
def test_lifetimes_read_as_people_say_them(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text
