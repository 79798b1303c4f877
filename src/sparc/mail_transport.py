"""How a built mail leaves: an SMTP server (SPARC_SMTP_URL) or .eml files under the data dir.

- `smtp://host:25`: a local relay, plain SMTP (a relay's self-signed certificate would fail
  the check below); `smtp://user:pass@host:587`: STARTTLS required before the password is sent;
  `smtps://user:pass@host:465`: TLS from the first byte. Certificates are checked against the
  system's trust store.
- No SPARC_SMTP_URL: each mail is written to SPARC_DATA_DIR/mail/ as an .eml file and the log
  names the file, so a fresh `sparc serve` can run every mail flow without a mail server.

Errors are DeliveryFailed, whose message never holds the SMTP password.
"""

from __future__ import annotations

import logging
import os
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib
import anyio
import anyio.to_thread

from sparc.settings import Settings

logger = logging.getLogger("sparc.mail")

SMTP_PORT = 25
SMTPS_PORT = 465


class DeliveryFailed(Exception):
    """A mail did not leave. `permanent`: the server refused it for good (5xx), so retrying is
    pointless."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class MailTransport(Protocol):
    description: str  # for the log: where mail goes (no password)

    async def deliver(self, message: EmailMessage, *, message_id: uuid.UUID) -> None: ...


class SmtpTransport:
    """One SMTP connection per mail, through aiosmtplib, every step bounded by `timeout`."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urlsplit(url)
        self.hostname = parts.hostname or "localhost"
        self.use_tls = parts.scheme == "smtps"
        self.port = parts.port or (SMTPS_PORT if self.use_tls else SMTP_PORT)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self.timeout = timeout
        user = f"{self._username}@" if self._username else ""
        self.description = f"{parts.scheme}://{user}{self.hostname}:{self.port}"

    def __repr__(self) -> str:
        return f"SmtpTransport({self.description!r})"

    async def deliver(self, message: EmailMessage, *, message_id: uuid.UUID) -> None:
        try:
            await aiosmtplib.send(
                message,
                hostname=self.hostname,
                port=self.port,
                username=self._username,
                password=self._password,
                use_tls=self.use_tls,
                # A password never crosses the wire in clear; a bare relay speaks plain SMTP.
                start_tls=not self.use_tls and self._username is not None,
                timeout=self.timeout,
            )
        except aiosmtplib.SMTPException as exc:
            raise DeliveryFailed(
                f"{self.description}: {self._scrub(str(exc))}", permanent=_is_permanent(exc)
            ) from None
        except OSError as exc:  # DNS, TLS and socket errors that aiosmtplib lets through
            raise DeliveryFailed(f"{self.description}: {self._scrub(str(exc))}") from None

    def _scrub(self, text: str) -> str:
        # Belt and braces: no server echo or library message may carry the password on.
        return text.replace(self._password, "***") if self._password else text


def _is_permanent(exc: aiosmtplib.SMTPException) -> bool:
    """A 5xx answer to the mail itself (not to our login, which an operator can fix)."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return False
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(refused.code >= 500 for refused in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 500


class FileTransport:
    """Each mail as `<queued id>.eml` in `directory`, written whole or not at all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.description = f"files in {directory}"

    async def deliver(self, message: EmailMessage, *, message_id: uuid.UUID) -> None:
        path = self.directory / f"{message_id}.eml"
        try:
            await anyio.to_thread.run_sync(_write_whole, path, bytes(message))
        except OSError as exc:
            raise DeliveryFailed(f"could not write {path}: {exc}") from None
        logger.info("mail %s (%s) written to %s", message_id, message["Subject"], path)


def _write_whole(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(data)
    os.replace(partial, path)  # a reader never sees half a mail


def transport_for(settings: Settings) -> MailTransport:
    if settings.smtp_url is None:
        return FileTransport(settings.data_dir / "mail")
    return SmtpTransport(settings.smtp_url, timeout=settings.smtp_timeout)
