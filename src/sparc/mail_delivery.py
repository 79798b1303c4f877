"""The delivery worker: sends what the outbox holds after commit, retrying through outages.

- Each `sparc serve` process runs one (`delivering_in_background`, in the app's lifespan). Every
  POLL_SECONDS it asks one cheap indexed question (is anything due?); when something is, it
  claims up to BATCH_SIZE rows in one statement (sparc.outbox.claim: FOR UPDATE SKIP LOCKED,
  then a lease), and that connection goes back to the pool before any SMTP is spoken. While
  the pool has no idle connection left, the worker skips its round: requests come first.
- Each claimed mail is built (sparc.mail_messages), handed to the transport, and marked sent in
  a statement of its own. Several workers and instances never hold the same row at once.
- A failed attempt is due again after SPARC_MAIL_RETRY_DELAY, doubling each time up to
  RETRY_CAP_FACTOR times it; after MAX_ATTEMPTS (about 51 minutes of retries with the default
  delay of 1 min) the row is marked failed and the failure is logged. A 5xx refusal of the mail
  itself, or a template that cannot render, fails it at once.
- At least once: a process that dies after the server took a mail but before marking it sent
  leaves the row leased; once the lease ends, a worker sends it again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import NoReturn

import anyio
import jinja2

from sparc import outbox
from sparc.database import DatabaseClient, DatabaseUnavailable
from sparc.mail_messages import MailBuilder, TemplateMissing
from sparc.mail_transport import DeliveryFailed, MailTransport, transport_for
from sparc.outbox import OutboxMessage
from sparc.settings import Settings

logger = logging.getLogger("sparc.mail")

# An idle worker asks whether anything is due this often: delivery starts within it of commit.
POLL_SECONDS = 0.25
BATCH_SIZE = 10
MAX_ATTEMPTS = 7
# The longest wait between two attempts, as a multiple of SPARC_MAIL_RETRY_DELAY.
RETRY_CAP_FACTOR = 20
# One delivery may take this many SMTP timeouts in all (connect, TLS, login, commands) ...
DELIVERY_TIMEOUTS = 6
# ... and a claim's lease outlasts that by this much, so no other worker takes a row mid-send.
LEASE_MARGIN_SECONDS = 30.0
DELIVERY_TASK_NAME = "sparc mail delivery"


class MailEvents:
    """Does nothing here: subclass it (as sparc.metrics.Metrics does) to record deliveries."""

    def mail_queued(self, kind: str) -> None: ...
    def mail_sent(self, kind: str, seconds: float) -> None: ...
    def mail_retried(self, kind: str) -> None: ...
    def mail_failed(self, kind: str) -> None: ...


def retry_delay(attempts: int, base: float) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: base, 2 base, 4 base, ... capped."""
    return float(min(base * 2 ** (attempts - 1), base * RETRY_CAP_FACTOR))


