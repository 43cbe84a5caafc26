"""Evacuating a large LeanCloud app: rate at the default and at a raised quota, RSS, and the
time projected for 100 million messages.

The emulator (its own process) holds ``--messages`` of history over ``--conversations``;
the relay runs ``relay evacuate`` into the default JSONL archive.

- default: the emulator's default quota (1,800 requests/min, a commercial app) and the
  evacuation's default budget (900/min, half of it: the app's own clients need the
  rest); measured for ``--seconds`` of the drain, then stopped.
- raised: the documented maximum quota (9,000/min) given to the evacuation whole; run
  to the end with ``--exit-when-done`` (drain, conversations, check, report).

The time an evacuation takes is bounded by its budget, ``messages ÷ (requests per
minute × 1,000)`` minutes, or by the relay's own rate, whichever is slower.

    python -m benchmarks.evacuate                      # 2,000,000 messages, ~5 minutes
    python -m benchmarks.evacuate --messages 500000    # quicker
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import free_port, machine, rss_mb, start_emulator, stop

TARGET = 100_000_000


def drain_state(journal: Path) -> dict[str, Any]:
    if not journal.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute("SELECT value FROM cursors WHERE key = 'lc:evacuation:drain'"
                               ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return {}
    return json.loads(row[0]) if row else {}


def write_config(work: Path, url: str, budget: int | None) -> Path:
    evacuation = f"requests_per_minute = {budget}\n" if budget else ""
    path = work / "relay.toml"
    path.write_text(f"""
[journal]
path = "{work / 'relay.db'}"
[metrics]
enabled = false
[log]
level = "warning"
format = "json"
[sources.lc]
type = "leancloud"
base_url = "{url}"
app_id = "bench-app"
master_key = "bench-master"
settle_delay = "1s"
[sources.lc.evacuation]
{evacuation}progress_interval = "5s"
""")
    return path


def run(name: str, args: argparse.Namespace, *, quota: int, budget: int | None,
        to_the_end: bool) -> dict[str, Any]:
    port = free_port()
    started = time.monotonic()
    emulator, _ = start_emulator(
        "leancloud", "--port", str(port), "--app-id", "bench-app", "--master-key",
        "bench-master", "--history", str(args.messages), "--conversations",
        str(args.conversations), "--chatrooms", str(args.chatrooms), "--rate-limit",
        str(quota), "--retry-after", "--seed", "7")
    generated_in = time.monotonic() - started
    emulator_rss = rss_mb(emulator.pid)
    with tempfile.TemporaryDirectory(prefix=f"relay-bench-evacuate-{name}-") as tmp:
        work = Path(tmp)
        config = write_config(work, f"http://127.0.0.1:{port}", budget)
        command = [sys.executable, "-m", "relay", "evacuate", "--config", str(config),
                   "--source", "lc", *(["--exit-when-done"] if to_the_end else [])]
        out = (work / "relay.out").open("wb")
        began = time.monotonic()
        relay = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        samples: list[tuple[float, int]] = []
        peak = 0.0
        try:
            deadline = began + (args.timeout if to_the_end else args.seconds)
            while time.monotonic() < deadline and relay.poll() is None:
                time.sleep(0.5)
                peak = max(peak, rss_mb(relay.pid))
                state = drain_state(work / "relay.db")
                if state:
                    samples.append((time.monotonic(), int(state["exported"])))
        finally:
            peak = max(peak, rss_mb(relay.pid, "VmHWM"))
            stop(relay)
            out.close()
            stop(emulator)
        elapsed = time.monotonic() - began
        report_file = work / "evacuation" / "lc" / "report.json"
        report = json.loads(report_file.read_text()) if report_file.exists() else None
    # The drain's steady rate: from 3 s after the first batch to the last sample that grew.
    steady = [s for s in samples if s[0] >= samples[0][0] + 3] if samples else []
    growing = [s for s in steady if s[1] < (steady[-1][1] if steady else 0)] or steady
    rate = 0.0
    if len(growing) >= 2:
        (t0, e0), (t1, e1) = growing[0], growing[-1]
        rate = (e1 - e0) / max(0.001, t1 - t0)
    limit = (budget or 900) * 1000 / 60  # messages/s the budget allows
    result: dict[str, Any] = {
        "run": name, "quota_per_minute": quota, "budget_per_minute": budget or 900,
        "emulator_generated_seconds": round(generated_in, 1),
        "emulator_rss_mb": round(emulator_rss), "drain_rate": round(rate),
        "budget_limit_rate": round(limit), "share_of_budget": round(rate / limit, 3),
        "relay_peak_rss_mb": round(peak), "seconds": round(elapsed, 1),
        "projected_100m_hours": round(TARGET / rate / 3600, 2) if rate else None,
        "budget_bound_100m_hours": round(TARGET / ((budget or 900) * 1000) / 60, 2),
    }
    if report:
        v = report["verification"]
        result.update(exit_when_done=True, complete=report["complete"],
                      exported=report["exported_messages"], requests=report["requests"],
                      conversations_checked=v["conversations_checked"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2_000_000)
    parser.add_argument("--conversations", type=int, default=2_000)
    parser.add_argument("--chatrooms", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=45.0,
                        help="How long the default-quota run is measured.")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    runs = [run("default", args, quota=1800, budget=None, to_the_end=False),
            run("raised", args, quota=9000, budget=9000, to_the_end=True)]
    print(f"{'run':<8} {'quota/min':>9} {'budget/min':>10} {'msg/s':>8} {'of budget':>9}"
          f" {'RSS MB':>7} {'100M at this rate':>18} {'100M at the budget':>19}")
    for r in runs:
        print(f"{r['run']:<8} {r['quota_per_minute']:>9,} {r['budget_per_minute']:>10,}"
              f" {r['drain_rate']:>8,} {r['share_of_budget']:>9.0%} {r['relay_peak_rss_mb']:>7}"
              f" {r['projected_100m_hours']:>16} h {r['budget_bound_100m_hours']:>17} h")
    print(json.dumps({"benchmark": "evacuate a LeanCloud app", "messages": args.messages,
                      "conversations": args.conversations + args.chatrooms, "runs": runs,
                      "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
