"""Pipeline capacity: RongCloud emulator (no budget) → relay → journal → file.

Each run: a fresh emulator process holding N messages (answers of ``--batch``
records, 100 as RongCloud pages them), a fresh relay process, the time from
the first event fetched (its ``fetched_at``) to the moment the file holds all
N. Prints, as medians of the runs, events/s, the relay process's CPU per event
(user + system, from /proc) and its peak RSS, then the per-stage CPU table of
:mod:`benchmarks.stages` (SPEC §7: ≥ 45,000 events/s, ≤ 30 µs per event, ≤ 100 MB).

Each endpoint is one chain of rounds (request, decode, commit, then the next request:
SPEC §2), so events/s is 3 × 100 events per round time. Each run also reads the
relay's own ``/metrics`` at the end and prints where a round's wall time went: the
provider exchange (``relay_source_request_seconds``), the journal's commit
(``relay_journal_commit_seconds``) and the rest (decoding the answer, the event loop).

    python -m benchmarks.pipeline_file --events 200000 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import stages
from benchmarks.common import (
    cpu_seconds,
    free_port,
    machine,
    rss_mb,
    start_emulator,
    start_relay,
    stop,
    summary,
    wait_lines,
)
from tests.support.configs import file_sink, rongcloud_source, write_config

ENDPOINTS = 3  # person, group, chatroom: one chain of rounds each


def _mean(metrics_text: str, name: str) -> tuple[float, float]:
    """(count, mean in seconds) of a histogram in a /metrics page, summed over its series."""
    samples = [s for family in text_string_to_metric_families(metrics_text)
               if family.name == name for s in family.samples]
    total = sum(s.value for s in samples if s.name == f"{name}_sum")
    count = sum(s.value for s in samples if s.name == f"{name}_count")
    return count, (total / count if count else 0.0)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def one_run(events: int, batch: int, workdir: Path,
            journal: dict[str, Any] | None = None) -> dict[str, float]:
    """One drain; ``journal`` overrides the [journal] table (default: SQLite in ``workdir``)."""
    emulator, banner = start_emulator(
        "rongcloud", "--port", "0", "--budget", "0", "--batch-size", str(batch),
        "--backlog", str(events), "--seed", "1", "--app-key", "bench", "--app-secret", "bench",
    )
    out = workdir / "events.jsonl"
    port = free_port()
    config = write_config(
        workdir,
        sources={"rc": rongcloud_source(banner["urls"], app_key="bench", app_secret="bench",
                                        requests_per_second=1000, idle_interval="50ms")},
        sinks={"archive": file_sink(out, batch_size=2000)},
        log={"level": "warning"},
        metrics={"enabled": True, "listen": f"127.0.0.1:{port}"},
        **({"journal": journal} if journal is not None else {}),
    )
    started = time.time()
    relay = start_relay(config, workdir / "relay.log")
    try:
        # Start-up's CPU (imports, journal open): what the relay had spent when the file got
        # its first batch (which adds that batch's own ~50 ms of the drain).
        wait_lines(out, 1, timeout=120)
        startup_cpu = cpu_seconds(relay.pid)
        done = wait_lines(out, events, timeout=600)
        cpu = cpu_seconds(relay.pid)
        peak = rss_mb(relay.pid, "VmHWM")
        page = _scrape(port)
    finally:
        stop(relay)
        stop(emulator)
    with out.open("rb") as f:
        head = [line for _, line in zip(range(5000), f, strict=False)]
    first_fetch = min(orjson.loads(line)["fetched_at"] for line in head)
    drain = done - first_fetch / 1000
    requests, request = _mean(page, "relay_source_request_seconds")
    commits, commit = _mean(page, "relay_journal_commit_seconds")
    # A round of one chain: the drain's time shared by the chains' requests (the empty
    # answers at the end included, as they are rounds too).
    round_ = drain * ENDPOINTS / requests if requests else 0.0
    # The CPU figure includes start-up (imports, journal open, migrations): about 1 s of
    # CPU, a few µs per event; the drain's own is printed beside it.
    return {"events_per_second": events / drain,
            "events_per_second_from_start": events / (done - started),
            "cpu_us_per_event": cpu / events * 1e6,
            "drain_cpu_us_per_event": (cpu - startup_cpu) / events * 1e6,
            "startup_cpu_seconds": startup_cpu, "peak_rss_mb": peak,
            "round_ms": round_ * 1000, "request_ms": request * 1000,
            "commit_ms": commit * 1000, "rest_ms": (round_ - request - commit) * 1000,
            "requests": requests, "commits": commits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=100, help="emulator batch size")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage table")
    args = parser.parse_args()
    runs = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            figures = one_run(args.events, args.batch, Path(tmp))
        runs.append(figures)
        print(f"run {run + 1}: {figures['events_per_second']:,.0f} events/s,"
              f" {figures['cpu_us_per_event']:.1f} µs CPU per event"
              f" ({figures['drain_cpu_us_per_event']:.1f} without the start-up's"
              f" {figures['startup_cpu_seconds']:.2f} s),"
              f" peak RSS {figures['peak_rss_mb']:.0f} MiB; a round {figures['round_ms']:.1f} ms:"
              f" request {figures['request_ms']:.1f}, commit {figures['commit_ms']:.1f},"
              f" rest {figures['rest_ms']:.1f}")
    result = {"benchmark": "pipeline emulator→journal→file", "events": args.events,
              "batch": args.batch,
              "events_per_second": summary([r["events_per_second"] for r in runs]),
              "cpu_us_per_event_median": round(
                  statistics.median(r["cpu_us_per_event"] for r in runs), 1),
              "drain_cpu_us_per_event_median": round(
                  statistics.median(r["drain_cpu_us_per_event"] for r in runs), 1),
              "startup_cpu_seconds_median": round(
                  statistics.median(r["startup_cpu_seconds"] for r in runs), 2),
              "peak_rss_mb_median": round(statistics.median(r["peak_rss_mb"] for r in runs)),
              "round_ms_median": {k: round(statistics.median(r[f"{k}_ms"] for r in runs), 2)
                                  for k in ("round", "request", "commit", "rest")},
              "machine": machine()}
    if not args.no_stages:
        with tempfile.TemporaryDirectory(prefix="relay-stages-") as tmp:
            by_stage = asyncio.run(stages.measure(min(args.events, 100_000), args.batch,
                                                  Path(tmp)))
        by_stage.pop("events")
        stages.print_table(by_stage, args.batch)
        result["stages_us_per_event"] = {k: round(v, 2) for k, v in by_stage.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
