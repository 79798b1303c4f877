"""A real SMTP server for tests (aiosmtpd), collecting what it is sent; it can stop and start
again on the same port, as a mail server in an outage would."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import threading
from email.message import EmailMessage
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from aiosmtpd.controller import Controller

from tests.processes import free_port


class CollectingHandler:
    """Keeps every mail it accepts; refuses recipients in `refused` with a 550."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.refused: set[str] = set()
        # While cleared, a mail is kept but not acknowledged: the client waits for the 250.
        self.acknowledging = threading.Event()
        self.acknowledging.set()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refused:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append(cast(EmailMessage, message))
        await asyncio.to_thread(self.acknowledging.wait)
        return "250 Message accepted for delivery"


class SmtpServer:
    """An aiosmtpd server on 127.0.0.1 at a fixed port, started and stopped at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.handler = CollectingHandler()
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    @property
    def messages(self) -> list[EmailMessage]:
        return self.handler.messages

    def start(self, **options: Any) -> None:
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, **options)
        self._controller.start()

    def stop(self) -> None:
        self.handler.acknowledging.set()  # a held mail's thread must end for the loop to close
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


def text_of(message: EmailMessage, subtype: str = "plain") -> str:
    part = message.get_body(preferencelist=(subtype,))
    assert part is not None, f"no text/{subtype} part"
    return cast(str, cast(EmailMessage, part).get_content())


_LINK = re.compile(r"https?://\S+\?token=\S+")


def link_in(message: EmailMessage) -> str:
    """The link of a reset or verification mail (from its plain-text part)."""
    found = _LINK.search(text_of(message))
    assert found is not None, text_of(message)
    return found.group(0)


def token_in(message: EmailMessage) -> str:
    """The token a reset or verification mail carries, read from its link; the raw code the
    mail also shows must be the same."""
    token = parse_qs(urlsplit(link_in(message)).query)["token"][0]
    assert token in text_of(message).split()
    assert token in text_of(message, "html")
    return token


def with_subject(server: SmtpServer, subject: str) -> list[EmailMessage]:
    return [message for message in server.messages if message["Subject"] == subject]
