"""The mail figures: delay from commit to delivery, and what an SMTP outage does.

    python -m bench.mail_outage [--database-url URL] [--messages 50] [--outage 60]
                                [--rate 2] [--retry-delay 60]

Runs SPARC under uvicorn (one worker, as `sparc serve` does) mailing to a real SMTP server
(aiosmtpd) in this process. Each registration queues a verification mail in its transaction.

1. Delay: `--messages` registrations one after another; for each, the time from its 201
   (the transaction has committed) to the SMTP server having the whole mail. Median, p95, max.
2. Outage: the SMTP server stops; for `--outage` seconds, `--rate` registrations a second; then
   a server starts again on the same port. Reports the mails queued, the failed attempts that
   were retried (sparc_mail_retries_total), the mails delivered, duplicates, and the mails
   lost, waiting up to 20 retry delays for the last one.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import statistics
import threading
import time
import uuid
from typing import Any

import httpx
from aiosmtpd.controller import Controller
from prometheus_client.parser import text_string_to_metric_families

from bench.common import database, free_port, percentile, server


class Arrivals:
    """An SMTP handler noting when each recipient's mail arrived (monotonic clock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.at: dict[str, list[float]] = {}

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.at.setdefault(str(message["To"]), []).append(time.monotonic())
        return "250 OK"

    def first(self, recipient: str) -> float | None:
        with self.lock:
            times = self.at.get(recipient)
            return times[0] if times else None


def start_smtp(arrivals: Arrivals, port: int) -> Controller:
    controller = Controller(arrivals, hostname="127.0.0.1", port=port)
    controller.start()
    return controller


def register(http: httpx.Client, address: str) -> None:
    response = http.post(
        "/auth/register", json={"email": address, "password": "benchmark password"}
    )
    response.raise_for_status()


def mail_counter(http: httpx.Client, name: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def wait_for(condition: Any, within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def measure_delay(http: httpx.Client, arrivals: Arrivals, run: str, messages: int) -> None:
    delays = []
    for n in range(messages):
        address = f"delay-{run}-{n}@example.org"
        register(http, address)
        committed = time.monotonic()
        if not wait_for(lambda a=address: arrivals.first(a) is not None, within=30):
            raise SystemExit(f"{address}: no mail within 30 s")
        delays.append((arrivals.first(address) or committed) - committed)
    ms = [delay * 1000 for delay in delays]
    print(
        f"commit -> delivery over {messages} mails: median {statistics.median(ms):.0f} ms,"
        f" p95 {percentile(ms, 0.95):.0f} ms, max {max(ms):.0f} ms"
    )


def measure_outage(
    http: httpx.Client,
    arrivals: Arrivals,
    smtp: list[Controller],
    run: str,
    *,
    outage: float,
    rate: float,
    retry_delay: float,
    port: int,
) -> None:
    retries_before = mail_counter(http, "sparc_mail_retries_total")
    smtp.pop().stop()
    queued: list[str] = []
    started = time.monotonic()
    while time.monotonic() - started < outage:
        address = f"outage-{run}-{len(queued)}@example.org"
        register(http, address)
        queued.append(address)
        time.sleep(max(0.0, started + len(queued) / rate - time.monotonic()))
    smtp.append(start_smtp(arrivals, port))  # a server again, on the same port
    back = time.monotonic()
    delivered = wait_for(
        lambda: all(arrivals.first(a) is not None for a in queued), within=20 * retry_delay
    )
    last = max((arrivals.first(a) or back) for a in queued)
    with arrivals.lock:
        duplicates = sum(len(arrivals.at.get(a, [])) - 1 for a in queued if a in arrivals.at)
        arrived = sum(1 for a in queued if a in arrivals.at)
    retried = mail_counter(http, "sparc_mail_retries_total") - retries_before
    failed = mail_counter(http, "sparc_mail_failed_total")
    print(f"SMTP outage of {outage:g} s, {rate:g} mails/s queued during it:")
    print(f"  queued {len(queued)}, attempts retried {retried:.0f}, marked failed {failed:.0f}")
    print(
        f"  delivered {arrived}, duplicates {duplicates}, lost {len(queued) - arrived}"
        f"{'' if delivered else ' (gave up waiting)'}"
    )
    print(f"  the last mail arrived {last - back:.1f} s after the server was back")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", help="a throwaway database (default: embedded)")
    parser.add_argument("--messages", type=int, default=50, help="mails timed one by one (50)")
    parser.add_argument("--outage", type=float, default=60.0, help="SMTP down for, s (60)")
    parser.add_argument("--rate", type=float, default=2.0, help="mails/s during it (2)")
    parser.add_argument(
        "--retry-delay", type=float, default=60.0, help="SPARC_MAIL_RETRY_DELAY, s (60)"
    )
    args = parser.parse_args()
    arrivals = Arrivals()
    port = free_port()
    smtp = [start_smtp(arrivals, port)]
    run = uuid.uuid4().hex[:8]
    try:
        with database(args.database_url) as url:
            env = {
                "DATABASE_URL": url,
                "SPARC_SMTP_URL": f"smtp://127.0.0.1:{port}",
                "SPARC_MAIL_RETRY_DELAY": str(args.retry_delay),
                "SPARC_REGISTRATION_IP_MAX": "100000",
            }
            with (
                server("sparc.app:create_app", env) as base,
                httpx.Client(base_url=base, timeout=30) as http,
            ):
                measure_delay(http, arrivals, run, args.messages)
                measure_outage(
                    http,
                    arrivals,
                    smtp,
                    run,
                    outage=args.outage,
                    rate=args.rate,
                    retry_delay=args.retry_delay,
                    port=port,
                )
    finally:
        for controller in smtp:
            controller.stop()


if __name__ == "__main__":
    main()
