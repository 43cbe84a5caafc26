"""Pipeline capacity: RongCloud emulator (no budget) → relay → journal → file.

Each run: a fresh emulator process holding N messages (answers of ``--batch``
records, 100 as RongCloud pages them), a fresh relay process, the time from
the first event fetched (its ``fetched_at``) to the moment the file holds all
N. Prints, as medians of the runs, events/s, the relay process's CPU per event
(user + system, from /proc) and its peak RSS, then the per-stage CPU table of
:mod:`benchmarks.stages` (SPEC §7: ≥ 45,000 events/s, ≤ 30 µs per event, ≤ 100 MB).

    python -m benchmarks.pipeline_file --events 200000 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks import stages
from benchmarks.common import (
    cpu_seconds,
    machine,
    rss_mb,
    start_emulator,
    start_relay,
    stop,
    summary,
    wait_lines,
)
from tests.support.configs import file_sink, rongcloud_source, write_config


def one_run(events: int, batch: int, workdir: Path,
            journal: dict[str, Any] | None = None) -> dict[str, float]:
    """One drain; ``journal`` overrides the [journal] table (default: SQLite in ``workdir``)."""
    emulator, banner = start_emulator(
        "rongcloud", "--port", "0", "--budget", "0", "--batch-size", str(batch),
        "--backlog", str(events), "--seed", "1", "--app-key", "bench", "--app-secret", "bench",
    )
    out = workdir / "events.jsonl"
    config = write_config(
        workdir,
        sources={"rc": rongcloud_source(banner["urls"], app_key="bench", app_secret="bench",
                                        requests_per_second=1000, idle_interval="50ms")},
        sinks={"archive": file_sink(out, batch_size=2000)},
        log={"level": "warning"},
        **({"journal": journal} if journal is not None else {}),
    )
    started = time.time()
    relay = start_relay(config, workdir / "relay.log")
    try:
        done = wait_lines(out, events, timeout=600)
        cpu = cpu_seconds(relay.pid)
        peak = rss_mb(relay.pid, "VmHWM")
    finally:
        stop(relay)
        stop(emulator)
    with out.open("rb") as f:
        head = [line for _, line in zip(range(5000), f, strict=False)]
    first_fetch = min(orjson.loads(line)["fetched_at"] for line in head)
    # The CPU figure includes start-up (imports, journal open, migrations): about 1 s of
    # CPU, a few µs per event.
    return {"events_per_second": events / (done - first_fetch / 1000),
            "events_per_second_from_start": events / (done - started),
            "cpu_us_per_event": cpu / events * 1e6, "peak_rss_mb": peak}


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
              f" {figures['cpu_us_per_event']:.1f} µs CPU per event,"
              f" peak RSS {figures['peak_rss_mb']:.0f} MiB")
    result = {"benchmark": "pipeline emulator→journal→file", "events": args.events,
              "batch": args.batch,
              "events_per_second": summary([r["events_per_second"] for r in runs]),
              "cpu_us_per_event_median": round(
                  statistics.median(r["cpu_us_per_event"] for r in runs), 1),
              "peak_rss_mb_median": round(statistics.median(r["peak_rss_mb"] for r in runs)),
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
