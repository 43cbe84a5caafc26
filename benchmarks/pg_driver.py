"""PostgreSQL driver comparison for the shared journal: asyncpg against psycopg 3 (async).

One real server (tests/support/postgres.py, fsync on), a fresh database per run, each
driver through its own pool (asyncpg.create_pool, psycopg_pool.AsyncConnectionPool):

a. commit: batches of 100 events (seq bigint identity, id text unique, fetched_at bigint,
   routing bytea, payload bytea of ~600 bytes; 10 of each batch repeat ids of the batch
   before, as redeliveries do) inserted with ON CONFLICT (id) DO NOTHING, plus one cursor
   upsert, in one transaction per batch, one batch after another (one writer).  Two ways
   to send the rows: one INSERT ... SELECT FROM unnest(arrays) RETURNING seq, and the
   driver's executemany.  Reported: events/s and CPU µs per event of this process.
b. read: 1,000 rows by seq range (WHERE seq > $1 ORDER BY seq LIMIT 1000) across the
   table: ms per read and CPU µs per row.
c. LISTEN/NOTIFY: time from sending NOTIFY on one connection to the listener's wake-up
   on another, one at a time: p50 / p99 µs.

Each is run 3 times (--runs); the medians are reported.  The project depends on asyncpg;
psycopg comes with the bench extra (`pip install -e '.[bench]'`).

    python -m benchmarks.pg_driver --batches 400 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.common import machine
from tests.support.postgres import PostgresServer

BATCH = 100
DUPLICATES = 10
PAYLOAD = 600
READ_ROWS = 1000

SCHEMA = """
CREATE TABLE events (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         text NOT NULL UNIQUE,
    fetched_at bigint NOT NULL,
    routing    bytea NOT NULL,
    payload    bytea NOT NULL
);
CREATE TABLE cursors (name text PRIMARY KEY, seq bigint NOT NULL);
"""


@dataclass
class Batch:
    ids: list[str]
    fetched_at: list[int]
    routing: list[bytes]
    payload: list[bytes]


def make_batches(count: int) -> list[Batch]:
    """*count* batches; each repeats the last DUPLICATES ids of the one before."""
    batches: list[Batch] = []
    n = 0
    previous: list[str] = []
    now = int(time.time() * 1000)
    for _ in range(count):
        ids = previous[-DUPLICATES:]
        while len(ids) < BATCH:
            ids.append(f"rc:{n:012d}-{os.urandom(4).hex()}")
            n += 1
        batches.append(Batch(ids=ids, fetched_at=[now + i for i in range(BATCH)],
                             routing=[b"rc\x00direct:u1|u2\x00" + i.encode()[:16] for i in ids],
                             payload=[os.urandom(PAYLOAD // 2).hex().encode() for _ in ids]))
        previous = ids
    return batches


def cpu() -> float:
    return time.process_time()


# ---------------------------------------------------------------------------
# asyncpg
# ---------------------------------------------------------------------------

INSERT_UNNEST = ("INSERT INTO events (id, fetched_at, routing, payload) "
                 "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::bytea[]) "
                 "ON CONFLICT (id) DO NOTHING RETURNING seq")
INSERT_ONE = ("INSERT INTO events (id, fetched_at, routing, payload) VALUES ($1, $2, $3, $4) "
              "ON CONFLICT (id) DO NOTHING")
CURSOR = ("INSERT INTO cursors (name, seq) VALUES ($1, $2) "
          "ON CONFLICT (name) DO UPDATE SET seq = EXCLUDED.seq")
READ = ("SELECT seq, id, fetched_at, routing, payload FROM events WHERE seq > $1 "
        "ORDER BY seq LIMIT $2")


def psycopg_sql(sql: str) -> str:
    """The same statement with psycopg's placeholders."""
    for n in range(9, 0, -1):
        sql = sql.replace(f"${n}", "%s")
    return sql


