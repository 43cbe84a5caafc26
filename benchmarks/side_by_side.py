"""The relay against Benthos on the same drain: RongCloud emulator (no budget) → file.

Runs alternate, Benthos then the relay, each against a fresh emulator process
holding N messages (pages of ``--batch`` records over person / group /
chatroom), each writing JSON lines to a file. For each tool: events/s from the
first fetch (the ``fetched_at`` both write into every line, taken when an
answer arrives) to the moment the file holds all N; events/s from the
process's start to that moment (start-up included: Python imports for the
relay, next to nothing for a Go binary); CPU per event (user + system of the
tool's process, start-up included, from /proc); peak RSS (``VmHWM``). Printed
as medians, with the ratio relay / Benthos.

    python -m benchmarks.side_by_side --benthos /path/to/benthos --runs 5 --events 200000

What Benthos is given (its config is built below): one loop per endpoint, as
the relay has — a ``generate`` input that draws a nonce and a timestamp and
signs them into metadata, an ``http`` processor POSTing the signed request
(an ``http_client`` input cannot do this: it interpolates each header on its
own, so Nonce, Timestamp and Signature could disagree when a second turns),
a 50 ms pause after an empty answer (the relay's ``idle_interval`` here);
then a Bloblang mapping from each record to the relay's event schema (string
items parsed, content parsed when it holds JSON, channel types mapped,
conversation keys, chatroom ids from SHA-256 of the record), ``unarchive``
to one message per event, ``dedupe`` on the event id in an in-memory cache,
``file`` output (lines). Both tools parse, sign and normalize the same way
(the lines differ only in key order). With ``--plain`` Benthos skips the
schema: records as they come, deduplicated on ``msgUID`` — cheaper than
the relay's work, the figure a first Benthos config would show.

Why it is not a like-for-like race: Benthos does none of what the relay does
to not lose or repeat a message. The relay commits every answer to its SQLite
journal (WAL, ``synchronous=FULL``: an fsync per group commit) before it asks
that endpoint for the next page (consume-on-read: a page not journaled is
lost), delivers to the file from the journal, and fsyncs the file per batch;
its deduplication is the journal's, so it survives a restart. Benthos holds
the page only in memory (a crash after the fetch loses it), forgets its
dedupe cache on exit, and never fsyncs the output. The relay also keeps cursors, health and
budget state per endpoint. So the figures bound what the durability costs
against a tuned Go stream processor doing the rest of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import (
    cpu_seconds,
    machine,
    rss_mb,
    start_emulator,
    stop,
    summary,
    wait_lines,
)
from benchmarks.pipeline_file import one_run

BUILD_HINT = """\
a Benthos binary is needed: --benthos /path/to/benthos. To build one (Go >= 1.26):
    git clone https://github.com/redpanda-data/benthos && cd benthos
    git checkout v4.76.0 && go build ./cmd/benthos     # leaves ./benthos"""

APP_KEY = APP_SECRET = "bench"
ENDPOINTS = ("person", "group", "chatroom")

# One request's signing: the three headers come from one mapping, so they agree.
_SIGN = f"""root = ""
let ts = timestamp_unix().string()
let nonce = nanoid(16)
meta nonce = $nonce
meta ts = $ts
meta sig = ("{APP_SECRET}" + $nonce + $ts).hash("sha1").encode("hex")
"""

# The relay's normalization (relay/sources/rongcloud_records.py), in Bloblang.
_NORMALIZE = """let fetched = @fetched_at.int64()
let ep = @endpoint
let records = this.results.map_each(i -> if i.type() == "string" { i.parse_json() } else { i })
root = $records.map_each(r -> {"r": r, "f": $fetched, "ep": $ep})
"""

