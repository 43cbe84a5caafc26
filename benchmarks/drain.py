"""Backlog drain after an outage: every provider holds a backlog built while the relay was
down; the relay starts and each provider's rate into the file sink is measured.

RongCloud is bounded by its budget (10 requests/s per endpoint × the provider's batch
size); WuKongIM and LeanCloud by their page sizes and the relay.

    python -m benchmarks.drain --per-provider 30000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import orjson

from benchmarks.common import machine, start_relay, stop
from relay.emulators.leancloud import LeanCloudEmulator
from relay.emulators.rongcloud import RongCloudEmulator
from relay.emulators.wukongim import WuKongIMEmulator
from tests.support.configs import file_sink, write_config
from tests.support.emulators import serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-provider", type=int, default=30_000)
    parser.add_argument("--rc-batch", type=int, default=100)
    args = parser.parse_args()
    n = args.per_provider
    rc = RongCloudEmulator("bench", "bench", batch_size=args.rc_batch, budget=10, seed=1)
    rc.generate(n)
    wk = WuKongIMEmulator("tok", uids=("u1", "u2"), channels=(("g1", 2),), seed=2)
    wk.generate(n // 2)
    wk.generate_channel(n - n // 2, "g1", 2)
    lc = LeanCloudEmulator("app", "mk", seed=3)
    lc.generate(n, age=3600)
    with tempfile.TemporaryDirectory(prefix="relay-bench-drain-") as tmp, \
            serving(rc) as (_a, rc_s), serving(wk) as (_b, wk_s), serving(lc) as (_c, lc_s):
        work = Path(tmp)
        events = work / "events.jsonl"
        config = write_config(work, sources={
            "rc": {"type": "rongcloud", "app_key": "bench", "app_secret": "bench",
                   "base_urls": rc_s.urls},
            "wk": {"type": "wukongim", "base_url": wk_s.urls[0], "token": "tok",
                   "uids": ["u1", "u2"], "channels": [{"id": "g1", "type": 2}]},
            "lc": {"type": "leancloud", "base_url": lc_s.urls[0], "app_id": "app",
                   "master_key": "mk", "start": "2h"},
        }, sinks={"file": file_sink(events, batch_size=2000)}, log={"level": "error"})
        started = time.time()
        relay = start_relay(config, work / "relay.log")
        try:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                done = not any(rc.snapshot()["queued"].values()) and not wk.unacked("u1") \
                    and not wk.unacked("u2")
                if done and sum(1 for _ in events.open("rb")) >= 3 * n:
                    break
                time.sleep(0.5)
        finally:
            stop(relay)
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        count: dict[str, int] = {}
        for line in events.open("rb"):
            event = orjson.loads(line)
            p, t = event["provider"], event["fetched_at"]
            first[p] = min(first.get(p, t), t)
            last[p] = max(last.get(p, 0), t)
            count[p] = count.get(p, 0) + 1
    rates = {p: round(count[p] / max(0.001, (last[p] - first[p]) / 1000)) for p in count}
    print(json.dumps({"benchmark": "backlog drain after an outage", "per_provider": n,
                      "events": count, "events_per_second": rates,
                      "seconds_from_start": round(max(last.values()) / 1000 - started, 1),
                      "rongcloud_batch": args.rc_batch, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
