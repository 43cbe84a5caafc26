"""Pipeline capacity: RongCloud emulator (no budget) → relay → journal → file, events/s.

Each run: a fresh emulator process holding N messages, a fresh relay process,
the time from the first event fetched (its ``fetched_at``) to the moment the
file holds all N. Prints the median of the runs (SPEC §7 bar: 30,000 events/s).

    python -m benchmarks.pipeline_file --events 200000 --runs 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import orjson

from benchmarks.common import machine, start_emulator, start_relay, stop, summary, wait_lines
from tests.support.configs import file_sink, rongcloud_source, write_config


def one_run(events: int, batch: int, workdir: Path) -> float:
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
    )
    relay = start_relay(config, workdir / "relay.log")
    try:
        done = wait_lines(out, events, timeout=600)
    finally:
        stop(relay)
        stop(emulator)
    with out.open("rb") as f:
        head = [line for _, line in zip(range(5000), f, strict=False)]
    first_fetch = min(orjson.loads(line)["fetched_at"] for line in head)
    return events / (done - first_fetch / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000, help="emulator batch size")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rates = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            rate = one_run(args.events, args.batch, Path(tmp))
        rates.append(rate)
        print(f"run {run + 1}: {rate:,.0f} events/s")
    result = {"benchmark": "pipeline emulator→journal→file", "events": args.events,
              "events_per_second": summary(rates), "machine": machine()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