_EVENT = """map channel_type {
  root = match this {
    "PERSON" => "direct"
    "PERSONS" => "discussion"
    "GROUP" => "group"
    "TEMPGROUP" => "chatroom"
    "CUSTOMERSERVICE" => "customer_service"
    "NOTIFY" => "system"
    "MC" => "app_public_service"
    "MP" => "public_service"
    _ => "unknown"
  }
}
let r = this.r
let chat = this.ep == "chatroom"
let default_type = if this.ep == "person" { "direct" } else { "group" }
let ctype = if $chat { "chatroom" } else if $r.channelType == null { $default_type } else {
  $r.channelType.apply("channel_type")
}
let nid = if $r.msgUID != null { $r.msgUID } else {
  "h" + $r.format_json(no_indent: true).hash("sha256").encode("hex").slice(0, 32)
}
let c = $r.content
let text = if $c.type() == "string" { $c.trim() } else { "" }
let parsed = if $text.has_prefix("{") || $text.has_prefix("[") {
  $c.parse_json().catch(null)
} else { null }
let native_json = ["object", "array"].contains($c.type())
let structured = $native_json || ["object", "array"].contains($parsed.type())
let pair = [$r.fromUserId, $r.toUserId].sort().join("|")
root.schema = "im-relay.event/1"
root.id = "rc:" + $nid
root.source = "rc"
root.provider = "rongcloud"
root.kind = if $chat { "presence" } else { "message" }
root.type = $r.objectName | ""
root.channel = {"type": $ctype, "id": $r.toUserId}
root.conversation = if $ctype == "direct" { "direct:" + $pair } else { $ctype + ":" + $r.toUserId }
root.sender = $r.fromUserId
root.recipient = $r.toUserId
root.sent_at = $r.msgTimestamp.int64()
root.fetched_at = this.f
root.content = if $native_json { $c } else if $structured { $parsed } else { $c }
root.content_encoding = if $c == null { "none" } else if $structured { "json" } else { "text" }
root.seq = null
root.native = $r.without("content")
"""


# ``--plain``: no event schema, records as they come (string items parsed), the
# id a dedupe key needs and the fetch time; what a first Benthos config would do.
_PLAIN = """let fetched = @fetched_at.int64()
let records = this.results.map_each(i -> if i.type() == "string" { i.parse_json() } else { i })
root = $records.map_each(r -> r.merge({"id": r.msgUID | r.without("content").format_json(),
                                       "fetched_at": $fetched}))
"""


def benthos_config(base_url: str, out: Path, *, plain: bool = False) -> dict[str, Any]:
    def endpoint_loop(endpoint: str) -> dict[str, Any]:
        return {
            "generate": {"interval": "", "mapping": _SIGN + f'meta endpoint = "{endpoint}"\n'},
            "processors": [
                {"http": {
                    "url": f"{base_url}/rtmsg/{endpoint}/qrymsg.json", "verb": "POST",
                    "headers": {"App-Key": APP_KEY, "Nonce": "${! @nonce }",
                                "Timestamp": "${! @ts }", "Signature": "${! @sig }",
                                "Content-Type": "application/x-www-form-urlencoded"},
                }},
                {"mapping": "meta fetched_at = timestamp_unix_milli()\nroot = this"},
                {"switch": [{"check": "this.size == 0", "processors": [
                    {"sleep": {"duration": "50ms"}}, {"mapping": "root = deleted()"}]}]},
            ],
        }

    return {
        "http": {"enabled": False},
        "logger": {"level": "WARN"},
        "input": {"broker": {"inputs": [endpoint_loop(e) for e in ENDPOINTS]}},
        "pipeline": {"processors": [
            {"mapping": _PLAIN if plain else _NORMALIZE},
            {"unarchive": {"format": "json_array"}},
            *([] if plain else [{"mapping": _EVENT}]),
            {"dedupe": {"cache": "seen", "key": '${! json("id") }'}},
        ]},
        "cache_resources": [{"label": "seen", "memory": {"default_ttl": "1h"}}],
        "output": {"file": {"path": str(out), "codec": "lines"}},
    }


def _first_fetch_ms(out: Path) -> int:
    with out.open("rb") as f:
        head = [line for _, line in zip(range(5000), f, strict=False)]
    return min(int(orjson.loads(line)["fetched_at"]) for line in head)


def _distinct_ids(out: Path) -> int:
    with out.open("rb") as f:
        return len({orjson.loads(line)["id"] for line in f})


