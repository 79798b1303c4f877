"""How `sparc loadtest` shows itself: a live line while it runs, then a report or JSON."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from sparc.loadtest import Report, Tally, run_loadtest
from sparc.settings import Settings


def _progress_table(tally: Tally, duration: float) -> Table:
    elapsed = max(time.monotonic() - tally.started, 1e-9)
    table = Table.grid(padding=(0, 2))
    table.add_row(
        f"[bold]{min(elapsed, duration):5.1f}/{duration:g} s[/]",
        f"{tally.requests} requests",
        f"[cyan]{tally.requests / elapsed:,.0f} req/s[/]",
        f"[red]{tally.errors} errors[/]" if tally.errors else "0 errors",
        f"connections {tally.connections_now} (peak {tally.peak_connections})",
    )
    return table


def run_with_display(args: argparse.Namespace, database_settings: Settings) -> Report:
    # With --json, stdout carries the JSON alone; the live line goes to stderr, if a terminal.
    console = Console(stderr=args.json)
    live = Live(console=console, auto_refresh=False, transient=True)
    show_live = console.is_terminal

    def on_progress(tally: Tally) -> None:
        if show_live:
            live.update(_progress_table(tally, args.duration), refresh=True)

    with live if show_live else contextlib.nullcontext():
        report = asyncio.run(
            run_loadtest(
                url=args.url,
                database_settings=database_settings,
                concurrency=args.concurrency,
                duration=args.duration,
                login_ratio=args.login_ratio,
                on_progress=on_progress,
            )
        )
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        _print_report(console, report)
    return report


def _print_report(console: Console, report: Report) -> None:
    table = Table(title=f"sparc loadtest of {report.url}", show_header=False)
    table.add_row("clients", str(report.concurrency))
    table.add_row("duration", f"{report.duration_seconds:.1f} s")
    table.add_row("requests", f"{report.requests:,}")
    table.add_row("throughput", f"{report.requests_per_second:,.1f} req/s")
    latency = report.latency_ms
    table.add_row(
        "latency", f"p50 {latency['p50']} ms, p95 {latency['p95']} ms, p99 {latency['p99']} ms"
    )
    table.add_row(
        "statuses", ", ".join(f"{code}: {n:,}" for code, n in report.status_counts.items())
    )
    if report.transport_errors:
        table.add_row("no answer", f"[red]{report.transport_errors:,}[/]")
    bound_style = "red" if report.bound_exceeded else "green"
    table.add_row(
        "server connections",
        f"[{bound_style}]peak {report.peak_connections} of a bound of {report.connection_bound}[/] "
        f"({report.connection_samples} samples)",
    )
    if report.unexpected_5xx:
        table.add_row("5xx other than 503", f"[red]{report.unexpected_5xx:,}[/]")
    table.add_row("verdict", "[green]passed[/]" if report.passed else "[red]failed[/]")
    console.print(table)
