"""Every benchmark in one go, with a summary table (figures for docs/RESULTS.md).

    python -m benchmarks.run_all            # about 10 minutes on 2 cores
    python -m benchmarks.run_all --quick    # smaller sizes, fewer runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from benchmarks.common import machine


def run(module: str, *args: str) -> dict[str, Any]:
    print(f"$ python -m benchmarks.{module} {' '.join(args)}", flush=True)
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args],
                         capture_output=True, text=True, check=True).stdout
    start = out.rindex("\n{\n") + 1 if "\n{\n" in out else out.index("{")
    result: dict[str, Any] = json.loads(out[start:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    q = args.quick
    pipeline = run("pipeline_file", "--events", "100000" if q else "200000",
                   "--runs", "3" if q else "5")
    kafka = run("kafka", "--events", "100000" if q else "200000", "--seconds",
                "15" if q else "30")
    budget = run("budget", "--per-endpoint", "1000" if q else "3000", "--runs", "2" if q else "3")
    memory = run("memory", "--events", "200000" if q else "1000000")
    drain = run("drain", "--per-provider", "10000" if q else "30000")
    p = pipeline["events_per_second"]
    lat = kafka["latency"]
    rows = [
        ("pipeline emulator → journal → file", f"{p['median']:,.0f} events/s "
         f"(median of {p['runs']}, min {p['min']:,.0f}, max {p['max']:,.0f})", "≥ 30,000/s"),
        ("journal → Kafka vs bare aiokafka", f"{kafka['relay_events_per_second']:,.0f} vs "
         f"{kafka['bare_aiokafka_events_per_second']:,.0f} events/s = {kafka['ratio']:.2f}",
         "≥ 0.50"),
        ("journal → Kafka exactly once vs bare aiokafka",
         f"{kafka['exactly_once_events_per_second']:,.0f} events/s = "
         f"{kafka['exactly_once_ratio']:.2f}", "≥ 0.60"),
        (f"latency to Kafka ack at {lat['rate']:.0f}/s", f"p50 {lat['p50_ms']:.0f} ms, "
         f"p99 {lat['p99_ms']:.0f} ms ({lat['delivered']} events)", "p99 ≤ 300 ms"),
        (f"latency exactly once at {lat['rate']:.0f}/s (visible to read_committed)",
         f"p50 {kafka['latency_exactly_once']['p50_ms']:.0f} ms, "
         f"p99 {kafka['latency_exactly_once']['p99_ms']:.0f} ms", "p99 ≤ 500 ms"),
        ("RongCloud budget utilisation while draining",
         f"min {budget['utilisation_min']:.3f} over all endpoints and runs", "≥ 0.95"),
        ("over-budget requests", f"{budget['over_budget_total']} of "
         f"{budget['requests_total']}", "0"),
        (f"RSS with {memory['events']:,} undelivered events",
         f"{memory['undelivered']['peak_rss_mb']} MB peak "
         f"(draining them: {memory['draining_to_file']['peak_rss_mb']} MB)", "≤ 150 MB"),
        ("backlog drain after an outage", ", ".join(
            f"{k} {v:,}/s" for k, v in drain["events_per_second"].items()), "—"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nmachine: {machine()}\n")
    for name, figure, bar in rows:
        print(f"{name:<{width}}  {figure}  [bar: {bar}]")
    print(json.dumps({"pipeline": pipeline, "kafka": kafka, "budget": budget, "memory": memory,
                      "drain": drain}, indent=2))


if __name__ == "__main__":
    main()