def benthos_run(binary: Path, events: int, batch: int, workdir: Path,
                plain: bool = False) -> dict[str, float]:
    emulator, banner = start_emulator(
        "rongcloud", "--port", "0", "--budget", "0", "--batch-size", str(batch),
        "--backlog", str(events), "--seed", "1", "--app-key", APP_KEY, "--app-secret", APP_SECRET,
    )
    out = workdir / "events.jsonl"
    config = workdir / "benthos.yaml"
    config.write_text(json.dumps(benthos_config(banner["urls"][0], out, plain=plain), indent=1))
    started = time.time()
    with (workdir / "benthos.log").open("ab") as log:
        proc = subprocess.Popen([str(binary), "-c", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                done = wait_lines(out, events, timeout=1)
                break
            except TimeoutError:
                # A mapping that fails on a record logs it and goes on: stop at once.
                failed = b"level=error" in (workdir / "benthos.log").read_bytes()
                if failed or proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (workdir / "benthos.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(
                        f"benthos did not write {events} lines:\n{log_text}") from None
        cpu = cpu_seconds(proc.pid)
        peak = rss_mb(proc.pid, "VmHWM")
    finally:
        stop(proc)
        stop(emulator)
    distinct = _distinct_ids(out)
    if distinct != events:
        raise RuntimeError(f"benthos wrote {distinct} distinct events, expected {events}")
    return {"events_per_second": events / (done - _first_fetch_ms(out) / 1000),
            "events_per_second_from_start": events / (done - started),
            "cpu_us_per_event": cpu / events * 1e6, "peak_rss_mb": peak}


def relay_run(events: int, batch: int, workdir: Path) -> dict[str, float]:
    figures = one_run(events, batch, workdir)
    out = workdir / "events.jsonl"
    distinct = _distinct_ids(out)
    if distinct != events:
        raise RuntimeError(f"the relay wrote {distinct} distinct events, expected {events}")
    return figures


COLUMNS = (
    ("events_per_second", "events/s (1st fetch → last line)", "{:,.0f}"),
    ("events_per_second_from_start", "events/s (start → last line)", "{:,.0f}"),
    ("cpu_us_per_event", "CPU µs/event", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key, _, _ in COLUMNS}


def print_table(benthos: dict[str, float], relay: dict[str, float], runs: int) -> None:
    width = max(len(title) for _, title, _ in COLUMNS)
    print(f"\nmedians of {runs} runs each")
    print(f"{'':<{width}}  {'Benthos':>12}  {'relay':>12}  {'relay/Benthos':>13}")
    for key, title, fmt in COLUMNS:
        print(f"{title:<{width}}  {fmt.format(benthos[key]):>12}  {fmt.format(relay[key]):>12}"
              f"  {relay[key] / benthos[key]:>13.2f}")


def _line(tool: str, run: int, figures: dict[str, float]) -> str:
    return (f"run {run} {tool:<7}: {figures['events_per_second']:,.0f} events/s"
            f" ({figures['events_per_second_from_start']:,.0f} from start),"
            f" {figures['cpu_us_per_event']:.1f} µs CPU per event,"
            f" peak RSS {figures['peak_rss_mb']:.0f} MiB, load {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benthos", type=Path, help="path to a Benthos binary")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=100, help="emulator batch size")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--plain", action="store_true",
                        help="Benthos skips the event schema (records as they come, deduplicated)")
    args = parser.parse_args()
    binary: Path | None = args.benthos
    if binary is None or not (binary.is_file() and os.access(binary, os.X_OK)):
        which = shutil.which(str(binary)) if binary is not None else None
        if which is None:
            missing = f"{binary} is not an executable file" if binary else "no --benthos given"
            print(f"{missing}; {BUILD_HINT}", file=sys.stderr)
            raise SystemExit(2)
        binary = Path(which)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             check=False).stdout.split("\n", 1)[0]
    print(f"Benthos {version.removeprefix('Version: ')} ({binary}); {machine()}")
    loads = [os.getloadavg()[0]]
    runs: dict[str, list[dict[str, float]]] = {"benthos": [], "relay": []}
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="relay-vs-benthos-") as tmp:
            runs["benthos"].append(benthos_run(binary, args.events, args.batch, Path(tmp),
                                               plain=args.plain))
        print(_line("Benthos", run, runs["benthos"][-1]), flush=True)
        loads.append(os.getloadavg()[0])
        with tempfile.TemporaryDirectory(prefix="relay-vs-benthos-") as tmp:
                runs["relay"].append(relay_run(args.events, args.batch, Path(tmp)))
        print(_line("relay", run, runs["relay"][-1]), flush=True)
        loads.append(os.getloadavg()[0])
    benthos, relay = medians(runs["benthos"]), medians(runs["relay"])
    print_table(benthos, relay, args.runs)
    result = {"benchmark": "relay vs Benthos, emulator→file", "events": args.events,
              "benthos_config": "plain" if args.plain else "event schema",
              "batch": args.batch, "benthos_version": version.removeprefix("Version: "),
              "benthos": {"events_per_second": summary(
                  [r["events_per_second"] for r in runs["benthos"]]), **benthos},
              "relay": {"events_per_second": summary(
                  [r["events_per_second"] for r in runs["relay"]]), **relay},
              "ratio_relay_over_benthos": {key: relay[key] / benthos[key]
                                           for key, _, _ in COLUMNS},
              "load_average_1m": {"min": min(loads), "max": max(loads)},
              "machine": machine()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
