"""The evacuation's pure parts: configuration, figures and ETA, progress lines, status
output, the Retry-After clamp and the verification sample."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import orjson
import pytest

from relay.config import ConfigError, parse_config
from relay.evacuate import EvacuationError, conversation_line, prepare
from relay.progress import (
    Display,
    Figures,
    RateMeter,
    duration,
    line,
    status_entries,
    status_lines,
)
from relay.sinks.file import FileSinkConfig
from relay.sources.leancloud import LeanCloudSourceConfig
from relay.sources.leancloud_api import clamp_remote_delay, sampled

LC = {"type": "leancloud", "base_url": "http://127.0.0.1:1", "app_id": "app",
      "master_key": "mk"}


def config(**extra: object) -> dict[str, object]:
    return {"journal": {"path": "/srv/relay/relay.db"}, "sources": {"lc": LC}, **extra}


def test_prepare_adds_a_default_archive_and_reads_from_the_first_message() -> None:
    relay_config, paths = prepare(parse_config(config()), "lc")
    source = relay_config.sources["lc"]
    assert isinstance(source, LeanCloudSourceConfig)
    assert source.start == "earliest"
    assert source.requests_per_minute == source.evacuation.requests_per_minute == 900
    (sink,) = relay_config.sinks.values()
    assert isinstance(sink, FileSinkConfig)
    assert sink.path == "/srv/relay/evacuation/lc/events.jsonl"
    assert sink.rotate_bytes == 1024**3
    assert paths.archives == ("/srv/relay/evacuation/lc/events.jsonl",)
    assert paths.report_json == Path("/srv/relay/evacuation/lc/report.json")
    assert paths.conversations == Path("/srv/relay/evacuation/lc/conversations.jsonl")


def test_prepare_keeps_configured_sinks_and_settings(tmp_path: Path) -> None:
    lc = {**LC, "evacuation": {"requests_per_minute": 1200, "verify": "sample",
                               "directory": str(tmp_path / "out")}}
    relay_config, paths = prepare(parse_config(config(
        sources={"lc": lc, "rc": {"type": "rongcloud", "app_key": "k", "app_secret": "s",
                                  "base_urls": ["http://127.0.0.1:2"]}},
        sinks={"files": {"type": "file", "path": str(tmp_path / "all.jsonl")},
               "others": {"type": "file", "path": str(tmp_path / "rc.jsonl"),
                          "filter": {"sources": ["rc"]}},
               "bus": {"type": "kafka", "bootstrap_servers": "127.0.0.1:9", "topic": "t"}})),
        "lc")
    assert set(relay_config.sinks) == {"files", "others", "bus"}
    assert set(relay_config.sources) == {"lc", "rc"}  # the other sources keep running
    assert relay_config.sources["lc"].requests_per_minute == 1200
    assert paths.archives == (str(tmp_path / "all.jsonl"),)
    assert paths.directory == tmp_path / "out"


@pytest.mark.parametrize(("name", "message"), [("nope", "no source 'nope'"),
                                               ("rc", "only LeanCloud sources")])
def test_prepare_refuses_other_sources(name: str, message: str) -> None:
    parsed = parse_config(config(sources={"lc": LC, "rc": {
        "type": "rongcloud", "app_key": "k", "app_secret": "s",
        "base_urls": ["http://127.0.0.1:2"]}}))
    with pytest.raises(EvacuationError, match=message):
        prepare(parsed, name)


def test_the_evacuation_budget_is_bounded_by_the_documented_quota() -> None:
    with pytest.raises(ConfigError, match=r"sources\.lc\.evacuation\.requests_per_minute"):
        parse_config(config(sources={"lc": {**LC, "evacuation": {"requests_per_minute": 9001}}}))


def test_rate_meter_eta_from_the_observed_pace() -> None:
    meter = RateMeter(window=60)
    assert meter.rate() is None
    assert meter.eta(0, 100) is None
    # 10 s of history read per second, 500 messages per second.
    for t in range(11):
        meter.add(500 * t, 1_000_000 + 10_000 * t, now=100.0 + t)
    assert meter.rate() == pytest.approx(500)
    assert meter.eta(1_100_000, 1_100_000 + 3_600_000) == pytest.approx(360)
    assert meter.eta(1_200_000, 1_100_000) == 0
    # Old samples fall out of the window: the rate follows the current pace.
    for t in range(11, 200):
        meter.add(500 * 10 + 100 * (t - 10), 0, now=100.0 + t)
    assert meter.rate() == pytest.approx(100)


def test_progress_line_has_every_figure() -> None:
    f = Figures("lc", exported=1_234_567, quarantined=2, first_ts=1_500_000_000_000,
                cursor_ts=1_600_000_000_000, now_ms=1_700_000_000_000, requests=4321,
                requests_last_minute=880, budget_per_minute=900, rate=14_000.4,
                eta_seconds=3 * 3600 + 120)
    text = line(f)
    for part in ("1,234,567 messages", "2 quarantined", "2017-07-14 02:40", "2020-09-13 12:26",
                 "now 2023-11-14 22:13", "(50.0%)", "880/900 per min", "4,321 total",
                 "14,000 msg/s", "ETA 3h02m"):
        assert part in text, (part, text)
    out = io.StringIO()
    display = Display(60, out=out, interactive=False)
    display.update(f)
    display.update(f)  # within the interval: not printed again
    display.update(f, force=True)
    display.close()
    assert out.getvalue().count("evacuation lc") == 2
    assert duration(None) == "?"
    assert duration(90) == "90s"
    assert duration(3 * 86400 + 7200) == "3d02h"


def test_status_reads_the_figures_from_the_cursors() -> None:
    figures = Figures("lc", phase="verify", exported=10, requests=7, budget_per_minute=900,
                      verify_total=50, verify_checked=20, matching=19, repaired=1,
                      repaired_messages=3)
    cursors = {
        "lc:evacuation": orjson.dumps({"phase": "verify",
                                       "figures": figures.to_json()}).decode(),
        # Committed with the last batch, after the periodic figures.
        "lc:evacuation:drain": json.dumps({"exported": 5000, "quarantined": 1,
                                           "first_ts": 1, "cursor_ts": 2}),
        "lc:messages:cursor": "[2,\"m\"]",
        "broken:evacuation": "{not json",
    }
    (entry,) = status_entries(cursors)
    assert (entry.phase, entry.exported, entry.quarantined, entry.cursor_ts) == \
        ("verify", 5000, 1, 2)
    text = "\n".join(status_lines(cursors))
    assert "evacuation lc" in text
    assert "5,000 messages (1 quarantined)" in text
    assert "20/50 conversations: 19 matching, 1 repaired (3 messages)" in text


@pytest.mark.parametrize(("value", "expected"), [
    (None, 60.0), (float("nan"), 60.0), (float("inf"), 60.0), (-5.0, 60.0), (3.0, 3.0),
    (86_400.0, 120.0)])
def test_retry_after_is_clamped(value: float | None, expected: float) -> None:
    assert clamp_remote_delay(value, 60.0, 120.0) == expected
    assert math.isfinite(clamp_remote_delay(value, 600.0, 120.0))


def test_the_sample_is_fixed_per_conversation() -> None:
    ids = [f"{n:024x}" for n in range(4000)]
    chosen = [c for c in ids if sampled(c, 0.1)]
    assert chosen == [c for c in ids if sampled(c, 0.1)]
    assert 300 < len(chosen) < 500
    assert all(sampled(c, 1.0) for c in ids)


def test_conversation_lines_keep_the_row_and_its_fields() -> None:
    row = {"objectId": "5a5ecde6c3422b738c8779d7", "name": "test conv1", "m": ["tom", "jerry"],
           "c": "tom", "attr": {"topic": "x"}, "createdAt": "2018-01-17T04:15:33.386Z",
           "updatedAt": "2018-01-17T04:15:34.000Z"}
    data = orjson.loads(conversation_line("lc", "conversation", row))
    assert data == {"schema": "im-relay.conversation/1", "source": "lc",
                    "provider": "leancloud", "kind": "conversation",
                    "id": "5a5ecde6c3422b738c8779d7", "name": "test conv1",
                    "members": ["tom", "jerry"], "creator": "tom", "attributes": {"topic": "x"},
                    "created_at": 1516162533386, "updated_at": 1516162534000, "native": row}
    room = orjson.loads(conversation_line("lc", "chatroom", {"objectId": "r", "tr": True,
                                                             "createdAt": "bad"}))
    assert room["members"] == []
    assert room["created_at"] is None
