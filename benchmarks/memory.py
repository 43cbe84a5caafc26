"""Memory with 1,000,000 undelivered events in the journal (SPEC §7 bar: RSS ≤ 100 MB).

The journal is filled with N events, then the relay runs with a webhook sink
whose endpoint refuses connections (nothing can be delivered) beside a live
RongCloud source; its peak and current RSS are read from /proc. A second
phase lets a file sink drain the same backlog and reports RSS while it does.

    python -m benchmarks.memory --events 1000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from benchmarks.common import LineCounter, machine, rss_mb, start_emulator, start_relay, stop
from benchmarks.kafka import fill_journal
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port


def rss_pair(pid: int) -> tuple[float, float]:
    return rss_mb(pid), rss_mb(pid, "VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relay-bench-mem-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        anyio.run(fill_journal, work / "relay.db", args.events)
        fill_seconds = time.monotonic() - started
        db_bytes = sum(p.stat().st_size for p in work.glob("relay.db*"))
        emulator, banner = start_emulator("rongcloud", "--port", "0", "--rate", "200",
                                          "--app-key", "bench", "--app-secret", "bench")
        dead = f"http://127.0.0.1:{refused_port()}/hook"
        config = write_config(
            work, sources={"rc": rongcloud_source(banner["urls"], app_key="bench",
                                                  app_secret="bench")},
            sinks={"bus": {"type": "webhook", "url": dead, "secret":
                           "whsec_YmVuY2gtc2VjcmV0LWJlbmNoLXNlY3JldA=="}},
            log={"level": "error"})
        relay = start_relay(config, work / "relay.log")
        samples = []
        try:
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                time.sleep(1)
                samples.append(rss_pair(relay.pid))
            status_started = time.monotonic()
            status = subprocess.run([sys.executable, "-m", "relay", "status", "--json",
                                     "--config", str(config)], capture_output=True, text=True)
            status_seconds = time.monotonic() - status_started
            pending = json.loads(status.stdout)["sinks"][0]["pending"]
        finally:
            stop(relay)
        undelivered_rss = max(s[0] for s in samples)
        undelivered_peak = max(s[1] for s in samples)

        # Phase 2: a file sink drains the whole backlog.
        events = work / "events.jsonl"
        config = write_config(
            work, sources={"rc": rongcloud_source(banner["urls"], app_key="bench",
                                                  app_secret="bench")},
            sinks={"file": file_sink(events, batch_size=2000)}, log={"level": "error"})
        relay = start_relay(config, work / "relay.log")
        drain = []
        written = LineCounter(events)
        try:
            started = time.monotonic()
            while written.count() < args.events and time.monotonic() - started < 600:
                time.sleep(1)
                drain.append(rss_pair(relay.pid))
            drain_seconds = time.monotonic() - started
        finally:
            stop(relay)
            stop(emulator)
    result = {
        "benchmark": "memory with undelivered events", "events": args.events,
        "journal_bytes": db_bytes, "fill_seconds": round(fill_seconds, 1),
        "undelivered": {"pending": pending, "rss_mb_max": round(undelivered_rss, 1),
                        "peak_rss_mb": round(undelivered_peak, 1),
                        "relay_status_seconds": round(status_seconds, 2)},
        "draining_to_file": {"seconds": round(drain_seconds, 1),
                             "rss_mb_max": round(max(s[0] for s in drain), 1),
                             "peak_rss_mb": round(max(s[1] for s in drain), 1)},
        "machine": machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
