"""The running relay's own view of itself, as one JSON document (``GET /stats``).

What ``relay top`` shows and ``relay status`` adds to the journal's figures.
Counters and gauges are read from the same Prometheus registry ``/metrics``
exports, so the two never disagree; states (polling, failing, retrying,
paused, breaker open) and last errors come from the components' health.
Rates are left to the reader: it has two snapshots and their times.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from relay import __version__
from relay.logs import redact
from relay.metrics import REGISTRY
from relay.sources.base import SourceHealth

STARTED_AT = time.time()

# Worst first: a source endpoint shows the worst state of its loops.
_SOURCE_STATES = ("config_error", "failing", "stopped", "polling")


class SinkView(Protocol):
    """What the status needs of a sink runner."""

    @property
    def name(self) -> str: ...

    def state(self) -> tuple[str, str]:
        """(state, last error)."""


def _samples() -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in REGISTRY.collect():
        for sample in family.samples:
            found[sample.name].append((sample.labels, sample.value))
    return found


def _by(samples: Iterable[tuple[dict[str, str], float]], *keys: str,
        where: Mapping[str, str] | None = None) -> dict[tuple[str, ...], float]:
    totals: dict[tuple[str, ...], float] = defaultdict(float)
    for labels, value in samples:
        if where and any(labels.get(k) != v for k, v in where.items()):
            continue
        totals[tuple(labels.get(k, "") for k in keys)] += value
    return totals


def _one(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float | None:
    values = samples.get(name)
    return values[0][1] if values else None


def snapshot(health: Mapping[str, SourceHealth], sinks: Iterable[SinkView]) -> dict[str, Any]:
    now = time.time()
    s = _samples()
    requests = _by(s.get("relay_source_requests_total", []), "source", "endpoint")
    new = _by(s.get("relay_source_events_total", []), "source", "endpoint",
              where={"outcome": "new"})
    duplicates = _by(s.get("relay_source_events_total", []), "source", "endpoint",
                     where={"outcome": "duplicate"})
    quarantined = _by(s.get("relay_source_events_total", []), "source", "endpoint",
                      where={"outcome": "quarantined"})
    age = _by(s.get("relay_source_data_age_seconds", []), "source", "endpoint")
    retention = _by(s.get("relay_source_retention_seconds", []), "source", "endpoint")
    last_ok = _by(s.get("relay_source_last_success_timestamp_seconds", []), "source",
                  "endpoint")
    loss = _by(s.get("relay_source_possible_loss_total", []), "source", "endpoint")

    loops: dict[tuple[str, str], list[SourceHealth]] = defaultdict(list)
    for loop_name, h in health.items():
        loops[(loop_name.partition("/")[0], h.endpoint)].append(h)
    sources = []
    row: tuple[str, ...]
    for row in sorted(set(requests) | set(loops)):
        source, endpoint = row
        key: tuple[str, ...] = (source, endpoint)
        states = loops.get((source, endpoint), [])
        state = min((_source_state(h) for h in states), key=_SOURCE_STATES.index,
                    default="polling")
        budgets = [h.budget for h in states if h.budget is not None]
        since_ok = now - last_ok[key] if last_ok.get(key) else None
        keep = retention.get(key, 0.0)
        behind = max(age.get(key, 0.0), since_ok or 0.0)
        sources.append({
            "source": source, "endpoint": endpoint, "state": state,
            "last_error": redact(next((h.last_error for h in states if h.last_error), "")),
            "requests_total": requests.get(key, 0.0), "events_total": new.get(key, 0.0),
            "duplicates_total": duplicates.get(key, 0.0),
            "quarantined_total": quarantined.get(key, 0.0),
            "possible_loss_total": loss.get(key, 0.0),
            "budget_used": max((b.in_window() / b.limit for b in budgets), default=None),
            "data_age_seconds": age.get(key, 0.0),
            "seconds_since_success": since_ok,
            "retention_seconds": keep,
            # Until the oldest message not yet taken would pass the provider's retention.
            "retention_left_seconds": keep - behind if keep else None,
        })

    pending = _by(s.get("relay_sink_pending_events", []), "sink")
    oldest = _by(s.get("relay_sink_oldest_pending_age_seconds", []), "sink")
    delivered = _by(s.get("relay_sink_delivered_events_total", []), "sink")
    dead = _by(s.get("relay_sink_dead_letters_total", []), "sink")
    sink_rows = []
    for sink in sinks:
        state, error = sink.state()
        one = (sink.name,)
        sink_rows.append({
            "sink": sink.name, "state": state, "last_error": redact(error),
            "delivered_total": delivered.get(one, 0.0), "pending": pending.get(one, 0.0),
            "oldest_pending_age_seconds": oldest.get(one, 0.0),
            "dead_letters_total": dead.get(one, 0.0),
        })
    return {
        "relay": {"version": __version__, "pid": os.getpid(), "started_at": STARTED_AT,
                  "now": now},
        "journal": {
            "events": _one(s, "relay_journal_events"),
            "size_bytes": _one(s, "relay_journal_size_bytes"),
            "limit_bytes": _one(s, "relay_journal_limit_bytes"),
            "last_seq": _one(s, "relay_journal_last_seq"),
            "quarantined": _one(s, "relay_journal_quarantined_records"),
            "disk_full": bool(_one(s, "relay_journal_disk_full")),
        },
        "sources": sources,
        "sinks": sink_rows,
    }


def _source_state(h: SourceHealth) -> str:
    if h.config_error:
        return "config_error"
    if h.last_error:
        return "failing"
    return "polling" if h.polling else "stopped"


def progress(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """The change between two snapshots, for the periodic progress log line."""
    def delta(section: str, names: tuple[str, ...], field: str) -> dict[str, int]:
        old = {tuple(r[n] for n in names): r[field] for r in before[section]}
        out: dict[str, int] = defaultdict(int)
        for r in now[section]:
            key = tuple(r[n] for n in names)
            out[r[names[0]]] += int(r[field] - old.get(key, 0))
        return dict(out)

    return {
        "events_in": delta("sources", ("source", "endpoint"), "events_total"),
        "events_out": delta("sinks", ("sink",), "delivered_total"),
        "pending": {r["sink"]: int(r["pending"]) for r in now["sinks"]},
        "oldest_pending_seconds": {r["sink"]: round(r["oldest_pending_age_seconds"], 1)
                                   for r in now["sinks"]},
        "failing": sorted({f"{r['source']}/{r['endpoint']}" for r in now["sources"]
                           if r["state"] != "polling"}
                          | {r["sink"] for r in now["sinks"]
                             if r["state"] not in ("idle", "delivering")}),
    }
