"""The RongCloud emulator behaves as the provider documents (real loopback HTTP)."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest

from relay.emulators.rongcloud import RongCloudEmulator
from tests.support.emulators import serving


def signed(secret: str, app_key: str = "k") -> dict[str, str]:
    nonce, stamp = "12345", str(int(time.time() * 1000))
    return {"App-Key": app_key, "Nonce": nonce, "Timestamp": stamp,
            "Signature": hashlib.sha1(f"{secret}{nonce}{stamp}".encode()).hexdigest()}


def test_consume_on_read_batches_and_signature() -> None:
    emulator = RongCloudEmulator("k", "s", batch_size=3, budget=None, seed=1)
    emulator.generate(5, "group")
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        bad = client.post("/rtmsg/group/qrymsg.json", headers=signed("wrong"))
        assert bad.status_code == 401
        assert bad.json()["code"] == 1004
        sizes = [client.post("/rtmsg/group/qrymsg.json", headers=signed("s")).json()["size"]
                 for _ in range(3)]
        assert sizes == [3, 2, 0]


def test_over_budget_answers_empty_and_is_counted() -> None:
    emulator = RongCloudEmulator("k", "s", batch_size=1, budget=10, seed=1)
    emulator.generate(30, "person")
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        sizes = [client.post("/rtmsg/person/qrymsg.json", headers=signed("s")).json()["size"]
                 for _ in range(15)]
    assert sizes[:10] == [1] * 10
    assert sizes[10:] == [0] * 5
    assert emulator.snapshot()["over_budget"] == 5
    assert emulator.snapshot()["queued"]["person"] == 20  # nothing taken over budget


def test_retention_drops_old_messages() -> None:
    emulator = RongCloudEmulator("k", "s", budget=None, seed=1)
    emulator.generate(4, "person", age=3 * 3600 + 60)
    fresh = emulator.generate(2, "person")
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        answer = client.post("/rtmsg/person/qrymsg.json", headers=signed("s")).json()
    assert answer["size"] == 2
    assert [r["msgUID"] for r in answer["results"]] == fresh
    assert emulator.snapshot()["expired"] == 4


def test_faults_error_malformed_and_refused() -> None:
    emulator = RongCloudEmulator("k", "s", budget=None, seed=1)
    emulator.generate(10, "person")
    with serving(emulator, ports=[0, 0]) as (loop, server), httpx.Client() as client:
        url = f"{server.urls[0]}/rtmsg/person/qrymsg.json"
        emulator.faults.update({"error_ratio": 1.0})
        assert client.post(url, headers=signed("s")).status_code == 500
        emulator.faults.update({"error_ratio": 0.0, "malformed_ratio": 1.0})
        with pytest.raises(ValueError, match=r"JSON|Expecting|Unterminated|delimiter"):
            client.post(url, headers=signed("s")).json()
        emulator.faults.update({"malformed_ratio": 0.0})
        assert emulator.snapshot()["queued"]["person"] == 10  # faults took nothing
        loop.run(server.refuse(0))
        with pytest.raises(httpx.ConnectError):
            client.post(url, headers=signed("s"))
        backup = f"{server.urls[1]}/rtmsg/person/qrymsg.json"
        assert client.post(backup, headers=signed("s")).json()["size"] == 10


def test_redelivery_serves_some_messages_twice() -> None:
    emulator = RongCloudEmulator("k", "s", batch_size=100, budget=None, redelivery_ratio=0.5,
                                 seed=2)
    keys = emulator.generate(100, "group")
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        served = []
        for _ in range(3):
            served += client.post("/rtmsg/group/qrymsg.json", headers=signed("s")).json()["results"]
    assert len(served) > 100
    assert emulator.snapshot()["redelivered"] == len(served) - 100
    assert len(keys) == 100


def test_results_items_as_strings_hold_the_same_records_as_objects() -> None:
    """Served as JSON strings (RongCloud documents results as String[]), awkward records
    (quotes, backslashes, control characters, non-ASCII) come back unchanged."""
    emulator = RongCloudEmulator("k", "s", batch_size=10, budget=None, seed=2,
                                 string_items_ratio=0.5)
    keys = emulator.generate(8, "person")
    awkward = ['say "hi"', "C:\\path\\", "tab\there\nnew line\x01", "✓ 融云 \u2028", "\\\"", ""]
    for queued, text in zip(emulator.queues["person"], awkward, strict=False):
        queued.record["content"] = {"content": text, "extra": text}
        queued.encoded = b""  # encoded again from the changed record
    expected = {q.key: dict(q.record) for q in emulator.queues["person"]}
    with serving(emulator) as (_loop, server), httpx.Client(base_url=server.urls[0]) as client:
        results = client.post("/rtmsg/person/qrymsg.json", headers=signed("s")).json()["results"]
    strings = [item for item in results if isinstance(item, str)]
    assert strings  # both forms served
    assert len(strings) < len(results)
    records = [json.loads(item) if isinstance(item, str) else item for item in results]
    assert {r["msgUID"]: r for r in records} == {k: expected[k] for k in keys}
