"""The LeanCloud emulator behaves as the provider documents it (real loopback HTTP)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import httpx
import pytest

from relay.emulators.leancloud import LeanCloudEmulator
from tests.support.emulators import serving

APP_ID, MASTER = "app-id", "master-key"
KEY_HEADERS = {"X-LC-Id": APP_ID, "X-LC-Key": f"{MASTER},master"}
T1, T2, T3 = 1_700_000_000_000, 1_700_000_001_000, 1_700_000_002_000


def signed(master: str = MASTER, app_id: str = APP_ID) -> dict[str, str]:
    stamp = str(int(time.time() * 1000))
    sign = hashlib.md5((stamp + master).encode()).hexdigest()
    return {"X-LC-Id": app_id, "X-LC-Sign": f"{sign},{stamp},master"}


def history(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    answer = client.get("/1.2/rtm/messages", params=params, headers=KEY_HEADERS)
    assert answer.status_code == 200, answer.text
    records: list[dict[str, Any]] = answer.json()
    return records


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["msg-id"] for r in records]


def three_messages() -> LeanCloudEmulator:
    emulator = LeanCloudEmulator(APP_ID, MASTER, seed=1)
    for msg_id, stamp in (("id1", T1), ("id2", T2), ("id3", T3)):
        emulator.add_message(msg_id, stamp, f"text of {msg_id}")
    return emulator


# The document's truth table, row by row (blank = the parameter left out).
TRUTH_TABLE = [
    ({"timestamp": T3, "msgid": "id3", "till_timestamp": T1, "till_msgid": "id1"},
     ["id2"]),
    ({"timestamp": T3, "msgid": "id3", "till_timestamp": T1, "till_msgid": "id1",
      "include_start": "true"}, ["id3", "id2"]),
    ({"timestamp": T3, "msgid": "id3", "till_timestamp": T1, "till_msgid": "id1",
      "include_stop": "true"}, ["id2", "id1"]),
    ({"timestamp": T1, "msgid": "id1", "till_timestamp": T3, "till_msgid": "id3",
      "reversed": "true"}, ["id2"]),
    ({"timestamp": T1, "msgid": "id1", "till_timestamp": T3, "till_msgid": "id3",
      "include_start": "true", "reversed": "true"}, ["id1", "id2"]),
    ({"timestamp": T1, "msgid": "id1", "till_timestamp": T3, "till_msgid": "id3",
      "include_stop": "true", "reversed": "true"}, ["id2", "id3"]),
]


def test_truth_table_of_the_document() -> None:
    emulator = three_messages()
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        for params, expected in TRUTH_TABLE:
            assert ids(history(client, **params)) == expected, params
        # Defaults: newest → oldest from now down to 0; reversed: oldest → newest.
        assert ids(history(client)) == ["id3", "id2", "id1"]
        assert ids(history(client, reversed="true")) == ["id1", "id2", "id3"]
        assert ids(history(client, limit=2)) == ["id3", "id2"]
        assert ids(history(client, reversed="true", limit=2)) == ["id1", "id2"]
        # A timestamp without its msgid stands for every message at that timestamp.
        assert ids(history(client, reversed="true", timestamp=T2)) == ["id3"]
        assert ids(history(client, reversed="true", timestamp=T2, include_start="true")) \
            == ["id2", "id3"]
        assert ids(history(client, timestamp=T2, till_timestamp=T1, include_stop="true")) \
            == ["id1"]
        # Start and stop the wrong way round for the direction: nothing.
        assert history(client, timestamp=T1, till_timestamp=T3) == []
    stats = emulator.snapshot()
    assert stats["history_requests"] == len(TRUTH_TABLE) + 8
    assert stats["served_messages"] == (1 + 2 + 2 + 1 + 2 + 2) + (3 + 3 + 2 + 2 + 1 + 2 + 1)


def test_cursor_walk_over_identical_timestamps_sees_each_message_once() -> None:
    emulator = LeanCloudEmulator(APP_ID, MASTER, seed=2)
    generated = emulator.generate_same_timestamps(40, distinct=3)
    assert len({r["timestamp"] for r in emulator.generated}) == 3
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        seen: list[dict[str, Any]] = []
        cursor: dict[str, Any] = {}
        while True:
            page = history(client, reversed="true", limit=7, **cursor)
            if not page:
                break
            seen += page
            cursor = {"timestamp": page[-1]["timestamp"], "msgid": page[-1]["msg-id"]}
    assert sorted(ids(seen)) == sorted(generated)
    keys = [(r["timestamp"], r["msg-id"]) for r in seen]
    assert keys == sorted(keys)


def test_late_messages_and_delayed_visibility() -> None:
    emulator = LeanCloudEmulator(APP_ID, MASTER, seed=3)
    on_time = emulator.generate(3, "text")
    late = emulator.generate_late(1, age=30)
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        # Sent 30 s before the others, it sorts before them although it came last.
        # (One generate() call stamps its messages alike: they sort by msg-id.)
        assert ids(history(client, reversed="true")) == late + sorted(on_time)
        hidden = emulator.generate(1, "text", age=10, delay=0.3)
        assert hidden[0] not in ids(history(client))
        deadline = time.monotonic() + 5
        while hidden[0] not in ids(history(client)):
            assert time.monotonic() < deadline, "the delayed message never became visible"
            time.sleep(0.02)
        assert ids(history(client, reversed="true"))[:2] == late + hidden


def test_record_fields_and_kinds() -> None:
    emulator = LeanCloudEmulator(APP_ID, MASTER, seed=4)
    for kind in ("text", "rich", "binary", "room"):
        emulator.generate(2, kind)
    emulator.generate(50)
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        records = history(client, limit=1000)
    assert len(records) == 58
    kinds: set[str] = set()
    for r in records:
        assert set(r) == {"timestamp", "conv-id", "data", "from", "msg-id", "is-conv",
                          "is-room", "to", "bin", "from-ip"}
        assert abs(r["timestamp"] - time.time() * 1000) < 60_000  # milliseconds
        if r["bin"]:
            assert base64.b64decode(r["data"], validate=True)[:1] == b"\xff"
            kinds.add("binary")
        elif r["is-room"]:
            kinds.add("room")
        elif r["data"].startswith("{"):
            assert "_lctype" in json.loads(r["data"])
            kinds.add("rich")
        else:
            kinds.add("text")
    assert kinds == {"text", "rich", "binary", "room"}
    assert len(set(ids(records))) == 58


def test_limit_default_max_and_bad_parameters() -> None:
    emulator = LeanCloudEmulator(APP_ID, MASTER, seed=5)
    emulator.generate(1100, "text")
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        assert len(history(client)) == 100
        assert len(history(client, limit=5000)) == 1000
        for params in ({"limit": 0}, {"limit": "x"}, {"msgid": "abc"},
                       {"till_msgid": "abc"}, {"reversed": "maybe"}, {"timestamp": "soon"}):
            answer = client.get("/1.2/rtm/messages", params=params, headers=KEY_HEADERS)
            assert answer.status_code == 400, params
            assert set(answer.json()) == {"code", "error"}
    assert emulator.snapshot()["bad_requests"] == 6


def test_auth_master_key_signature_and_refusals() -> None:
    emulator = three_messages()
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        assert client.get("/1.2/rtm/messages", headers=KEY_HEADERS).status_code == 200
        assert client.get("/1.2/rtm/messages", headers=signed()).status_code == 200
        stamp = str(int(time.time() * 1000))
        good_sign = hashlib.md5((stamp + MASTER).encode()).hexdigest()
        refused = [
            {},
            {"X-LC-Id": APP_ID},
            {"X-LC-Id": "other", "X-LC-Key": f"{MASTER},master"},
            {"X-LC-Id": APP_ID, "X-LC-Key": MASTER},  # an app key, not the master key
            {"X-LC-Id": APP_ID, "X-LC-Key": "wrong,master"},
            signed(master="wrong"),
            signed(app_id="other"),
            {"X-LC-Id": APP_ID, "X-LC-Sign": f"{good_sign},{stamp}"},  # not marked master
            {"X-LC-Id": APP_ID, "X-LC-Sign": f"{good_sign},{int(stamp) + 1},master"},
        ]
        for headers in refused:
            answer = client.get("/1.2/rtm/messages", headers=headers)
            assert answer.status_code == 401, headers
            assert answer.json() == {"code": 401, "error": "Unauthorized."}
    assert emulator.snapshot()["bad_auth"] == len(refused)


def test_rate_limit_refuses_everything_for_the_penalty_then_recovers() -> None:
    emulator = LeanCloudEmulator(APP_ID, MASTER, rate_limit_per_minute=5, penalty_seconds=0.5,
                                 retry_after=True, seed=6)
    emulator.generate(3)
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        statuses = [client.get("/1.2/rtm/messages", headers=KEY_HEADERS).status_code
                    for _ in range(5)]
        assert statuses == [200] * 5
        refused = client.get("/1.2/rtm/messages", headers=KEY_HEADERS)
        assert refused.status_code == 429
        assert refused.json() == {"code": 429, "error": "Too many requests."}
        assert refused.headers["Retry-After"] == "1"
        # Every interface shares the quota: a send is refused as well.
        send = client.post("/1.2/rtm/conversations/c1/messages", headers=KEY_HEADERS,
                           json={"from_client": "a", "message": "hi"})
        assert send.status_code == 429
        deadline = time.monotonic() + 5
        while True:
            answer = client.get("/1.2/rtm/messages", headers=KEY_HEADERS)
            if answer.status_code == 200:
                break
            assert answer.status_code == 429
            assert time.monotonic() < deadline, "the penalty never ended"
            time.sleep(0.02)
        assert len(answer.json()) == 3
        stats = emulator.snapshot()
        assert stats["rate_limit_trips"] == 1
        assert stats["rate_limited"] >= 2
        assert not stats["penalized"]
        # The customer's own calls spend the same quota.
        emulator.spend_quota(4)
        assert client.get("/1.2/rtm/messages", headers=KEY_HEADERS).status_code == 429
    assert emulator.snapshot()["rate_limit_trips"] == 2


def test_send_is_asynchronous_and_transient_is_not_kept() -> None:
    emulator = LeanCloudEmulator(APP_ID, MASTER, send_delay=0.2, seed=7)
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0], headers=KEY_HEADERS) as client:
        sent = client.post("/1.2/rtm/chatrooms/room1/messages",
                           json={"from_client": "a", "message": "hello"}).json()
        assert set(sent) == {"msg-id", "timestamp"}
        client.post("/1.2/rtm/conversations/c1/messages",
                    json={"from_client": "a", "message": "gone", "transient": True})
        assert client.post("/1.2/rtm/conversations/c1/messages",
                           json={"message": "x"}).status_code == 400
        deadline = time.monotonic() + 5
        while not (records := client.get("/1.2/rtm/messages").json()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert [(r["msg-id"], r["is-room"], r["conv-id"], r["data"]) for r in records] == \
        [(sent["msg-id"], True, "room1", "hello")]


def test_faults_error_malformed_refused_and_admin() -> None:
    emulator = LeanCloudEmulator(APP_ID, MASTER, seed=8)
    with serving(emulator, ports=[0, 0]) as (loop, server), \
            httpx.Client(headers=KEY_HEADERS) as client:
        url = f"{server.urls[0]}/1.2/rtm/messages"
        assert client.post(f"{server.urls[0]}/_emulator/generate",
                           json={"count": 4, "kind": "rich"}).json()["generated"] == 4
        emulator.faults.update({"error_ratio": 1.0})
        answer = client.get(url)
        assert answer.status_code == 500
        assert set(answer.json()) == {"code", "error"}
        client.post(f"{server.urls[0]}/_emulator/faults",
                    json={"error_ratio": 0.0, "malformed_ratio": 1.0})
        with pytest.raises(ValueError, match=r"JSON|Expecting|Unterminated|delimiter"):
            client.get(url).json()
        emulator.faults.update({"malformed_ratio": 0.0})
        assert len(client.get(url).json()) == 4
        client.post(f"{server.urls[0]}/_emulator/traffic", json={"rate": 200})
        deadline = time.monotonic() + 5
        while client.get(f"{server.urls[0]}/_emulator/stats").json()["stored"] < 10:
            assert time.monotonic() < deadline, "traffic generated nothing"
            time.sleep(0.02)
        loop.call(lambda: emulator.set_traffic(0))
        pages = client.get(f"{server.urls[0]}/_emulator/served").json()["pages"]
        assert [p["faulty"] for p in pages] == [True, True, False]
        assert client.post(f"{server.urls[0]}/_emulator/rate_limit",
                           json={"per_minute": 1, "penalty_seconds": 30}).json() \
            == {"per_minute": 1, "penalty_seconds": 30.0}
        loop.run(server.refuse(0))
        with pytest.raises(httpx.ConnectError):
            client.get(url)
        backup = f"{server.urls[1]}/1.2/rtm/messages"
        last_page = client.get(backup)
        assert last_page.status_code == 200
        assert client.get(backup).status_code == 429
    stats = emulator.snapshot()
    assert stats["faulted_pages"] == 2
    assert stats["served_messages"] == 4 + len(last_page.json())
    assert stats["rate_limited"] == 1
