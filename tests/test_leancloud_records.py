"""LeanCloud history records → events, per SPEC §2.3 and §3 (pure logic)."""

from __future__ import annotations

import base64
import json

import pytest

from relay.sources.leancloud import start_ms
from relay.sources.leancloud_records import BadRecord, cursor_of, normalize, parse_answer

DOC_EXAMPLE = {
    "timestamp": 1408008498571,
    "conv-id": "219946ef32e40c515d33ae6975a5c593",
    "data": "今天天气不错!",
    "from": "u111872755_9d0461adf9c267ae263b3742c60fa",
    "msg-id": "vdkGm4dtRNmhQ5gqUTFBiA",
    "is-conv": True,
    "is-room": False,
    "to": "5541c02ce4b0f83f4d44414e",
    "bin": False,
    "from-ip": "202.117.15.217",
}


def test_documented_record() -> None:
    event = normalize(DOC_EXAMPLE, source="lc", fetched_at=9)
    assert event["id"] == "lc:vdkGm4dtRNmhQ5gqUTFBiA"
    assert event["provider"] == "leancloud"
    assert event["kind"] == "message"
    assert event["type"] == ""
    assert event["channel"] == {"type": "conversation", "id": "219946ef32e40c515d33ae6975a5c593"}
    assert event["conversation"] == "conversation:219946ef32e40c515d33ae6975a5c593"
    assert event["sender"] == DOC_EXAMPLE["from"]
    assert event["recipient"] == DOC_EXAMPLE["to"]
    assert event["sent_at"] == 1408008498571
    assert (event["content"], event["content_encoding"]) == ("今天天气不错!", "text")
    assert event["native"] == {k: v for k, v in DOC_EXAMPLE.items() if k != "data"}
    assert event["native"]["from-ip"] == "202.117.15.217"


def test_rich_message_type_room_and_binary() -> None:
    rich = normalize({**DOC_EXAMPLE, "data": json.dumps({"_lctype": -1, "_lctext": "hi"}),
                      "is-room": True}, source="lc", fetched_at=1)
    assert rich["type"] == "-1"
    assert rich["content"] == {"_lctype": -1, "_lctext": "hi"}
    assert rich["channel"]["type"] == "chatroom"
    blob = base64.b64encode(b"\x00\x01\xff").decode()
    binary = normalize({**DOC_EXAMPLE, "data": blob, "bin": True}, source="lc", fetched_at=1)
    assert (binary["content"], binary["content_encoding"]) == (blob, "base64")


@pytest.mark.parametrize(
    "broken",
    [{**DOC_EXAMPLE, "msg-id": None}, {**DOC_EXAMPLE, "timestamp": "x"},
     {**DOC_EXAMPLE, "conv-id": 5}, {**DOC_EXAMPLE, "data": {"a": 1}}, [], None],
)
def test_bad_records_raise_badrecord(broken: object) -> None:
    with pytest.raises(BadRecord):
        normalize(broken, source="lc", fetched_at=1)


def test_cursor_and_answer() -> None:
    assert cursor_of(DOC_EXAMPLE) == (1408008498571, "vdkGm4dtRNmhQ5gqUTFBiA")
    assert cursor_of({"timestamp": "1", "msg-id": "a"}) is None
    assert parse_answer([DOC_EXAMPLE]) == [DOC_EXAMPLE]
    with pytest.raises(BadRecord):
        parse_answer({"code": 1, "error": "x"})


def test_start_points() -> None:
    assert start_ms("earliest", 10_000) == 0
    assert start_ms("24h", 100_000_000) == 100_000_000 - 86_400_000
    assert start_ms("2026-01-01T00:00:00+00:00", 0) == 1767225600000
    with pytest.raises(ValueError, match="earliest"):
        start_ms("yesterday-ish", 0)


@pytest.mark.parametrize(("raw", "content", "encoding"), [
    (json.dumps({"_lctype": -1, "_lctext": "hi"}).encode(), {"_lctype": -1, "_lctext": "hi"},
     "json"),
    ("今天天气不错".encode(), "今天天气不错", "text"),
    (b"\x00\x01\xff", base64.b64encode(b"\x00\x01\xff").decode(), "base64"),
])
def test_bin_data_follows_the_one_content_rule(raw: bytes, content: object,
                                               encoding: str) -> None:
    """`bin: true` data is decoded like WuKongIM payloads: JSON, else UTF-8 text, else base64."""
    event = normalize({**DOC_EXAMPLE, "data": base64.b64encode(raw).decode(), "bin": True},
                      source="lc", fetched_at=1)
    assert (event["content"], event["content_encoding"]) == (content, encoding)
    if isinstance(content, dict):
        assert event["type"] == "-1"


def test_bin_data_that_is_not_base64_is_refused() -> None:
    with pytest.raises(BadRecord, match="base64"):
        normalize({**DOC_EXAMPLE, "data": "not base64!", "bin": True}, source="lc",
                  fetched_at=1)
