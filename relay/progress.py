"""Progress of a long evacuation: the figures, an ETA, a display, metrics and status lines.

An evacuation of a large app runs for hours or days. The same figures are shown
three ways: a live ``rich`` progress bar on a terminal (plain lines every
``progress_interval`` when stdout or stderr is not one), Prometheus gauges
(``relay_evacuation_*``), and ``relay status`` (read from the journal, where the
evacuation keeps them).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any, TextIO

from relay import metrics

PHASES = ("drain", "verify", "done")


@dataclass
class Figures:
    """Where an evacuation stands (also its persisted form, as JSON)."""

    source: str
    phase: str = "drain"
    exported: int = 0
    quarantined: int = 0
    first_ts: int | None = None  # the first message read (ms)
    cursor_ts: int | None = None  # how far the history has been read (ms)
    now_ms: int = 0
    requests: int = 0
    requests_last_minute: int = 0
    budget_per_minute: int = 0
    rate: float | None = None  # messages per second, over the last minute
    eta_seconds: float | None = None  # until the current phase ends
    verify_total: int = 0
    verify_checked: int = 0
    matching: int = 0
    repaired: int = 0
    repaired_messages: int = 0
    unverified: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figures:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class RateMeter:
    """Observed rates over a sliding window: messages per second and history ms per second."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int, int]] = deque()

    def add(self, exported: int, cursor_ts: int | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._samples.append((now, exported, cursor_ts or 0))
        while len(self._samples) > 2 and self._samples[0][0] < now - self.window:
            self._samples.popleft()

    def _span(self) -> tuple[float, int, int] | None:
        if len(self._samples) < 2:
            return None
        (t0, e0, c0), (t1, e1, c1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0:
            return None
        return t1 - t0, e1 - e0, c1 - c0

    def rate(self) -> float | None:
        span = self._span()
        return None if span is None else span[1] / span[0]

    def eta(self, cursor_ts: int | None, target_ts: int) -> float | None:
        """Seconds until the cursor reaches ``target_ts`` at the observed pace of history."""
        span = self._span()
        if span is None or cursor_ts is None or span[2] <= 0:
            return None
        return max(0.0, (target_ts - cursor_ts) / (span[2] / span[0]))


def _iso(ms: int | None) -> str:
    if ms is None:
        return "?"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def covered(f: Figures) -> float:
    """Share of the history's time span read so far (0..1)."""
    if f.first_ts is None or f.cursor_ts is None or f.now_ms <= f.first_ts:
        return 0.0
    return min(1.0, max(0.0, (f.cursor_ts - f.first_ts) / (f.now_ms - f.first_ts)))


def line(f: Figures) -> str:
    """One plain progress line."""
    rate = "?" if f.rate is None else f"{f.rate:,.0f}"
    head = (f"evacuation {f.source} [{f.phase}]: {f.exported:,} messages"
            f" ({f.quarantined:,} quarantined), history {_iso(f.first_ts)} → {_iso(f.cursor_ts)}"
            f" → now {_iso(f.now_ms)} ({covered(f):.1%}), requests {f.requests_last_minute:,}"
            f"/{f.budget_per_minute:,} per min ({f.requests:,} total), {rate} msg/s")
    if f.phase == "verify":
        head += (f", verified {f.verify_checked:,}/{f.verify_total:,} conversations"
                 f" ({f.repaired:,} repaired, {f.unverified:,} unverified)")
    if f.phase != "done":
        head += f", ETA {duration(f.eta_seconds)}"
    return head


def publish(f: Figures) -> None:
    """The figures as Prometheus gauges."""
    s = f.source
    metrics.EVACUATION_EXPORTED.labels(s).set(f.exported)
    metrics.EVACUATION_FIRST_MESSAGE.labels(s).set((f.first_ts or 0) / 1000)
    metrics.EVACUATION_CURSOR.labels(s).set((f.cursor_ts or 0) / 1000)
    metrics.EVACUATION_BUDGET.labels(s).set(f.budget_per_minute)
    metrics.EVACUATION_REQUESTS_LAST_MINUTE.labels(s).set(f.requests_last_minute)
    metrics.EVACUATION_RATE.labels(s).set(f.rate or 0.0)
    metrics.EVACUATION_ETA.labels(s).set(-1 if f.eta_seconds is None else f.eta_seconds)
    for phase in PHASES:
        metrics.EVACUATION_PHASE.labels(s, phase).set(1 if phase == f.phase else 0)
    for outcome, value in (("total", f.verify_total), ("checked", f.verify_checked),
                           ("matching", f.matching), ("repaired", f.repaired),
                           ("unverified", f.unverified)):
        metrics.EVACUATION_CONVERSATIONS.labels(s, outcome).set(value)
    metrics.EVACUATION_REPAIRED.labels(s).set(f.repaired_messages)


def init_metrics(source: str) -> None:
    for purpose in ("history", "conversations", "chatrooms", "verify"):
        for outcome in ("ok", "throttled", "error"):
            metrics.EVACUATION_REQUESTS.labels(source, purpose, outcome)
    publish(Figures(source))


class Display:
    """A rich progress bar on a terminal; otherwise a plain line every ``interval`` seconds."""

    def __init__(self, interval: float, *, out: TextIO | None = None,
                 interactive: bool | None = None) -> None:
        self.interval = interval
        self.out = out or sys.stdout
        if interactive is None:
            interactive = sys.stdout.isatty() and sys.stderr.isatty()
        self.interactive = interactive
        self._last_line = 0.0
        self._progress: Any = None
        self._task: Any = None
        if interactive:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[detail]}"),
                console=Console(stderr=True), refresh_per_second=2)
            self._task = self._progress.add_task("evacuation", total=1000, detail="")
            self._progress.start()

    def update(self, f: Figures, *, force: bool = False) -> None:
        if self._progress is not None:
            done = covered(f) if f.phase == "drain" else (
                f.verify_checked / f.verify_total if f.phase == "verify" and f.verify_total
                else 1.0)
            rate = "?" if f.rate is None else f"{f.rate:,.0f}"
            detail = (f"{f.exported:,} msgs · {_iso(f.first_ts)} → {_iso(f.cursor_ts)} → now"
                      f" · {f.requests_last_minute:,}/{f.budget_per_minute:,} req/min"
                      f" · {rate} msg/s · " + (f"ETA {duration(f.eta_seconds)}"
                                               if f.phase != "done" else "tailing"))
            if f.phase == "verify":
                detail += f" · {f.verify_checked:,}/{f.verify_total:,} conversations"
            self._progress.update(self._task, completed=int(done * 1000),
                                  description=f"{f.source} {f.phase}", detail=detail)
            return
        now = time.monotonic()
        if force or now - self._last_line >= self.interval:
            self._last_line = now
            print(line(f), file=self.out, flush=True)

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def status_entries(cursors: dict[str, str]) -> list[Figures]:
    """The evacuations recorded in a journal's cursors (for ``relay status``)."""
    import orjson

    found = []
    for key, value in cursors.items():
        if not key.endswith(":evacuation"):
            continue
        try:
            state = orjson.loads(value)
            figures = Figures.from_json(state.get("figures") or {})
            drain = orjson.loads(cursors.get(f"{key}:drain", "{}"))
        except (orjson.JSONDecodeError, TypeError, AttributeError):
            continue
        # The drain figures are committed with each batch: fresher than the periodic ones.
        figures.exported = max(figures.exported, int(drain.get("exported") or 0))
        figures.quarantined = max(figures.quarantined, int(drain.get("quarantined") or 0))
        figures.first_ts = figures.first_ts or drain.get("first_ts")
        figures.cursor_ts = max(figures.cursor_ts or 0, drain.get("cursor_ts") or 0) or None
        figures.phase = str(state.get("phase", figures.phase))
        found.append(figures)
    return found


def status_lines(cursors: dict[str, str]) -> list[str]:
    lines: list[str] = []
    for f in status_entries(cursors):
        lines += ["", f"evacuation {f.source}", f"  phase       {f.phase}",
                  f"  exported    {f.exported:,} messages ({f.quarantined:,} quarantined)",
                  f"  history     {_iso(f.first_ts)} → {_iso(f.cursor_ts)} → now"
                  f" ({covered(f):.1%} of the time span)",
                  f"  requests    {f.requests:,} total; {f.requests_last_minute:,} of"
                  f" {f.budget_per_minute:,} per minute at the last update",
                  f"  rate        {'?' if f.rate is None else f'{f.rate:,.0f}'} messages/s,"
                  f" ETA {duration(f.eta_seconds) if f.phase != 'done' else '-'}"]
        if f.verify_total:
            lines.append(f"  verified    {f.verify_checked:,}/{f.verify_total:,} conversations:"
                         f" {f.matching:,} matching, {f.repaired:,} repaired"
                         f" ({f.repaired_messages:,} messages), {f.unverified:,} unverified")
    return lines
