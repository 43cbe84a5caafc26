"""RongCloud request budget: utilisation while draining a backlog, and over-budget requests.

The emulator enforces 10 requests per sliding second per endpoint the way the
provider does (silent empty answers) and counts every request over it. SPEC §7
bars: 0 over-budget requests; ≥ 95 % utilisation while a backlog exists.

    python -m benchmarks.budget --per-endpoint 3000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, start_relay, stop
from relay.emulators.rongcloud import ENDPOINTS, RongCloudEmulator
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import serving


def utilisation(arrivals: list[tuple[float, bool]], budget: int) -> float:
    busy = [t for t, had_data in arrivals if had_data]
    start, end = busy[0], busy[-1]
    whole = math.floor(end - start)
    sent = sum(1 for t, _ in arrivals if start <= t < start + whole)
    return sent / (budget * whole)


def one_run(per_endpoint: int, batch: int, workdir: Path) -> dict[str, float]:
    emulator = RongCloudEmulator("bench", "bench", batch_size=batch, budget=10, seed=7)
    for endpoint in ENDPOINTS:
        emulator.generate(per_endpoint, endpoint)
    with serving(emulator) as (_loop, server):
        config = write_config(workdir, sources={"rc": rongcloud_source(
            server.urls, app_key="bench", app_secret="bench")},
            sinks={"file": file_sink(workdir / "events.jsonl")}, log={"level": "error"})
        relay = start_relay(config, workdir / "relay.log")
        try:
            deadline = time.monotonic() + 600
            while any(emulator.snapshot()["queued"].values()) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            stop(relay)
        stats = emulator.snapshot()
    result = {e: utilisation(emulator.arrivals[e], 10) for e in ENDPOINTS}
    result["over_budget"] = stats["over_budget"]
    result["requests"] = stats["requests"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-endpoint", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="relay-bench-budget-") as tmp:
            runs.append(one_run(args.per_endpoint, args.batch, Path(tmp)))
        print(json.dumps(runs[-1]))
    summary = {
        "benchmark": "RongCloud budget", "per_endpoint": args.per_endpoint, "batch": args.batch,
        "utilisation_median": {e: round(statistics.median(r[e] for r in runs), 4)
                               for e in ENDPOINTS},
        "utilisation_min": round(min(r[e] for r in runs for e in ENDPOINTS), 4),
        "over_budget_total": sum(r["over_budget"] for r in runs),
        "requests_total": sum(r["requests"] for r in runs), "machine": machine(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