class AsyncpgDriver:
    name = "asyncpg"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pool: Any = None

    async def open(self) -> None:
        import asyncpg
        self.pool = await asyncpg.create_pool(self.dsn, min_size=2, max_size=2)

    async def close(self) -> None:
        await self.pool.close()

    async def execute(self, sql: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(sql)

    async def commit_unnest(self, batch: Batch, cursor_seq: int) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(INSERT_UNNEST, batch.ids, batch.fetched_at, batch.routing,
                                    batch.payload)
            await conn.execute(CURSOR, "rc/person", cursor_seq)
        return len(rows)

    async def commit_executemany(self, batch: Batch, cursor_seq: int) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(INSERT_ONE, list(zip(batch.ids, batch.fetched_at,
                                                        batch.routing, batch.payload,
                                                        strict=True)))
            await conn.execute(CURSOR, "rc/person", cursor_seq)
        return BATCH

    async def read(self, after: int) -> list[tuple[Any, ...]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(READ, after, READ_ROWS)
        return [tuple(r) for r in rows]

    async def notify_latencies(self, count: int) -> list[float]:
        import asyncpg
        listener = await asyncpg.connect(self.dsn)
        woken: asyncio.Queue[float] = asyncio.Queue()
        try:
            await listener.add_listener("journal", lambda *_: woken.put_nowait(time.perf_counter()))
            latencies: list[float] = []
            async with self.pool.acquire() as conn:
                for n in range(count):
                    sent = time.perf_counter()
                    await conn.execute(f"NOTIFY journal, '{n}'")
                    latencies.append(await asyncio.wait_for(woken.get(), 10) - sent)
            return latencies
        finally:
            await listener.close()


# ---------------------------------------------------------------------------
# psycopg 3
# ---------------------------------------------------------------------------


class PsycopgDriver:
    name = "psycopg"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pool: Any = None

    async def open(self) -> None:
        from psycopg_pool import AsyncConnectionPool
        self.pool = AsyncConnectionPool(self.dsn, min_size=2, max_size=2, open=False)
        await self.pool.open(wait=True)

    async def close(self) -> None:
        await self.pool.close()

    async def execute(self, sql: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(sql)

    async def commit_unnest(self, batch: Batch, cursor_seq: int) -> int:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(psycopg_sql(INSERT_UNNEST), (batch.ids, batch.fetched_at,
                                                                 batch.routing, batch.payload))
            rows = await cur.fetchall()
            await conn.execute(psycopg_sql(CURSOR), ("rc/person", cursor_seq))
        return len(rows)

    async def commit_executemany(self, batch: Batch, cursor_seq: int) -> int:
        async with self.pool.connection() as conn, conn.transaction():
            async with conn.cursor() as cur:
                await cur.executemany(psycopg_sql(INSERT_ONE), list(zip(
                    batch.ids, batch.fetched_at, batch.routing, batch.payload, strict=True)))
            await conn.execute(psycopg_sql(CURSOR), ("rc/person", cursor_seq))
        return BATCH

    async def read(self, after: int) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            # Binary results: half the CPU of text ones for these rows (its best case).
            cur = conn.cursor(binary=True)
            await cur.execute(psycopg_sql(READ), (after, READ_ROWS))
            rows: list[tuple[Any, ...]] = await cur.fetchall()
        return rows

    async def notify_latencies(self, count: int) -> list[float]:
        import psycopg
        listener = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        woken: asyncio.Queue[float] = asyncio.Queue()

        async def listen() -> None:
            async for _ in listener.notifies():
                woken.put_nowait(time.perf_counter())

        try:
            await listener.execute("LISTEN journal")
            task = asyncio.create_task(listen())
            latencies: list[float] = []
            async with self.pool.connection() as conn:
                await conn.set_autocommit(True)
                for n in range(count):
                    sent = time.perf_counter()
                    await conn.execute(f"NOTIFY journal, '{n}'")
                    latencies.append(await asyncio.wait_for(woken.get(), 10) - sent)
                await conn.set_autocommit(False)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return latencies
        finally:
            await listener.close()


DRIVERS: dict[str, Callable[[str], Any]] = {"asyncpg": AsyncpgDriver, "psycopg": PsycopgDriver}


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------


async def timed_commits(commit: Callable[[Batch, int], Awaitable[int]],
                        batches: list[Batch]) -> dict[str, float]:
    for warm in batches[:5]:  # connections, prepared statements, type caches
        await commit(warm, 0)
    rest = batches[5:]
    wall, started = time.perf_counter(), cpu()
    for n, batch in enumerate(rest):
        await commit(batch, n)
    wall, used = time.perf_counter() - wall, cpu() - started
    events = len(rest) * BATCH
    return {"events_per_second": events / wall, "cpu_us_per_event": used / events * 1e6}


async def one_run(server: PostgresServer, driver_name: str, batches: list[Batch],
                  notifies: int) -> dict[str, float]:
    result: dict[str, float] = {}
    for method in ("unnest", "executemany"):
        driver = DRIVERS[driver_name](server.create_database())
        await driver.open()
        try:
            await driver.execute(SCHEMA)
            commit = driver.commit_unnest if method == "unnest" else driver.commit_executemany
            for key, value in (await timed_commits(commit, batches)).items():
                result[f"{method}_{key}"] = value
            if method == "unnest":
                result.update(await reads(driver))
                lat = sorted(await driver.notify_latencies(notifies))
                result["notify_p50_us"] = statistics.median(lat) * 1e6
                result["notify_p99_us"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6
        finally:
            await driver.close()
    return result


async def reads(driver: Any) -> dict[str, float]:
    await driver.read(0)
    wall, started, rows, after, count = time.perf_counter(), cpu(), 0, 0, 0
    while count < 40:
        got = await driver.read(after)
        if len(got) < READ_ROWS:
            after = 0
            continue
        rows += len(got)
        after = int(got[-1][0])
        count += 1
    wall, used = time.perf_counter() - wall, cpu() - started
    return {"read_ms_per_1000": wall / count * 1000, "read_cpu_us_per_row": used / rows * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=400, help="batches of 100 per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--notifies", type=int, default=300)
    parser.add_argument("--drivers", default="asyncpg,psycopg")
    args = parser.parse_args()
    drivers = args.drivers.split(",")
    modules = {"asyncpg": ("asyncpg",), "psycopg": ("psycopg", "psycopg_pool")}
    for driver in drivers:
        for module in modules[driver]:
            if importlib.util.find_spec(module) is None:
                raise SystemExit(f"{module} is not installed: pip install -e '.[bench]'")
    batches = make_batches(args.batches)
    results: dict[str, list[dict[str, float]]] = {d: [] for d in drivers}
    with PostgresServer(fsync=True) as server:
        for run in range(args.runs):
            # Alternate the order so neither driver always runs on a warmer server.
            for name in drivers if run % 2 == 0 else drivers[::-1]:
                results[name].append(asyncio.run(one_run(server, name, batches, args.notifies)))
                print(f"run {run + 1} {name}: " + ", ".join(
                    f"{k} {v:,.1f}" for k, v in results[name][-1].items()), flush=True)
        version = server.version
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items()}
    keys = list(next(iter(medians.values())))
    print(f"\nmedians of {args.runs} runs; PostgreSQL {version}, fsync on; {machine()}")
    print(f"{'':34}" + "".join(f"{d:>14}" for d in drivers))
    for key in keys:
        print(f"{key:34}" + "".join(f"{medians[d][key]:>14,.1f}" for d in drivers))
    print(json.dumps({"benchmark": "PostgreSQL driver comparison", "batch": BATCH,
                      "batches_per_run": args.batches, "runs": args.runs,
                      "postgres": version, "medians": medians, "all_runs": results,
                      "versions": driver_versions(drivers), "machine": machine()}, indent=2))


def driver_versions(drivers: list[str]) -> dict[str, str]:
    from importlib.metadata import version
    names = {"asyncpg": ["asyncpg"], "psycopg": ["psycopg", "psycopg-binary", "psycopg-pool"]}
    out: dict[str, str] = {}
    for driver in drivers:
        for dist in names[driver]:
            try:
                out[dist] = version(dist)
            except Exception:
                out[dist] = "not installed"
    return out


if __name__ == "__main__":
    main()
