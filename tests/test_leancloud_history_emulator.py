"""The LeanCloud emulator as a large application: conversation lists, per-conversation
history, late messages, poison records and quota, over real loopback HTTP."""

from __future__ import annotations

import json
import resource
import time
from collections import Counter
from typing import Any

import httpx

from relay.emulators.leancloud import LeanCloudEmulator
from tests.support.emulators import serving

APP_ID, MASTER = "app-id", "master-key"
HEADERS = {"X-LC-Id": APP_ID, "X-LC-Key": f"{MASTER},master"}


def get(client: httpx.Client, path: str, **params: Any) -> Any:
    answer = client.get(path, params=params, headers=HEADERS)
    assert answer.status_code == 200, answer.text
    return answer.json()


def walk(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    """Page oldest → newest with the (timestamp, msgid) cursor, 1,000 at a time."""
    seen: list[dict[str, Any]] = []
    cursor: dict[str, Any] = {}
    while True:
        page = get(client, path, reversed="true", limit=1000, **params, **cursor)
        seen += page
        if len(page) < 1000:
            return seen
        cursor = {"timestamp": page[-1]["timestamp"], "msgid": page[-1]["msg-id"]}


def large(count: int = 30_000, **kwargs: Any) -> LeanCloudEmulator:
    emulator = LeanCloudEmulator(APP_ID, MASTER, seed=11, keep_served=False)
    emulator.load_history(count, conversations=kwargs.pop("conversations", 300),
                          chatrooms=kwargs.pop("chatrooms", 20), tie_ratio=0.2, **kwargs)
    return emulator


def test_conversation_and_chatroom_lists_page_with_skip_and_limit() -> None:
    emulator = large(2_000, conversations=2_345, chatrooms=130)
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        rows: list[dict[str, Any]] = []
        while page := get(client, "/1.2/rtm/conversations", skip=len(rows),
                          limit=1000)["results"]:
            assert len(page) <= 1000
            rows += page
        rooms = get(client, "/1.2/rtm/chatrooms", limit=5000)["results"]
        assert len(get(client, "/1.2/rtm/conversations")["results"]) == 100  # the default
        named = get(client, "/1.2/rtm/conversations",
                    where=json.dumps({"objectId": rows[7]["objectId"]}))["results"]
        several = get(client, "/1.2/rtm/chatrooms", where=json.dumps(
            {"objectId": {"$in": [r["objectId"] for r in rooms[:3]]}}))["results"]
        bad = client.get("/1.2/rtm/conversations", params={"where": "{"}, headers=HEADERS)
    assert len(rows) == 2_345 + 6  # and the emulator's six small conversations
    assert len(rooms) == 130 + 2
    assert len({r["objectId"] for r in rows + rooms}) == len(rows) + len(rooms)
    for row in rows:
        assert {"objectId", "name", "m", "c", "attr", "createdAt", "updatedAt"} <= set(row)
        assert "tr" not in row
        assert len(row["m"]) >= 2
        assert row["createdAt"].endswith("Z")
        assert row["createdAt"] <= row["updatedAt"]
    assert all(r["tr"] is True and "m" not in r for r in rooms)
    assert named == [rows[7]]
    assert [r["objectId"] for r in several] == [r["objectId"] for r in rooms[:3]]
    assert bad.status_code == 400
    assert set(bad.json()) == {"code", "error"}


def test_per_conversation_history_pages_through_ties_and_matches_the_app_history() -> None:
    emulator = large(30_000)
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        everything = walk(client, "/1.2/rtm/messages")
        per_conv: Counter[str] = Counter(r["conv-id"] for r in everything)
        busiest = per_conv.most_common(1)[0][0]
        room = next(c for c in per_conv if emulator.history.conversation(c).room)
        own = walk(client, f"/1.2/rtm/conversations/{busiest}/messages")
        room_history = walk(client, f"/1.2/rtm/chatrooms/{room}/messages")
        newest_first = get(client, f"/1.2/rtm/conversations/{busiest}/messages", limit=5)
        unknown = get(client, "/1.2/rtm/conversations/ffffffffffffffffffffffff/messages")
    assert len(everything) == 30_000 == len({r["msg-id"] for r in everything})
    keys = [(r["timestamp"], r["msg-id"]) for r in everything]
    assert keys == sorted(keys)
    stamps = Counter(r["timestamp"] for r in everything)
    assert max(stamps.values()) >= 3  # many messages on one millisecond
    assert (everything[-1]["timestamp"] - everything[0]["timestamp"]) > 2 * 365 * 86_400_000
    assert per_conv[busiest] > 1000  # more than one page
    assert own == [r for r in everything if r["conv-id"] == busiest]
    assert room_history == [r for r in everything if r["conv-id"] == room]
    assert all(r["is-room"] for r in room_history)
    assert [r["msg-id"] for r in newest_first] == [r["msg-id"] for r in own[::-1][:5]]
    assert unknown == []
    assert emulator.snapshot()["conversation_history_requests"] >= 4


def test_late_messages_turn_up_only_after_a_reader_went_past_them() -> None:
    emulator = large(5_000)
    late = set(emulator.hide_until_passed(20, seconds=0.2))
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        first_walk = {r["msg-id"] for r in walk(client, "/1.2/rtm/messages")}
        assert not late & first_walk
        deadline = time.monotonic() + 5
        while not late <= (second_walk := {r["msg-id"] for r in walk(client,
                                                                  "/1.2/rtm/messages")}):
            assert time.monotonic() < deadline, "the late messages never showed up"
            time.sleep(0.05)
    assert len(first_walk) == 5_000 - 20
    assert second_walk == first_walk | late == emulator.all_msg_ids()


def test_poison_records_are_served_among_valid_ones() -> None:
    emulator = large(3_000)
    middle = emulator.history.bulk_key(1_500)[0]
    nested = emulator.inject_poison("nested", timestamp_ms=middle)
    invalid = emulator.inject_poison("invalid", timestamp_ms=middle + 1)
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        records = walk(client, "/1.2/rtm/messages")
        own = walk(client, f"/1.2/rtm/conversations/{nested['conv-id']}/messages")
    by_id = {r["msg-id"]: r for r in records}
    assert len(records) == 3_002
    depth = by_id[nested["msg-id"]]["data"].count("{")
    assert depth >= 1000
    assert isinstance(by_id[invalid["msg-id"]]["data"], dict)
    assert isinstance(by_id[invalid["msg-id"]]["from"], int)
    assert nested["msg-id"] in {r["msg-id"] for r in own}


def test_every_endpoint_shares_the_quota() -> None:
    emulator = large(500)
    emulator.rate_limit_per_minute = 3
    emulator.penalty_seconds = 30
    conv = emulator.conversation_ids()[10]
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        paths = ["/1.2/rtm/messages", "/1.2/rtm/conversations", "/1.2/rtm/chatrooms",
                 f"/1.2/rtm/conversations/{conv}/messages"]
        statuses = [client.get(p, headers=HEADERS).status_code for p in paths]
    assert statuses == [200, 200, 200, 429]
    assert emulator.snapshot()["rate_limited"] == 1


def test_two_million_messages_in_seconds_and_little_memory() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    emulator = LeanCloudEmulator(APP_ID, MASTER, seed=12, keep_served=False)
    emulator.load_history(2_000_000, conversations=5_000, chatrooms=200)
    took = time.perf_counter() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    stats = emulator.snapshot()
    assert stats["stored"] == 2_000_000
    assert stats["history_bytes"] <= 60e6  # 28 bytes a message
    assert took < 20, took  # about 3 s on the 2-core machine; generous for a loaded one
    assert grown_mb < 200, grown_mb
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        page = get(client, "/1.2/rtm/messages", reversed="true", limit=1000)
        last = get(client, "/1.2/rtm/messages", limit=1)
    assert len(page) == 1000
    assert page[0]["timestamp"] < last[0]["timestamp"]
