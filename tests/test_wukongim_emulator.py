"""The WuKongIM emulator behaves as the provider documents it (real loopback HTTP)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from relay.emulators.wukongim import DEFAULT_QUIRKS, ServerQuirks, WuKongIMEmulator
from tests.support.emulators import serving
from tests.support.relay_process import wait_for

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


# -- the real server's behaviours, one switch each ------------------------------------

DOCUMENT_KEYS = ["header", "setting", "message_id", "client_msg_no", "message_seq", "from_uid",
                 "channel_id", "channel_type", "timestamp", "payload"]
SERVER_KEYS = ["header", "setting", "message_id", "message_idstr", "client_msg_no",
               "message_seq", "from_uid", "channel_id", "channel_type", "expire", "timestamp",
               "payload"]


@contextmanager
def served(emulator: WuKongIMEmulator) -> Iterator[httpx.Client]:
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0], headers=HEADERS) as client:
        yield client


def quirky(**switches: Any) -> WuKongIMEmulator:
    return WuKongIMEmulator(TOKEN, uids=["u1"], seed=5, quirks=ServerQuirks(**switches))


def ids(messages: list[dict[str, Any]]) -> list[int]:
    return [m["message_id"] for m in messages]


def test_quirk_presets_and_default() -> None:
    real = ServerQuirks.real()
    switches = [name for name, value in ServerQuirks().as_dict().items()
                if isinstance(value, bool)]
    assert len(switches) == 18
    assert real.names_on() == [n for n in switches if n != "shutting_down"]
    assert ServerQuirks().names_on() == []
    assert ServerQuirks() == DEFAULT_QUIRKS
    assert WuKongIMEmulator().quirks == DEFAULT_QUIRKS
    parsed = ServerQuirks.from_options(True, ["go-errors=off", "conversation_persist_seconds=5",
                                              "senders_per_uid=2"])
    assert parsed == real.updated({"go_errors": False, "conversation_persist_seconds": 5.0,
                                   "senders_per_uid": 2})
    for wrong in (["bogus"], ["limit_bug=maybe"], ["senders_per_uid=two"],
                  ["senders_per_uid=0"]):
        with pytest.raises(ValueError, match=r"quirk|senders_per_uid"):
            ServerQuirks.from_options(False, wrong)


def test_quirks_switch_at_run_time() -> None:
    emulator = WuKongIMEmulator(TOKEN, seed=1)
    with served(emulator) as client:
        on = client.post("/_emulator/quirks", json={"preset": "real"}).json()
        assert on == ServerQuirks.real().as_dict()
        assert emulator.quirks == ServerQuirks.real()
        answer = client.post("/_emulator/quirks", json={"limit_bug": False,
                                                        "conversation_persist_seconds": 1})
        assert answer.json()["limit_bug"] is False
        assert emulator.quirks.conversation_persist_seconds == 1.0
        for wrong in ({"bogus": True}, {"limit_bug": "yes"}, {"preset": "fake"},
                      {"senders_per_uid": 0}, [1]):
            assert client.post("/_emulator/quirks", json=wrong).status_code == 400, wrong
        assert client.get("/_emulator/stats").json()["quirks"]["limit_bug"] is False
        client.post("/_emulator/quirks", json={"preset": "document", "go_errors": True})
    assert emulator.quirks == ServerQuirks(go_errors=True)


@pytest.mark.parametrize("on", [True, False])
def test_seq_per_channel(on: bool) -> None:
    emulator = quirky(seq_per_channel=on, real_channel_names=True)
    for k in range(1, 10):  # nine direct channels, one command each
        emulator.generate(1, "u1", sender=f"s{k}")
    emulator.generate(1, "u1", sender="s1")
    with served(emulator) as client:
        batch = sync(client, limit=100)
    assert seqs(batch) == ([1] * 9 + [2] if on else list(range(1, 11)))


# The crc32 rule, worked out by hand: crc32(b"s1") = 336935152 < crc32(b"u1") =
# 1112514422 < crc32(b"s4") = 1686097023 < crc32(b"s2") = 2367449418 < crc32(b"s3"),
# and crc32(b"____system") = 661320456, below u1's but above u21's (593... < 661...).
SHOWN_TO_U1 = {"s1": "s1____cmd", "s2": "u1____cmd", "s3": "u1____cmd", "s4": "u1____cmd"}


@pytest.mark.parametrize("on", [True, False])
def test_real_channel_names(on: bool) -> None:
    assert zlib.crc32(b"u21") < zlib.crc32(b"____system") < zlib.crc32(b"u1")
    emulator = WuKongIMEmulator(TOKEN, uids=["u1", "u21"], seed=5,
                                quirks=ServerQuirks(real_channel_names=on, senders_per_uid=4))
    emulator.generate(400, "u1")
    emulator.generate(1, "u21", system=True)
    emulator.generate(1, "u1", sender="s9")
    with served(emulator) as client:
        batch = sync(client, limit=1000)
        to_u21 = sync(client, uid="u21")
    explicit = batch.pop()
    if not on:
        for m in batch:
            assert re.fullmatch(r"u\d+", m["from_uid"]), m
            assert re.fullmatch(r"(g[0-6]|u\d+)____cmd", m["channel_id"]), m
        assert (explicit["from_uid"], explicit["channel_id"]) == ("s9", "s9____cmd")
        assert to_u21[0]["channel_id"] == "____system____cmd"
        return
    kinds = {"direct": 0, "group": 0, "system": 0}
    senders = set()
    for m in batch:
        if m["from_uid"] == "":
            kinds["system"] += 1
            assert (m["channel_id"], m["channel_type"]) == ("____system____cmd", 1)
        elif m["channel_type"] == 2:
            kinds["group"] += 1
            assert re.fullmatch(r"u1-g[12]____cmd", m["channel_id"]), m
            assert m["from_uid"] in SHOWN_TO_U1
        else:
            kinds["direct"] += 1
            senders.add(m["from_uid"])
            assert m["channel_id"] == SHOWN_TO_U1[m["from_uid"]], m
    assert senders == set(SHOWN_TO_U1)
    assert 20 <= kinds["system"] <= 60, kinds
    assert 50 <= kinds["group"] <= 110, kinds
    assert (explicit["from_uid"], explicit["channel_id"]) == ("s9", "s9____cmd")
    # The recipient's crc32 is the smaller: the system's command shows the recipient.
    assert (to_u21[0]["from_uid"], to_u21[0]["channel_id"]) == ("", "u21____cmd")


@pytest.mark.parametrize("on", [True, False])
def test_first_sync_once_zero(on: bool) -> None:
    emulator = quirky(first_sync_once_zero=on, real_channel_names=True)
    for origin in ({"sender": "s1"}, {"group": "g9"}, {"sender": "s1"}, {"group": "g9"},
                   {"system": True}):
        emulator.generate(1, "u1", **origin)
    with served(emulator) as client:
        batch = sync(client)
    assert [m["header"]["sync_once"] for m in batch] == ([0, 0, 1, 1, 0] if on else [1] * 5)
    assert [m["channel_id"] for m in batch[:2]] == ["s1____cmd", "g9____cmd"]


@pytest.mark.parametrize("on", [True, False])
def test_snowflake_ids(on: bool) -> None:
    emulator = quirky(snowflake_ids=on)
    emulator.generate(50, "u1")
    emulator.generate_channel(5, "g1", 2)
    with served(emulator) as client:
        answer = client.post("/message/sync", json={"uid": "u1", "limit": 100})
        history = channel_sync(client, 1, 0, 10, 1)["messages"]
    batch = answer.json()
    got = ids(batch) + ids(history)
    assert got == sorted(set(got))
    for message_id in ids(batch):  # written exactly, as an integer
        assert f'"message_id":{message_id},'.encode() in answer.content
    if on:
        assert all(2.0e18 < i < 2**63 for i in got)
        # Above 2**53: a reader going through a float would change them.
        assert any(int(float(i)) != i for i in got)
    else:
        assert all(i < 2**53 for i in got)


@pytest.mark.parametrize("on", [True, False])
def test_extra_fields(on: bool) -> None:
    emulator = quirky(extra_fields=on, snowflake_ids=True)
    emulator.generate(3, "u1")
    emulator.generate_channel(2, "g1", 2)
    with served(emulator) as client:
        batch = sync(client)
        history = channel_sync(client, 1, 0, 10, 1)["messages"]
    for m in batch + history:
        assert list(m) == (SERVER_KEYS if on else DOCUMENT_KEYS)
        if on:
            assert m["message_idstr"] == str(m["message_id"])
            assert m["expire"] == 0


@pytest.mark.parametrize("on", [True, False])
def test_new_conversation_acks_ignored(on: bool) -> None:
    emulator = quirky(new_conversation_acks_ignored=on, conversation_persist_seconds=60,
                      real_channel_names=True)
    first = emulator.generate(3, "u1", sender="s1")
    with served(emulator) as client:
        assert ids(sync(client)) == first
        answer = client.post("/message/syncack", json={"uid": "u1", "last_message_seq": 3})
        assert (answer.status_code, answer.json()) == (200, {"status": 200})
        again = sync(client)
        stats = emulator.snapshot()
        if not on:
            assert again == []
            assert emulator.acked_ids() == first
            assert stats["ignored_acks"] == 0
            return
        assert ids(again) == first  # the ack did nothing
        assert emulator.acked_ids() == []
        assert (stats["ignored_acks"], stats["ignored_ack_conversations"],
                stats["ignored_ack_messages"]) == (1, 1, 3)
        assert stats["syncs_by_uid"] == {"u1": 2}
        # Once the server has written the conversation down, acks take effect.
        client.post("/_emulator/persist")
        ack(client, 3)
        assert emulator.acked_ids() == first
        # A new conversation is new for conversation_persist_seconds after its first message.
        client.post("/_emulator/quirks", json={"conversation_persist_seconds": 0.3})
        began = time.monotonic()
        later = emulator.generate(2, "u1", sender="s2")

        def synced_and_acked() -> bool:
            assert ids(sync(client)) == later or not emulator.unacked("u1")
            ack(client, 1)
            return not emulator.unacked("u1")

        wait_for(synced_and_acked, timeout=10, message="the ack to take effect")
        assert time.monotonic() - began >= 0.3
        assert emulator.acked_ids() == first + later
        assert emulator.snapshot()["ignored_acks"] >= 2


@pytest.mark.parametrize("on", [True, False])
def test_limit_bug(on: bool) -> None:
    emulator = quirky(limit_bug=on, seq_per_channel=True, real_channel_names=True)
    generated = [emulator.generate(1, "u1", sender=f"s{k}")[0] for k in range(1, 10)]
    with served(emulator) as client:
        assert ids(sync(client, limit=3)) == generated[:3]
        ack(client, 1)
        rest = sync(client, limit=100)
        stats = emulator.snapshot()
    assert emulator.acked_ids() == generated[:3]
    if on:
        assert rest == []  # never returned again
        assert emulator.lost_ids("u1") == generated[3:]
        assert stats["lost_messages"] == 6
        assert stats["lost"] == {"u1": 6}
        assert stats["unacked"] == {"u1": 0}
    else:
        assert ids(rest) == generated[3:]
        assert stats["lost_messages"] == 0


def test_limit_bug_spares_a_sync_that_reaches_every_conversation() -> None:
    emulator = WuKongIMEmulator(TOKEN, uids=["u1"], seed=5, quirks=ServerQuirks.real().updated(
        {"conversation_persist_seconds": 0.0}))
    generated = emulator.generate(400, "u1")
    with served(emulator) as client:
        batch = sync(client, limit=10_000)
        ack(client, batch[-1]["message_seq"])
        assert sync(client, limit=10_000) == []
    assert sorted(ids(batch)) == generated
    assert emulator.lost_ids() == []


@pytest.mark.parametrize("on", [True, False])
def test_sync_limit_default(on: bool) -> None:
    emulator = quirky(sync_limit_default=on)
    emulator.generate(250, "u1")
    with served(emulator) as client:
        for body in ({"uid": "u1", "limit": 0}, {"uid": "u1"}):
            answer = client.post("/message/sync", json=body)
            assert answer.status_code == (200 if on else 400), body
            if on:
                assert len(answer.json()) == 200
        negative = client.post("/message/sync", json={"uid": "u1", "limit": -1})
        assert negative.status_code == 400
        assert negative.json()["status"] == 400


@pytest.mark.parametrize("on", [True, False])
def test_ack_last_sync_only(on: bool) -> None:
    emulator = quirky(ack_last_sync_only=on)
    generated = emulator.generate(6, "u1")
    with served(emulator) as client:
        assert len(sync(client, limit=4)) == 4
        assert len(sync(client, limit=2)) == 2
        ack(client, 2)
    assert emulator.acked_ids() == generated[:2 if on else 4]


@pytest.mark.parametrize("on", [True, False])
def test_sync_by_conversation(on: bool) -> None:
    emulator = quirky(sync_by_conversation=on, real_channel_names=True)
    generated = [emulator.generate(1, "u1", sender=s)[0] for s in ("s1", "s2", "s1", "s2")]
    with served(emulator) as client:
        batch = sync(client)
    order = [0, 2, 1, 3] if on else [0, 1, 2, 3]
    assert ids(batch) == [generated[i] for i in order]


# (path, body, Go's text, the document emulator's text or None where it answers 200)
BAD_INPUT: list[tuple[str, bytes, str, str | None]] = [
    ("/message/sync", b"", "EOF", "数据格式有误!"),
    ("/message/sync", b"  \n", "EOF", "数据格式有误!"),
    ("/message/sync", b'{"uid": "u1", "lim', "unexpected EOF", "数据格式有误!"),
    ("/message/sync", b"xyz", "invalid character 'x' looking for beginning of value",
     "数据格式有误!"),
    ("/message/sync", b'{"uid" "u1"}', "invalid character '\"' after object key",
     "数据格式有误!"),
    ("/message/sync", b"[1]", "json: cannot unmarshal array into Go value of type api.syncReq",
     "数据格式有误!"),
    ("/message/sync", b'{"limit": 10}', "用户uid不能为空！", "uid不能为空!"),
    ("/message/sync", b'{"uid": "  ", "limit": 10}', "用户uid不能为空！", None),
    ("/message/sync", b'{"uid": "u1", "limit": "ten"}',
     "json: cannot unmarshal string into Go struct field syncReq.limit of type int",
     "limit必须大于0!"),
    ("/message/sync", b'{"uid": "u1", "limit": 1.5}',
     "json: cannot unmarshal number 1.5 into Go struct field syncReq.limit of type int",
     "limit必须大于0!"),
    ("/message/sync", b'{"uid": 7, "limit": 1}',
     "json: cannot unmarshal number into Go struct field syncReq.uid of type string",
     "uid不能为空!"),
    ("/message/syncack", b'{"uid": "u1", "last_message_seq": 0}', "最后一次messageSeq不能为0！",
     "last_message_seq不能为0!"),
    ("/message/syncack", b'{"uid": "u1"}', "最后一次messageSeq不能为0！",
     "last_message_seq不能为0!"),
    ("/message/syncack", b'{"last_message_seq": 3}', "用户UID不能为空！", "uid不能为空!"),
    ("/message/syncack", b'{"uid": "u1", "last_message_seq": -1}',
     "json: cannot unmarshal number -1 into Go struct field syncackReq.last_message_seq of "
     "type uint64", None),
    ("/channel/messagesync", b'{"login_uid": "r", "channel_type": 2, "limit": 5}',
     "channel_id不能为空！", "频道ID不能为空!"),
    ("/channel/messagesync",
     b'{"login_uid": "r", "channel_id": "g1", "channel_type": 300, "limit": 5}',
     "json: cannot unmarshal number 300 into Go struct field .channel_type of type uint8", None),
]


@pytest.mark.parametrize("on", [True, False])
def test_go_errors(on: bool) -> None:
    emulator = quirky(go_errors=on)
    emulator.generate(2, "u1")
    with served(emulator) as client:
        for path, raw, go_text, document_text in BAD_INPUT:
            answer = client.post(path, content=raw)
            if on:
                assert answer.status_code == 400, (path, raw)
                assert answer.content == json.dumps(
                    {"msg": go_text, "status": 400}, ensure_ascii=False,
                    separators=(",", ":")).encode(), (path, raw)
                assert answer.headers["content-type"] == "application/json; charset=utf-8"
            elif document_text is None:
                assert answer.status_code == 200, (path, raw)
            else:
                assert answer.status_code == 400, (path, raw)
                assert answer.json() == {"msg": document_text, "status": 400}, (path, raw)
        for path in ("/message/sync", "/message/syncack", "/channel/messagesync"):
            answer = client.get(path)
            if on:
                assert (answer.status_code, answer.text) == (404, "404 page not found")
                assert answer.headers["content-type"] == "text/plain"
            else:
                assert answer.status_code == 405
        # Go's decoder: the first value only, keys matched regardless of case.
        lenient = client.post("/message/sync", content=b'{"UID": "u1", "Limit": 5} trailing')
        assert lenient.status_code == (200 if on else 400)
        if on:
            assert len(lenient.json()) == 2
    refused = len(BAD_INPUT) if on else sum(1 for e in BAD_INPUT if e[3] is not None) + 1
    assert emulator.snapshot()["bad_requests"] == refused


@pytest.mark.parametrize("on", [True, False])
def test_shutting_down(on: bool) -> None:
    emulator = quirky(shutting_down=on)
    emulator.generate(2, "u1")
    emulator.generate_channel(2, "g1", 2)
    with served(emulator) as client:
        answers = [
            client.post("/message/sync", json={"uid": "u1", "limit": 10}),
            client.post("/message/syncack", json={"uid": "u1", "last_message_seq": 2}),
            client.post("/channel/messagesync", json={
                "login_uid": "r", "channel_id": "g1", "channel_type": 2, "limit": 10}),
            client.get("/health"),
        ]
    for answer in answers:
        if on:
            assert (answer.status_code, answer.content) == (500, b"")
        else:
            assert answer.status_code == 200
    stats = emulator.snapshot()
    assert stats["shutdown_refusals"] == (4 if on else 0)
    assert stats["syncs"] == (0 if on else 1)
    assert stats["unacked"] == {"u1": 2 if on else 0}


@pytest.mark.parametrize("on", [True, False])
def test_kill_loses_unpersisted_conversations(on: bool) -> None:
    emulator = quirky(kill_loses_unpersisted=on, seq_per_channel=True, real_channel_names=True)
    written = emulator.generate(2, "u1", sender="s1")
    with served(emulator) as client:
        client.post("/_emulator/persist")
        fresh = emulator.generate(2, "u1", sender="s2")
        assert len(sync(client)) == 4
        # A graceful restart keeps every conversation; only what the sync noted is gone.
        assert client.post("/_emulator/restart").json() == {"restarts": 1}
        ack(client, 2)
        assert emulator.acked_ids() == []
        assert ids(sync(client)) == written + fresh
        assert client.post("/_emulator/restart", json={"kill": True}).json() == {"restarts": 2}
        after_kill = sync(client)
        stats = emulator.snapshot()
        if not on:
            assert ids(after_kill) == written + fresh
            assert stats["hidden"] == {"u1": 0}
            return
        assert ids(after_kill) == written  # s2's commands are gone from sync ...
        assert stats["hidden"] == {"u1": 2}
        assert stats["dropped_conversations"] == 1
        assert stats["unacked"] == {"u1": 4}
        newest = emulator.generate(1, "u1", sender="s2")
        back = sync(client)  # ... until the next message arrives in that channel
        assert ids(back) == written + fresh + newest
        assert seqs(back) == [1, 2, 1, 2, 3]


@pytest.mark.parametrize("on", [True, False])
def test_channel_more_when_full(on: bool) -> None:
    emulator = quirky(channel_more_when_full=on)
    emulator.generate_channel(10, "g1", 2)
    with served(emulator) as client:
        full = channel_sync(client, 1, 0, 10, 1)
        roomy = channel_sync(client, 1, 0, 20, 1)
        latest = channel_sync(client, 0, 0, 10, 0)
    assert seqs(full["messages"]) == list(range(1, 11)) == seqs(latest["messages"])
    assert (full["more"], roomy["more"], latest["more"]) == ((1, 0, 1) if on else (0, 0, 0))


@pytest.mark.parametrize("on", [True, False])
def test_channel_login_uid_required(on: bool) -> None:
    emulator = quirky(channel_login_uid_required=on)
    emulator.generate_channel(3, "g1", 2)
    with served(emulator) as client:
        for login in ({}, {"login_uid": ""}, {"login_uid": " "}):
            answer = client.post("/channel/messagesync", json={
                "channel_id": "g1", "channel_type": 2, "limit": 10, "pull_mode": 1,
                "start_message_seq": 1, **login})
            assert answer.status_code == (400 if on else 200), login
        direct = client.post("/channel/messagesync", json={
            "channel_id": "u9", "channel_type": 1, "limit": 10})
        assert direct.status_code == 400


@pytest.mark.parametrize("on", [True, False])
def test_channel_limit_rules(on: bool) -> None:
    emulator = quirky(channel_limit_rules=on)
    emulator.generate_channel(10_005, "g1", 2)
    with served(emulator) as client:
        body = {"login_uid": "r", "channel_id": "g1", "channel_type": 2,
                "start_message_seq": 1, "pull_mode": 1}
        everything = client.post("/channel/messagesync", json={**body, "limit": 0})
        missing = client.post("/channel/messagesync", json=body)
        huge = client.post("/channel/messagesync", json={**body, "limit": 20_000})
    if on:
        assert seqs(everything.json()["messages"]) == list(range(1, 10_006))
        assert len(missing.json()["messages"]) == 10_005
        assert seqs(huge.json()["messages"]) == list(range(1, 10_001))
        assert huge.json()["more"] == 1
    else:
        assert (everything.status_code, missing.status_code) == (400, 400)
        assert len(huge.json()["messages"]) == 10_005


@pytest.mark.parametrize("on", [True, False])
def test_channel_type_zero_empty(on: bool) -> None:
    emulator = quirky(channel_type_zero_empty=on)
    emulator.generate_channel(3, "g1", 2)
    with served(emulator) as client:
        for kind in ({"channel_type": 0}, {}):
            answer = client.post("/channel/messagesync", json={
                "login_uid": "r", "channel_id": "g1", "limit": 10, "start_message_seq": 2,
                **kind})
            if on:
                assert (answer.status_code, answer.content) == (200, (
                    b'{"start_message_seq":0,"end_message_seq":0,"more":0,"messages":[]}'))
            else:
                assert answer.status_code == 400


@pytest.mark.parametrize("on", [True, False])
def test_unknown_pull_mode_down(on: bool) -> None:
    emulator = quirky(unknown_pull_mode_down=on)
    emulator.generate_channel(10, "g1", 2)
    with served(emulator) as client:
        answer = client.post("/channel/messagesync", json={
            "login_uid": "r", "channel_id": "g1", "channel_type": 2, "limit": 3,
            "start_message_seq": 5, "pull_mode": 7})
        if on:
            assert seqs(answer.json()["messages"]) == [3, 4, 5]
            assert answer.json()["messages"] == channel_sync(client, 5, 0, 3, 0)["messages"]
        else:
            assert answer.status_code == 400


@pytest.mark.parametrize("go_errors", [True, False])
def test_token_is_required_on_every_route(go_errors: bool) -> None:
    emulator = quirky(go_errors=go_errors)
    with serving(emulator) as (_loop, server), \
            httpx.Client(base_url=server.urls[0]) as client:
        for headers in ({}, {"token": "wrong"}):
            health = client.get("/health", headers=headers)
            assert (health.status_code, health.content) == (401, b"")
            for path in ("/message/sync", "/message/syncack", "/channel/messagesync"):
                answer = client.get(path, headers=headers)
                assert answer.status_code == (401 if go_errors else 405)
        assert client.get("/health", headers=HEADERS).json() == {"status": "ok"}
    assert emulator.snapshot()["bad_token"] == (8 if go_errors else 2)


def test_every_quirk_at_once() -> None:
    """The real server's preset, driven as a relay should: large limit, back off on repeats."""
    quirks = ServerQuirks.real().updated({"conversation_persist_seconds": 0.3})
    emulator = WuKongIMEmulator(TOKEN, uids=["u1", "u2"], seed=8, quirks=quirks)
    generated = {uid: set(emulator.generate(300, uid)) for uid in ("u1", "u2")}
    received: dict[str, set[int]] = {"u1": set(), "u2": set()}
    with served(emulator) as client:

        def drained() -> bool:
            for uid in ("u1", "u2"):
                answer = client.post("/message/sync", json={"uid": uid, "limit": 10_000})
                batch = answer.json()
                assert all(isinstance(m["message_id"], int) and m["message_id"] > 2**53
                           for m in batch)
                received[uid] |= set(ids(batch))
                if batch:
                    ack(client, batch[-1]["message_seq"], uid)
            return not emulator.unacked("u1") and not emulator.unacked("u2")

        wait_for(drained, timeout=20, interval=0.1, message="both uids drained")
    stats = emulator.snapshot()
    assert received == generated
    assert stats["lost_messages"] == 0
    assert stats["ignored_acks"] >= 2  # the first acks came inside the conversations' first 0.3 s
    assert stats["syncs_by_uid"]["u1"] == stats["syncs_by_uid"]["u2"] >= 2


def test_cli_real_server() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "emulate", "wukongim", "--port", "0", "--token", TOKEN,
         "--real-server", "--quirk", "go_errors=false", "--backlog", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        banner = json.loads(proc.stdout.readline())
        assert banner["quirks"] == [n for n in ServerQuirks.real().names_on() if n != "go_errors"]
        with httpx.Client(base_url=banner["urls"][0], headers=HEADERS, timeout=10) as client:
            batch = client.post("/message/sync", json={"uid": "u1"}).json()  # no limit: 200
            assert len(batch) == 5
            assert all(m["message_idstr"] == str(m["message_id"]) for m in batch)
            assert client.get("/_emulator/stats").json()["quirks"]["go_errors"] is False
    finally:
        proc.terminate()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    bad = subprocess.run([sys.executable, "-m", "relay", "emulate", "wukongim", "--quirk",
                          "bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert "unknown quirk 'bogus'" in bad.stderr
