"""What enforcing the dedup window costs on the commit path, per journal backend.

In process, one journal, batches of 1000 events (~600-byte payloads) committed one
after another with a cursor move each; 10 % of each batch repeat ids of the batch
before (as redeliveries do). Two insert statements are compared on the same data:

* ``window``: the journal's own (ON CONFLICT (id) DO UPDATE ... WHERE the stored copy
  is older than the dedup window: an old id is accepted again, at a new seq);
* ``no window``: ON CONFLICT (id) DO NOTHING (every id held is dropped: what the
  journal did before the window was enforced).

Reported: events/s and CPU µs per event of this process (PostgreSQL's server CPU is
not in it), medians of --runs, the two statements alternating.

    python -m benchmarks.journal_commit --batches 200 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine
from relay.config import JournalConfig
from relay.journal import Journal, NewEvent, open_journal
from tests.support.postgres import PostgresServer

BATCH = 1000
REPEATS = 100

SQLITE_NO_WINDOW = ("INSERT INTO events(seq, id, fetched_at, routing, payload)"
                    " VALUES (?,?,?,?,?) ON CONFLICT(id) DO NOTHING")
POSTGRES_NO_WINDOW = """
WITH ins AS (
    INSERT INTO events (id, fetched_at, routing, payload)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::bytea[])
    ON CONFLICT (id) DO NOTHING
    RETURNING seq)
SELECT count(*)::bigint, max(seq),
       CASE WHEN count(*) > 0 THEN pg_notify($6, max(seq)::text)::text END
FROM ins WHERE $5::bigint IS NOT NULL"""


def make_batches(count: int) -> list[list[NewEvent]]:
    now = int(time.time() * 1000)
    routing = b'["rc","rongcloud","message","direct","","u1:u2"]'
    batches: list[list[NewEvent]] = []
    previous: list[NewEvent] = []
    n = 0
    for _ in range(count):
        batch = previous[-REPEATS:]
        while len(batch) < BATCH:
            payload = b'{"id":"rc:%d","body":"%s"}' % (n, os.urandom(280).hex().encode())
            batch.append(NewEvent(f"rc:{n:012d}", now, routing, payload, now))
            n += 1
        batches.append(batch)
        previous = batch
    return batches


async def one_run(config: JournalConfig, batches: list[list[NewEvent]],
                  window: bool) -> dict[str, float]:
    journal: Journal = await open_journal(config)
    try:
        if not window:
            journal._insert_events = (  # type: ignore[attr-defined]
                SQLITE_NO_WINDOW if config.type == "sqlite" else POSTGRES_NO_WINDOW)
        for warm in batches[:5]:
            await journal.commit_batch(warm, cursors={"rc:person": "0"})
        rest = batches[5:]
        wall, cpu = time.perf_counter(), time.process_time()
        new = 0
        for n, batch in enumerate(rest):
            new += (await journal.commit_batch(batch, cursors={"rc:person": str(n)})).new
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        events = len(rest) * BATCH
        assert new == len(rest) * (BATCH - REPEATS), "every repeat must have been dropped"
        return {"events_per_second": events / wall, "cpu_us_per_event": cpu / events * 1e6}
    finally:
        await journal.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    batches = make_batches(args.batches)
    results: dict[str, list[dict[str, float]]] = {}
    with PostgresServer(fsync=True) as server, \
            tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        for run in range(args.runs):
            for kind in ("sqlite", "postgres"):
                for window in (True, False) if run % 2 == 0 else (False, True):
                    config = JournalConfig(path=str(Path(tmp) / f"{run}-{window}.db")) \
                        if kind == "sqlite" else \
                        JournalConfig(type="postgres", dsn=server.create_database())
                    key = f"{kind} {'window' if window else 'no window'}"
                    result = asyncio.run(one_run(config, batches, window))
                    results.setdefault(key, []).append(result)
                    print(f"run {run + 1} {key:<20} {result['events_per_second']:>9,.0f}"
                          f" events/s {result['cpu_us_per_event']:5.1f} µs CPU/event",
                          flush=True)
        version = server.version
    medians = {k: {m: statistics.median(r[m] for r in runs) for m in runs[0]}
               for k, runs in results.items()}
    print(f"\nmedians of {args.runs} runs, {args.batches} batches of {BATCH} "
          f"({REPEATS} repeats each); PostgreSQL {version}, fsync on; {machine()}")
    print(f"{'':22}{'events/s':>12}{'µs CPU/event':>15}")
    for key, m in medians.items():
        print(f"{key:22}{m['events_per_second']:>12,.0f}{m['cpu_us_per_event']:>15.1f}")
    out: dict[str, Any] = {"benchmark": "journal commit: dedup window cost", "batch": BATCH,
                           "repeats": REPEATS, "medians": medians, "all_runs": results,
                           "postgres": version, "machine": machine()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
