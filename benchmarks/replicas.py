"""Replicas sharing sources: 1, 2 and 3 relays on one PostgreSQL journal, 30 RongCloud sources.

Each source is its own app key on its own emulator (the provider's real budget, 10
requests per sliding second per endpoint, answers of 100), all served from this
process; one file sink (one unit: one replica delivers it). For each replica count,
on a fresh database: the drain's events/s (first fetch → every message in the file),
how the 30 sources' leases spread over the members, over-budget requests (SPEC §7:
0) and that every message arrived once. All replicas run on this machine's 2 cores,
beside the emulators and PostgreSQL: this shows the work shared and the budgets held
while replicas join, not a speed-up.

    python -m benchmarks.replicas --per-source 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from benchmarks.common import machine, start_relay, stop, wait_lines
from relay.emulators.harness import BackgroundLoop, EmulatorServer
from relay.emulators.rongcloud import RongCloudEmulator
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.postgres import PostgresServer

SOURCES = 30


async def lease_holders(dsn: str) -> dict[str, int]:
    """Source units per holder (the sink's lease left out)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT holder, count(*) AS units FROM leases"
                                " WHERE unit LIKE 'source:%' AND expires_at > now()"
                                " GROUP BY holder")
    finally:
        await conn.close()
    return {str(r["holder"]): int(r["units"]) for r in rows}


def one_run(replicas: int, per_source: int, dsn: str, workdir: Path) -> dict[str, Any]:
    emulators = [RongCloudEmulator(f"key{i}", "secret", batch_size=100, budget=10, seed=i)
                 for i in range(SOURCES)]
    for emulator in emulators:
        emulator.generate(per_source)
    loop = BackgroundLoop()
    loop.start()
    servers: list[EmulatorServer] = [e.make_server("127.0.0.1", [0]) for e in emulators]
    for server in servers:
        loop.run(server.start())
    out = workdir / "events.jsonl"
    config = write_config(
        workdir,
        sources={f"rc{i}": rongcloud_source(server.urls, app_key=f"key{i}", app_secret="secret")
                 for i, server in enumerate(servers)},
        sinks={"archive": file_sink(out, batch_size=2000)},
        journal={"type": "postgres", "dsn": dsn},
        cluster={"lease_ttl": "5s"},
        log={"level": "warning"},
    )
    relays = [start_relay(config, workdir / f"relay{n}.log") for n in range(replicas)]
    total = per_source * SOURCES
    try:
        done = wait_lines(out, total, timeout=900)
        holders = asyncio.run(lease_holders(dsn))
    finally:
        for relay in relays:
            stop(relay)
        for server in servers:
            loop.run(server.stop())
        loop.stop()
    ids = Counter(orjson.loads(line)["id"] for line in out.read_bytes().splitlines())
    first_fetch = min(orjson.loads(line)["fetched_at"]
                      for line in out.read_bytes().splitlines()[:5000]) / 1000
    return {"replicas": replicas, "messages": total,
            "events_per_second": total / (done - first_fetch),
            "sources_per_member": sorted(holders.values(), reverse=True),
            "over_budget": sum(e.snapshot()["over_budget"] for e in emulators),
            "requests": sum(e.snapshot()["requests"] for e in emulators),
            "distinct_delivered": len(ids), "duplicates": sum(n - 1 for n in ids.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-source", type=int, default=3000)
    args = parser.parse_args()
    results = []
    with PostgresServer(fsync=True) as server:
        for replicas in (1, 2, 3):
            with tempfile.TemporaryDirectory(prefix="relay-bench-replicas-") as tmp:
                result = one_run(replicas, args.per_source, server.create_database(), Path(tmp))
            results.append(result)
            print(f"{replicas} replica(s): {result['events_per_second']:>7,.0f} events/s,"
                  f" sources per member {result['sources_per_member']},"
                  f" over budget {result['over_budget']} of {result['requests']:,} requests,"
                  f" {result['distinct_delivered']:,} of {result['messages']:,} delivered,"
                  f" {result['duplicates']} duplicates", flush=True)
    print(json.dumps({"benchmark": "replicas sharing 30 sources", "results": results,
                      "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
