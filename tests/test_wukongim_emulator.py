"""The WuKongIM emulator behaves as the provider documents it (real loopback HTTP)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest

from relay.emulators.wukongim import WuKongIMEmulator
from tests.support.emulators import serving

TOKEN = "manager-token"
HEADERS = {"token": TOKEN}


def sync(client: httpx.Client, uid: str = "u1", limit: int = 100) -> list[dict[str, Any]]:
    answer = client.post("/message/sync", json={"uid": uid, "limit": limit}, headers=HEADERS)
    assert answer.status_code == 200, answer.text
    messages: list[dict[str, Any]] = answer.json()
    return messages


def ack(client: httpx.Client, last_message_seq: int, uid: str = "u1") -> None:
    answer = client.post("/message/syncack", headers=HEADERS,
                         json={"uid": uid, "last_message_seq": last_message_seq})
    assert answer.status_code == 200, answer.text


def channel_sync(client: httpx.Client, start: int, end: int, limit: int, pull_mode: int,
                 channel_id: str = "g1") -> dict[str, Any]:
    answer = client.post("/channel/messagesync", headers=HEADERS, json={
        "login_uid": "relay", "channel_id": channel_id, "channel_type": 2,
        "start_message_seq": start, "end_message_seq": end, "limit": limit,
        "pull_mode": pull_mode})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["message_seq"] for m in messages]


def test_sync_records_are_shaped_as_documented() -> None:
    emulator = WuKongIMEmulator(TOKEN, seed=3)
    ids = emulator.generate(60, "u1")
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        messages = sync(client, limit=100)
    assert [m["message_id"] for m in messages] == ids
    assert seqs(messages) == list(range(1, 61))
    kinds = set()
    for m in messages:
        assert set(m) == {"header", "setting", "message_id", "client_msg_no", "message_seq",
                          "from_uid", "channel_id", "channel_type", "timestamp", "payload"}
        assert m["header"] == {"no_persist": 0, "red_dot": 0, "sync_once": 1}
        assert isinstance(m["message_id"], int)
        assert m["channel_id"].endswith("____cmd")
        assert m["channel_type"] in (1, 2)
        assert abs(m["timestamp"] - time.time()) < 60  # seconds, not milliseconds
        raw = base64.b64decode(m["payload"], validate=True)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            kinds.add("binary")
            continue
        try:
            json.loads(text)
            kinds.add("json")
        except ValueError:
            kinds.add("text")
    assert kinds == {"json", "text", "binary"}


def test_ack_acknowledges_exactly_what_syncs_returned() -> None:
    emulator = WuKongIMEmulator(TOKEN, seed=1)
    first = emulator.generate(5, "u1")
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        assert [m["message_id"] for m in sync(client, limit=3)] == first[:3]
        # Without an ack the same messages come back.
        assert [m["message_id"] for m in sync(client, limit=3)] == first[:3]
        assert emulator.snapshot()["redelivered"] == 3
        later = emulator.generate(2, "u1")
        ack(client, 3)
        assert emulator.acked_ids("u1") == first[:3]
        assert emulator.unacked("u1") == first[3:] + later
        rest = sync(client, limit=10)
        assert seqs(rest) == [4, 5, 6, 7]
        ack(client, rest[-1]["message_seq"])
        assert sync(client) == []
        ack(client, 7)  # nothing in progress: harmless, counted
    stats = emulator.snapshot()
    # Each message acknowledged exactly once.
    assert emulator.acked_ids() == first + later == emulator.generated["u1"]
    assert stats["acks"] == 3
    assert stats["empty_acks"] == 1
    assert stats["syncs"] == 4
    assert stats["empty_syncs"] == 1
    assert stats["unacked"] == {"u1": 0}


def test_ack_covers_every_sync_since_the_last_ack() -> None:
    emulator = WuKongIMEmulator(None, seed=1)
    ids = emulator.generate(6, "u1")
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        assert len(sync(client, limit=2)) == 2
        assert len(sync(client, limit=4)) == 4
        ack(client, 2)  # the seq the client names does not narrow what is acknowledged
        assert emulator.acked_ids() == ids[:4]
        assert [m["message_id"] for m in sync(client)] == ids[4:]
        assert [m["message_id"] for m in sync(client, uid="u2")] == []


def test_restart_forgets_acks_in_progress() -> None:
    emulator = WuKongIMEmulator(TOKEN, seed=1)
    ids = emulator.generate(3, "u1")
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        assert len(sync(client)) == 3
        emulator.restart()
        ack(client, 3)
        assert emulator.acked_ids() == []
        again = sync(client)
        assert [m["message_id"] for m in again] == ids
        assert client.post("/_emulator/restart").json() == {"restarts": 2}
        ack(client, 3)
        assert emulator.acked_ids() == []
        assert len(sync(client)) == 3
        ack(client, 3)
    stats = emulator.snapshot()
    assert emulator.acked_ids() == ids
    assert stats["redelivered"] == 6
    assert stats["empty_acks"] == 2


def test_token_and_bad_input() -> None:
    emulator = WuKongIMEmulator(TOKEN, seed=1)
    emulator.generate(2, "u1")
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        for headers in ({}, {"token": "wrong"}):
            for path in ("/message/sync", "/message/syncack", "/channel/messagesync"):
                answer = client.post(path, json={"uid": "u1", "limit": 1}, headers=headers)
                assert answer.status_code == 401
                assert answer.content == b""
        bad = [
            ("/message/sync", {"limit": 10}),
            ("/message/sync", {"uid": "", "limit": 10}),
            ("/message/sync", {"uid": "u1", "limit": 0}),
            ("/message/sync", {"uid": "u1", "limit": -1}),
            ("/message/sync", {"uid": "u1"}),
            ("/message/syncack", {"uid": "u1", "last_message_seq": 0}),
            ("/message/syncack", {"uid": "u1"}),
            ("/message/syncack", {"last_message_seq": 3}),
            ("/channel/messagesync", {"channel_type": 2, "limit": 10}),
            ("/channel/messagesync", {"channel_id": "g1", "channel_type": 2, "limit": 0}),
            ("/channel/messagesync", {"channel_id": "g1", "channel_type": 2, "limit": 5,
                                      "pull_mode": 2}),
        ]
        for path, body in bad:
            answer = client.post(path, json=body, headers=HEADERS)
            assert answer.status_code == 400, (path, body)
            assert set(answer.json()) == {"msg", "status"}
            assert answer.json()["status"] == 400
        broken = client.post("/message/sync", content=b'{"uid": "u1", "lim', headers=HEADERS)
        assert broken.status_code == 400
        assert broken.json()["status"] == 400
        assert client.get("/health", headers=HEADERS).json() == {"status": "ok"}
    stats = emulator.snapshot()
    assert stats["bad_token"] == 6
    assert stats["bad_requests"] == len(bad) + 1
    assert stats["syncs"] == 0
    assert stats["unacked"] == {"u1": 2}  # nothing was delivered or acknowledged


@pytest.mark.parametrize(("start", "end", "pull_mode", "expected", "more"), [
    # The document's examples (limit 10); upward = seq ≥ start, end exclusive.
    (100, 200, 1, list(range(100, 110)), 1),
    (100, 105, 1, list(range(100, 105)), 0),
    (100, 0, 1, list(range(100, 110)), 1),
    # Downward = seq ≤ start, end exclusive; answered in ascending order.
    (100, 50, 0, list(range(91, 101)), 1),
    (100, 95, 0, list(range(96, 101)), 0),
    (100, 0, 0, list(range(91, 101)), 1),
    # Both 0: the latest ``limit`` whatever the mode.
    (0, 0, 1, list(range(191, 201)), 1),
    (0, 0, 0, list(range(191, 201)), 1),
    # The tail a relay reads: start = last + 1.
    (196, 0, 1, list(range(196, 201)), 0),
    (201, 0, 1, [], 0),
])
def test_channel_messagesync_window(start: int, end: int, pull_mode: int, expected: list[int],
                                    more: int) -> None:
    emulator = WuKongIMEmulator(TOKEN, seed=1)
    assert emulator.generate_channel(200, "g1", 2) == list(range(1, 201))
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        answer = channel_sync(client, start, end, 10, pull_mode)
    assert seqs(answer["messages"]) == expected
    assert answer["more"] == more
    assert (answer["start_message_seq"], answer["end_message_seq"]) == (start, end)
    for m in answer["messages"]:
        assert m["channel_id"] == "g1"
        assert m["header"]["sync_once"] == 0


def test_channel_gap_is_visible_in_message_seq() -> None:
    emulator = WuKongIMEmulator(TOKEN, channels=[("g1", 2)], seed=1)
    emulator.generate_channel(3)
    assert emulator.skip_seq("g1", 2, 2) == [4, 5]
    emulator.generate_channel(2)
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        assert seqs(channel_sync(client, 1, 0, 10, 1)["messages"]) == [1, 2, 3, 6, 7]
        page = channel_sync(client, 3, 0, 2, 1)
        assert seqs(page["messages"]) == [3, 6]
        assert page["more"] == 1
        assert client.post("/_emulator/gap", json={"channel_id": "g1", "skip": 3}).json() \
            == {"skipped": [8, 9, 10]}
        emulator.generate_channel(1)
        assert seqs(channel_sync(client, 8, 0, 10, 1)["messages"]) == [11]
        assert seqs(channel_sync(client, 1, 0, 10, 1, channel_id="nope")["messages"]) == []
    assert emulator.channel_gaps("g1") == [(4, 5), (8, 10)]
    assert emulator.snapshot()["channels"]["g1/2"]["last_seq"] == 11


def test_faults_error_malformed_slow_and_refused() -> None:
    emulator = WuKongIMEmulator(TOKEN, seed=1)
    ids = emulator.generate(4, "u1")
    with serving(emulator, ports=[0, 0]) as (loop, server), \
            httpx.Client(headers=HEADERS) as client:
        url = server.urls[0]
        emulator.faults.update({"error_ratio": 1.0})
        answer = client.post(f"{url}/message/sync", json={"uid": "u1", "limit": 10})
        assert answer.status_code == 500
        assert set(answer.json()) == {"msg", "status"}
        emulator.faults.update({"error_ratio": 0.0, "malformed_ratio": 1.0})
        answer = client.post(f"{url}/message/sync", json={"uid": "u1", "limit": 10})
        assert answer.status_code == 200
        with pytest.raises(ValueError, match=r"JSON|Expecting|Unterminated|delimiter"):
            answer.json()
        emulator.faults.update({"malformed_ratio": 0.0})
        # A broken answer was not noted as delivered: an ack now acknowledges nothing.
        client.post(f"{url}/message/syncack", json={"uid": "u1", "last_message_seq": 4})
        assert emulator.acked_ids() == []
        emulator.faults.update({"slow_ratio": 1.0, "slow_seconds": 0.2})
        began = time.monotonic()
        answer = client.post(f"{url}/message/sync", json={"uid": "u1", "limit": 10})
        assert time.monotonic() - began >= 0.2
        assert [m["message_id"] for m in answer.json()] == ids
        emulator.faults.update({"slow_ratio": 0.0})
        loop.run(server.refuse(0))
        with pytest.raises(httpx.ConnectError):
            client.post(f"{url}/message/sync", json={"uid": "u1", "limit": 10})
        backup = server.urls[1]
        assert len(client.post(f"{backup}/message/sync",
                               json={"uid": "u1", "limit": 10}).json()) == 4
    stats = emulator.snapshot()
    assert stats["faulted_syncs"] == 2
    assert stats["served_messages"] == 8
    assert [b.faulty for b in emulator.served] == [True, True, False, False]


def test_consume_on_fault_notes_the_broken_batch() -> None:
    emulator = WuKongIMEmulator(None, seed=1)
    ids = emulator.generate(2, "u1")
    emulator.faults.update({"malformed_ratio": 1.0, "consume_on_fault": True})
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        client.post("/message/sync", json={"uid": "u1", "limit": 10})
        emulator.faults.update({"malformed_ratio": 0.0})
        ack(client, 2)
    # The client never read them, yet they are gone: what a relay must never allow.
    assert emulator.acked_ids() == ids


def test_admin_api_and_traffic() -> None:
    emulator = WuKongIMEmulator(TOKEN, uids=["u1", "u2"], channels=[("g1", 2), ("g2", 2)],
                                seed=1)
    with serving(emulator) as (loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        generated = client.post("/_emulator/generate", json={"count": 4}).json()
        assert generated["generated"] == 4
        assert client.post("/_emulator/generate",
                           json={"count": 2, "kind": "channel", "channel_id": "g2"}).json() \
            == {"generated": 2, "seqs": [1, 2]}
        assert len(sync(client, "u1")) == 2
        ack(client, 2, "u1")
        served = client.get("/_emulator/served").json()["batches"]
        assert [b["uid"] for b in served] == ["u1"]
        acks = client.get("/_emulator/acked").json()["acks"]
        assert acks[0]["message_ids"] == served[0]["message_ids"]
        assert client.post("/_emulator/faults", json={"bogus": 1}).status_code == 400
        client.post("/_emulator/traffic", json={"rate": 200, "channel_rate": 100})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stats = client.get("/_emulator/stats").json()
            if stats["unacked"].get("u2", 0) >= 10 and stats["channels"]["g1/2"]["messages"]:
                break
            time.sleep(0.02)
        else:
            pytest.fail("traffic generated nothing")
        loop.call(lambda: emulator.set_traffic(0))
    assert stats["generated"] >= 20
    assert stats["unacked"]["u1"] >= 10
