"""Topics a broker does not have: on a broker that does not create topics by itself.

A templated topic is partly chosen by senders (the message ``type`` comes from
the client): an unknown one dead-letters only its records (or is created where
configured); a missing fixed topic pauses the sink. Nothing retries for ever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import rongcloud_source, write_config
from tests.support.emulators import refused_port
from tests.support.hostile import ScriptedRongCloud, serving_app
from tests.support.kafka_broker import KafkaBroker
from tests.support.kafka_read import consume
from tests.support.relay_process import RelayProcess, wait_for
from tests.test_hostile_records import metric, rc_record

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture(scope="module")
def strict_broker() -> Iterator[KafkaBroker]:
    """A broker with ``auto.create.topics.enable=false``, as many production clusters run."""
    broker = KafkaBroker(num_partitions=1,
                         extra_properties={"auto.create.topics.enable": "false"})
    try:
        broker.start()
    except Exception as exc:
        broker.close()
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"strict Kafka broker unavailable: {exc}", pytrace=False)
        pytest.skip(f"strict Kafka broker unavailable: {exc}")
    try:
        yield broker
    finally:
        broker.close()


def typed_answer(types: list[str], first: int) -> bytes:
    records = [rc_record(first + i, objectName=t) for i, t in enumerate(types)]
    return b'{"code":200,"results":[' + b",".join(records) + b"]}"


def dead_letters(config: Path) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "relay", "dlq", "list", "--json", "--limit",
                          "1000", "--config", str(config)], capture_output=True, text=True)
    return list(json.loads(out.stdout or "[]"))


def run(tmp_path: Path, urls: list[str], sink: dict[str, Any]) -> tuple[RelayProcess, Path, int]:
    port = refused_port()
    config = write_config(tmp_path, sources={"rc": rongcloud_source(urls, endpoints=["person"])},
                          sinks={"bus": {"type": "kafka", "batch_size": 500, **sink}},
                          metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    return RelayProcess(config, tmp_path / "relay.log").start(), config, port


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_unknown_templated_topic_dead_letters_only_its_records(
        tmp_path: Path, strict_broker: KafkaBroker, exactly_once: bool) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    strict_broker.create_topic(f"{prefix}.RC_TxtMsg", 1)
    provider = ScriptedRongCloud()
    # 100 records, every fifth of a type a client made up: its topic does not exist.
    types = ["evil-type" if i % 5 == 0 else "RC:TxtMsg" for i in range(100)]
    provider.queue("person", typed_answer(types, 0))
    provider.queue("person", typed_answer(["RC:TxtMsg"] * 50, 1000))  # later events
    with serving_app(provider.app()) as (_loop, urls):
        relay, config, port = run(tmp_path, urls, {"bootstrap_servers": strict_broker.bootstrap,
                                                   "topic": prefix + ".{type}",
                                                   "exactly_once": exactly_once,
                                                   "cursor_topic": f"{prefix}.cursor"})
        try:
            # Exactly once, the cursor topic is created by the relay (compacted), even where
            # brokers create no topic by themselves; the others commit without the refused.
            records = consume(strict_broker.bootstrap, f"{prefix}.RC_TxtMsg", 130, timeout=60,
                              isolation_level="read_committed")
            letters = wait_for(lambda: len(dead_letters(config)) >= 20 and dead_letters(config),
                               timeout=30)
            assert metric(port, "relay_sink_pending_events") == 0
        finally:
            relay.stop()
    ids = [r.headers["id"].decode() for r in records]
    assert len(ids) == len(set(ids)) == 130, "later events delivered, none twice"
    assert len(letters) == 20
    assert all("unknown topic" in str(d["error"]) for d in letters)


def test_missing_fixed_topic_pauses_the_sink(tmp_path: Path, strict_broker: KafkaBroker) -> None:
    provider = ScriptedRongCloud()
    provider.queue("person", typed_answer(["RC:TxtMsg"] * 10, 0))
    with serving_app(provider.app()) as (_loop, urls):
        relay, config, port = run(tmp_path, urls, {"bootstrap_servers": strict_broker.bootstrap,
                                                   "topic": f"missing-{uuid.uuid4().hex[:8]}",
                                                   "paused_retry": "1h"})
        try:
            wait_for(lambda: any("sink paused" in r.get("event", "")
                                 for r in relay.log_records()), timeout=60)
            assert metric(port, "relay_sink_up") == 0
        finally:
            relay.stop()
    assert dead_letters(config) == []


def test_create_topics_creates_an_unknown_topic(tmp_path: Path,
                                                strict_broker: KafkaBroker) -> None:
    topic = f"created-{uuid.uuid4().hex[:8]}"
    provider = ScriptedRongCloud()
    provider.queue("person", typed_answer(["RC:TxtMsg"] * 10, 0))
    with serving_app(provider.app()) as (_loop, urls):
        relay, config, _port = run(tmp_path, urls, {
            "bootstrap_servers": strict_broker.bootstrap, "topic": topic, "create_topics": True,
            "create_topic_partitions": 1, "create_topic_replication": 1})
        try:
            records = consume(strict_broker.bootstrap, topic, 10, timeout=60)
        finally:
            relay.stop()
    assert len(records) == 10
    assert dead_letters(config) == []
