"""``relay top``: a live view of a running relay, refreshed every second.

It reads the relay's ``/stats`` (the same figures as ``/metrics``) and shows per
source and endpoint the requests and events per second, budget use, data age
and the retention countdown; per sink events per second, pending, the oldest
pending age, the state (delivering, retrying, paused, breaker open) and the
last error; the journal's size and growth. Rates are the difference of two
snapshots over the time between them. On a terminal it redraws in place with
``rich``; otherwise (a pipe, a log) it prints plain lines, one block per refresh.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

Stats = dict[str, Any]

_STATE_STYLES = {"polling": "green", "delivering": "green", "idle": "cyan",
                 "retrying": "yellow", "failing": "yellow", "breaker_open": "red",
                 "paused": "red", "config_error": "red", "stopped": "dim", "starting": "dim"}


def fetch(url: str, timeout: float = 2.0) -> Stats:
    response = httpx.get(url, timeout=timeout, trust_env=False)
    response.raise_for_status()
    data: Stats = response.json()
    return data


def _rate(now: Stats, before: Stats | None, section: str, key: tuple[str, ...],
          field: str) -> float | None:
    if before is None:
        return None
    elapsed = now["relay"]["now"] - before["relay"]["now"]
    if elapsed <= 0:
        return None
    names = ("source", "endpoint") if section == "sources" else ("sink",)
    old = next((row for row in before[section] if tuple(row[n] for n in names) == key), None)
    new = next((row for row in now[section] if tuple(row[n] for n in names) == key), None)
    if old is None or new is None:
        return None
    difference = float(new[field]) - float(old[field])
    return max(0.0, difference / float(elapsed))


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:.{digits}f}" if value % 1 else f"{value:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0:
        return "EXPIRED"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}TB"


def rows(now: Stats, before: Stats | None) -> tuple[list[list[str]], list[list[str]], str]:
    """The figures as text: source rows, sink rows and the journal line."""
    sources = []
    for r in now["sources"]:
        key = (r["source"], r["endpoint"])
        used = r.get("budget_used")
        sources.append([
            r["source"], r["endpoint"], r["state"],
            _num(_rate(now, before, "sources", key, "requests_total")),
            _num(_rate(now, before, "sources", key, "events_total")),
            "-" if used is None else f"{used * 100:.0f}%",
            _duration(r["data_age_seconds"]),
            _duration(r["retention_left_seconds"]),
            r["last_error"][:60],
        ])
    sinks = []
    for r in now["sinks"]:
        sinks.append([
            r["sink"], r["state"],
            _num(_rate(now, before, "sinks", (r["sink"],), "delivered_total")),
            _num(r["pending"], 0), _duration(r["oldest_pending_age_seconds"]),
            _num(r["dead_letters_total"], 0), r["last_error"][:60],
        ])
    j = now["journal"]
    growth = None
    if before is not None and now["relay"]["now"] > before["relay"]["now"]:
        growth = ((j["size_bytes"] or 0) - (before["journal"]["size_bytes"] or 0)) / (
            now["relay"]["now"] - before["relay"]["now"])
    journal = (f"journal  {_num(j['events'], 0)} events  {_bytes(j['size_bytes'])}"
               f"  growth {_bytes(growth)}/s  last seq {_num(j['last_seq'], 0)}"
               + ("  DISK FULL" if j["disk_full"] else ""))
    return sources, sinks, journal


SOURCE_HEADERS = ["source", "endpoint", "state", "req/s", "events/s", "budget", "data age",
                  "retention left", "last error"]
SINK_HEADERS = ["sink", "state", "events/s", "pending", "oldest", "dead letters", "last error"]


def render(now: Stats, before: Stats | None, url: str) -> Group:
    sources, sinks, journal = rows(now, before)
    title = Text(f"IM Relay {now['relay']['version']} (pid {now['relay']['pid']}) at {url}"
                 f"  up {_duration(now['relay']['now'] - now['relay']['started_at'])}",
                 style="bold")
    source_table = Table(*SOURCE_HEADERS, title="sources", expand=True)
    for row in sources:
        source_table.add_row(*row[:2], Text(row[2], style=_STATE_STYLES.get(row[2], "")),
                             *row[3:])
    sink_table = Table(*SINK_HEADERS, title="sinks", expand=True)
    for row in sinks:
        sink_table.add_row(row[0], Text(row[1], style=_STATE_STYLES.get(row[1], "")), *row[2:])
    return Group(title, source_table, sink_table, Text(journal))


def plain(now: Stats, before: Stats | None) -> Iterator[str]:
    sources, sinks, journal = rows(now, before)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now["relay"]["now"]))
    yield f"== {stamp} relay {now['relay']['version']} pid {now['relay']['pid']}"
    for row in sources:
        yield "source " + " ".join(f"{h}={v}" for h, v in zip(SOURCE_HEADERS, row, strict=True)
                                   if v != "")
    for row in sinks:
        yield "sink " + " ".join(f"{h}={v}" for h, v in zip(SINK_HEADERS, row, strict=True)
                                 if v != "")
    yield journal


def run(url: str, *, interval: float = 1.0, iterations: int | None = None,
        out: IO[str] | None = None, quiet_first: bool = False) -> None:
    """Show the relay at ``url`` until interrupted (or ``iterations`` refreshes).

    ``quiet_first``: take the first snapshot without showing it (``--once`` shows
    one snapshot, with rates measured over ``interval``).
    """
    stream = out or sys.stdout
    before: Stats | None = None
    done = 0
    if quiet_first:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            before = fetch(url)
        time.sleep(interval)
    live: Live | None = None
    if stream.isatty():
        live = Live(Text(f"connecting to {url} ..."), console=Console(file=stream),
                    refresh_per_second=4, transient=False)
        live.start()
    try:
        while iterations is None or done < iterations:
            try:
                now = fetch(url)
            except (httpx.HTTPError, ValueError) as exc:
                message = f"cannot read {url}: {type(exc).__name__} {exc} (retrying)"
                if live is not None:
                    live.update(Text(message, style="red"))
                else:
                    print(message, file=stream, flush=True)
                before = None
            else:
                if live is not None:
                    live.update(render(now, before, url))
                else:
                    for line in plain(now, before):
                        print(line, file=stream)
                    stream.flush()
                before = now
            done += 1
            if iterations is None or done < iterations:
                time.sleep(interval)
    finally:
        if live is not None:
            live.stop()