class MailDelivery:
    """Claims due outbox rows, sends them, and marks each sent, retried or failed."""

    def __init__(
        self,
        client: DatabaseClient,
        settings: Settings,
        *,
        transport: MailTransport | None = None,
        builder: MailBuilder | None = None,
        events: MailEvents | None = None,
        poll_interval: float = POLL_SECONDS,
    ) -> None:
        self.client = client
        self.transport = transport or transport_for(settings)
        self.builder = builder or MailBuilder(settings)
        self.events = events or MailEvents()
        self.poll_interval = poll_interval
        self.retry_base = settings.mail_retry_delay
        self.delivery_timeout = DELIVERY_TIMEOUTS * settings.smtp_timeout
        self.lease = self.delivery_timeout + LEASE_MARGIN_SECONDS

    def _pool_has_room(self) -> bool:
        """An idle pooled connection, or room to open one, and nobody waiting for either."""
        stats = self.client.pool_stats()
        return stats.waiting == 0 and (stats.idle > 0 or stats.size < stats.max)

    async def anything_due(self) -> bool:
        due: bool = await self.client.fetch_val(
            """
            SELECT EXISTS (SELECT 1 FROM mail_outbox WHERE sent_at IS NULL AND failed_at IS NULL
                           AND next_attempt_at <= clock_timestamp())
            """
        )
        return due

    async def deliver_due(self) -> int:
        """Claim one batch of due mail and deliver it; how many rows were claimed."""
        claimed = await outbox.claim(self.client, limit=BATCH_SIZE, lease=self.lease)
        async with anyio.create_task_group() as group:
            for message in claimed:
                group.start_soon(self._deliver_apart, message)
        return len(claimed)

    async def _deliver_apart(self, message: OutboxMessage) -> None:
        # One mail's trouble must not cancel the others of its batch.
        try:
            await self.deliver(message)
        except DatabaseUnavailable as exc:
            logger.warning(
                "mail %s: its outcome was not recorded (sent again once its lease ends): %s",
                message.id,
                exc,
            )
        except Exception:
            logger.exception("mail %s: delivery failed unexpectedly", message.id)

    async def deliver(self, message: OutboxMessage) -> None:
        """One attempt at one claimed row; the row is marked whatever happens."""
        if message.attempts == 1:
            self.events.mail_queued(message.kind)
        try:
            mail = self.builder.build(message)
        except (TemplateMissing, jinja2.TemplateError) as exc:
            await self._give_up(message, f"the mail could not be built: {exc}")
            return
        try:
            with anyio.fail_after(self.delivery_timeout):
                await self.transport.deliver(mail, message_id=message.id)
        except DeliveryFailed as exc:
            await self._failed(message, str(exc), permanent=exc.permanent)
            return
        except TimeoutError:
            await self._failed(message, f"no end within {self.delivery_timeout:g} s")
            return
        seconds = await outbox.mark_sent(self.client, message.id)
        if seconds is not None:
            self.events.mail_sent(message.kind, seconds)

    async def _failed(self, message: OutboxMessage, error: str, *, permanent: bool = False) -> None:
        if permanent or message.attempts >= MAX_ATTEMPTS:
            await self._give_up(message, error)
            return
        delay = retry_delay(message.attempts, self.retry_base)
        logger.warning(
            "mail %s (%s): attempt %d failed, next in %g s: %s",
            message.id,
            message.kind,
            message.attempts,
            delay,
            error,
        )
        await outbox.mark_retry(self.client, message.id, delay=delay, error=error)
        self.events.mail_retried(message.kind)

    async def _give_up(self, message: OutboxMessage, error: str) -> None:
        logger.error(
            "mail %s (%s) failed after %d attempts, not retried: %s",
            message.id,
            message.kind,
            message.attempts,
            error,
        )
        await outbox.mark_failed(self.client, message.id, error=error)
        self.events.mail_failed(message.kind)

    async def run(self) -> NoReturn:
        """Deliver for ever: poll, claim, send. A database outage is logged once and waited out."""
        logger.info("mail delivery to %s", self.transport.description)
        database_down = False
        while True:
            claimed = 0
            try:
                if self._pool_has_room() and await self.anything_due():
                    claimed = await self.deliver_due()
            except DatabaseUnavailable as exc:
                if not database_down:
                    logger.warning("mail delivery waits for the database: %s", exc)
                database_down = True
            except Exception:
                # Delivery must not end for the life of the process over one bad round.
                logger.exception("mail delivery round failed")
            else:
                if database_down:
                    logger.info("mail delivery resumed: the database answers again")
                database_down = False
            if claimed < BATCH_SIZE:  # a full batch: more may be due right now
                await anyio.sleep(self.poll_interval)


@contextlib.asynccontextmanager
async def delivering_in_background(delivery: MailDelivery) -> AsyncIterator[None]:
    """Run `delivery` while the block runs (the app's lifespan). At its end a delivery in flight
    is cancelled; its row stays leased and is sent again once the lease ends."""
    async with anyio.create_task_group() as group:
        group.start_soon(delivery.run, name=DELIVERY_TASK_NAME)
        try:
            yield
        finally:
            group.cancel_scope.cancel()
