"""Pipeline capacity per journal backend: RongCloud emulator (no budget) → relay → journal
(SQLite file, or PostgreSQL) → file, events/s and the relay's CPU per event.

Each run: a fresh emulator process holding N messages, a fresh relay process on a
fresh journal (a new SQLite file, or a new database on one PostgreSQL server started
for the benchmark, fsync on), the time from the first event fetched (its
``fetched_at``) to the moment the file holds all N. The backends alternate run by
run; the medians are printed as a table (SPEC §7 bar: 45,000 events/s, ≤ 30 µs CPU
per event, on this 2-core machine; PostgreSQL's own CPU is on the same 2 cores).

    python -m benchmarks.pipeline_journal --events 100000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import machine
from benchmarks.pipeline_file import one_run
from tests.support.postgres import PostgresServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="emulator batch size")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgres": []}
    with PostgresServer(fsync=True) as server:
        for run in range(args.runs):
            order = ["sqlite", "postgres"] if run % 2 == 0 else ["postgres", "sqlite"]
            for kind in order:
                with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
                    journal: dict[str, Any] = {"path": str(Path(tmp) / "relay.db")} \
                        if kind == "sqlite" else {"type": "postgres",
                                                  "dsn": server.create_database()}
                    result = one_run(args.events, args.batch, Path(tmp), journal)
                results[kind].append(result)
                print(f"run {run + 1} {kind:<8}: {result['events_per_second']:>9,.0f} events/s,"
                      f" {result['cpu_us_per_event']:5.1f} µs CPU/event (relay)", flush=True)
        version = server.version
    medians = {kind: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for kind, runs in results.items()}
    print(f"\nmedians of {args.runs} runs, {args.events:,} events each; PostgreSQL {version},"
          f" fsync on; {machine()}")
    print(f"{'journal':<12}{'events/s':>12}{'µs CPU/event':>15}")
    for kind, m in medians.items():
        print(f"{kind:<12}{m['events_per_second']:>12,.0f}{m['cpu_us_per_event']:>15.1f}")
    print(json.dumps({"benchmark": "pipeline emulator→journal→file per backend",
                      "events": args.events, "runs": args.runs, "postgres": version,
                      "medians": medians, "all_runs": results, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
