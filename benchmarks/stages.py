"""Where a drain's CPU goes: each stage of emulator → relay → journal → file, in µs per event.

The stages run one after the other in this process on the same data (a
RongCloud backlog served by a real emulator on loopback), each timed on its
own: the event loop's stages with its thread's CPU clock, the stages that run on
threads of their own (commit, read back, file write) with the process's, while the
loop waits for them:

- receive:   the HTTP exchange (aiohttp, the answer's bytes) through the relay's client
- parse:     the answer's JSON
- normalize: provider record → event dict
- serialize: event dict → journal row (JSON payload, routing)
- insert:    the journal's commit (SQLite, WAL, synchronous=FULL), one answer at a time
- read:      the sink runner's read back from the journal
- write:     the file sink's write (fsync per batch)
- background: what no stage took (the WAL checkpoint's thread, mostly)

    python -m benchmarks.stages --events 100000 --batch 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import orjson

from benchmarks.common import machine, start_emulator, stop
from relay.journal import NewEvent
from relay.journal.sqlite import SqliteJournal
from relay.sinks.file import FileSink, FileSinkConfig
from relay.sources.http import ProviderClient
from relay.sources.rongcloud import RongCloudSource, RongCloudSourceConfig
from relay.sources.rongcloud_records import normalize, parse_items


class Clock:
    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.spent[stage] = self.spent.get(stage, 0.0) + seconds


async def measure(events: int, batch: int, workdir: Path) -> dict[str, float]:
    emulator, banner = start_emulator(
        "rongcloud", "--port", "0", "--budget", "0", "--batch-size", str(batch),
        "--backlog", str(events), "--seed", "1", "--app-key", "bench", "--app-secret", "bench")
    clock = Clock()
    # The event loop's own stages on its thread's clock: the process's clock would charge
    # them whatever the journal's background threads (the WAL checkpoint) did meanwhile.
    # The commit, the read back and the file write run on threads of their own: the
    # process's clock, while the loop only waits for them. What no stage took is
    # "background".
    loop_cpu = time.thread_time
    cpu = time.process_time
    try:
        source = RongCloudSource("rc", RongCloudSourceConfig(
            type="rongcloud", app_key="bench", app_secret="bench", base_urls=banner["urls"]))
        client = ProviderClient("rc", connect_timeout=5, read_timeout=30, verify_tls=False)
        journal = SqliteJournal.open(workdir / "relay.db")
        await journal.register_sinks(["file"], prune=True)
        sink = FileSink("file", FileSinkConfig(type="file", path=str(workdir / "events.jsonl")))
        await sink.start()
        taken = 0
        whole = cpu()
        empty = 0
        while taken < events and empty < 50:
            endpoint = ("person", "group", "chatroom")[empty % 3] if empty else "person"
            url = f"{banner['urls'][0]}/rtmsg/{endpoint}/qrymsg.json"
            started = loop_cpu()
            answer = await client.request("POST", url, headers=source._headers())
            clock.add("receive", loop_cpu() - started)
            started = loop_cpu()
            body = orjson.loads(answer.raw)
            clock.add("parse", loop_cpu() - started)
            records, _ = parse_items(body)
            if not records:
                empty += 1
                continue
            empty = 0
            fetched_at = int(time.time() * 1000)
            started = loop_cpu()
            dicts = [normalize(r, source="rc", endpoint=endpoint, fetched_at=fetched_at)
                     for r in records]
            clock.add("normalize", loop_cpu() - started)
            started = loop_cpu()
            rows = [NewEvent.from_event(d) for d in dicts]
            clock.add("serialize", loop_cpu() - started)
            started = cpu()
            await journal.commit_batch(rows, cursors={"rc:x": str(fetched_at)})
            clock.add("insert", cpu() - started)
            taken += len(rows)
        cursor = 0
        while True:
            started = cpu()
            stored = await journal.read(cursor, 2000)
            clock.add("read", cpu() - started)
            if not stored:
                break
            started = cpu()
            await sink.deliver(stored)
            clock.add("write", cpu() - started)
            cursor = stored[-1].seq
        clock.add("background", cpu() - whole - sum(clock.spent.values()))
        await sink.close()
        await client.aclose()
        await journal.close()
    finally:
        stop(emulator)
    return {stage: spent / taken * 1e6 for stage, spent in clock.spent.items()} | {
        "events": taken}


def print_table(by_stage: dict[str, float], batch: int, events: int | None = None) -> float:
    total = sum(by_stage.values())
    count = f"{events:,} events, " if events else ""
    print(f"{count}batch {batch}; CPU µs per event by stage")
    for stage, us in by_stage.items():
        print(f"  {stage:<10} {us:7.1f} µs  {us / total * 100:5.1f} %")
    print(f"  {'total':<10} {total:7.1f} µs")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relay-stages-") as tmp:
        result = asyncio.run(measure(args.events, args.batch, Path(tmp)))
    taken = int(result.pop("events"))
    total = print_table(result, args.batch, taken)
    print(json.dumps({"benchmark": "per-stage CPU", "events": taken, "batch": args.batch,
                      "us_per_event": {k: round(v, 2) for k, v in result.items()},
                      "total_us": round(total, 2), "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
