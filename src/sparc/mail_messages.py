"""Mails built from templates: plain text and HTML (multipart/alternative), links and codes.

Each kind of mail (sparc.outbox.KINDS) is three templates: `<kind>.subject.txt`, `<kind>.txt`
and `<kind>.html`, Jinja2, HTML ones autoescaped. The shipped ones are in sparc/mail_templates/;
a file of the same name in SPARC_MAIL_TEMPLATES replaces one. Links point at SPARC_PUBLIC_URL,
the front end that handles them, with the raw code beside them for API clients.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any
from urllib.parse import urlencode

import jinja2

from sparc.outbox import KINDS, PASSWORD_RESET, VERIFY_EMAIL, OutboxMessage
from sparc.settings import Settings, SettingsError

# Where the front end takes each kind's token: <SPARC_PUBLIC_URL><path>?token=<token>.
LINK_PATHS = {PASSWORD_RESET: "/reset-password", VERIFY_EMAIL: "/verify-email"}


class TemplateMissing(Exception):
    """A kind of mail has no template of a needed name, shipped or overriding."""


def human_duration(seconds: float) -> str:
    """'1 hour', '1 day', '90 minutes', '45 seconds': for 'the link works for ...'."""
    whole = round(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if whole >= size and whole % size == 0:
            count = whole // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{whole} second{'s' if whole != 1 else ''}"


class MailBuilder:
    """Turns a claimed outbox row into an EmailMessage ready to send."""

    def __init__(self, settings: Settings) -> None:
        loaders: list[jinja2.BaseLoader] = [jinja2.PackageLoader("sparc", "mail_templates")]
        if settings.mail_templates is not None:
            loaders.insert(0, jinja2.FileSystemLoader(settings.mail_templates))
        self._templates = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=jinja2.select_autoescape(["html"], default_for_string=False),
            undefined=jinja2.StrictUndefined,  # a typo in a template fails, not a blank
            keep_trailing_newline=True,
        )
        self.settings = settings
        self._sender = parseaddr(settings.mail_from)
        self._ttls = {
            PASSWORD_RESET: settings.password_reset_ttl,
            VERIFY_EMAIL: settings.email_verify_ttl,
        }

    def check_templates(self) -> None:
        """Compile every template every kind needs, so a bad override stops `sparc serve` at
        startup (SettingsError naming SPARC_MAIL_TEMPLATES) rather than failing mail later."""
        for kind in KINDS:
            for name in _template_names(kind):
                try:
                    self._template(name)
                except (TemplateMissing, jinja2.TemplateError) as exc:
                    raise SettingsError(
                        f"SPARC_MAIL_TEMPLATES={str(self.settings.mail_templates)!r}: {name}: {exc}"
                    ) from None

    def context_for(self, message: OutboxMessage) -> dict[str, Any]:
        context: dict[str, Any] = {
            **message.context,
            "recipient": message.recipient,
            "public_url": self.settings.public_url,
            "queued_at": message.created_at.astimezone(UTC),
        }
        token = message.context.get("token")
        if message.kind in LINK_PATHS and isinstance(token, str):
            query = urlencode({"token": token})
            context["link"] = f"{self.settings.public_url}{LINK_PATHS[message.kind]}?{query}"
            context["valid_for"] = human_duration(self._ttls[message.kind])
        return context

    def build(self, message: OutboxMessage) -> EmailMessage:
        context = self.context_for(message)
        subject_name, text_name, html_name = _template_names(message.kind)
        subject = " ".join(self._template(subject_name).render(context).split())
        mail = EmailMessage()
        mail["Subject"] = subject
        mail["From"] = Address(self._sender[0], addr_spec=self._sender[1])
        mail["To"] = message.recipient
        mail["Date"] = format_datetime(_aware(message.created_at))
        # The same on every attempt: a receiver can drop the duplicate at-least-once may send.
        mail["Message-ID"] = _message_id(message.id, self._sender[1])
        mail.set_content(self._template(text_name).render(context))
        mail.add_alternative(self._template(html_name).render(context), subtype="html")
        return mail

    def _template(self, name: str) -> jinja2.Template:
        try:
            return self._templates.get_template(name)
        except jinja2.TemplateNotFound:
            raise TemplateMissing(f"no mail template {name!r}") from None


def _template_names(kind: str) -> tuple[str, str, str]:
    return f"{kind}.subject.txt", f"{kind}.txt", f"{kind}.html"


def _message_id(message_id: uuid.UUID, sender: str) -> str:
    domain = sender.rpartition("@")[2] or "localhost"
    return f"<{message_id}@{domain}>"


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.astimezone()
